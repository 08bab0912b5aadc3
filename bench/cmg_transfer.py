"""CMG's cross-modal generalisation protocol on the synthetic world: a head trained on one
modality, tested on the other, for releases pretrained with and without CMG's objectives.

Releases: ``configs/pretrain/bench-small.yaml`` (a random ImageBERT, hidden 128, 3 layers, MLM,
MOC, MRFR and ITM) pretrained on the same 1,200 synthetic scenes with the same seed and steps:

- ``cmg``: with every CMG objective (``cmg.enabled=true`` and the bench's codebook shape);
- ``no cmg``: without them, the control;
- the paper's ablations that fit: ``without Cross-CPC`` (``cmg.cross_cpc=0``), ``without CLUB``
  (``cmg.club=0 cmg.club_approximation=0``), ``without MM-EMA`` (``cmg.multimodal_ema=false``),
  ``without code reset`` (``cmg.code_reset=false``);
- CLUB's weight: ``CLUB weight 1`` (CMG's) and ``CLUB weight 0.1``, against the default 0.01.

Protocol, per release, each a ``python -m finetune`` run: the ``shape`` task
(``finetune.synth_tasks``: the label is the shape every object of the scene has, which the caption
names and the image shows), classified by ``configs/finetune/cross-modal-text-to-image.yaml`` and
``cross-modal-image-to-text.yaml``. The release is frozen; a linear head reads the mean of one
modality's quantised semantic codes (a release without CMG: of its encoder states,
``fusion.cross_modal_representation=hidden``; the full CMG release is also read through its
semantic vectors before quantisation and through its encoder states). Reported: the transfer
accuracy both ways, and the same head tested on the modality it trained on (how well that
modality's representation carries the label at all). ``--retrieval`` adds ``configs/finetune/cross-modal-retrieval.yaml`` (caption against image
by the cosine of their pooled codes) for the ``cmg`` and ``no cmg`` releases.

Results are cached by the settings, the release and the code version (``project_runs.code_version``),
and every run resumes when killed.

    .venv/bin/python bench/cmg_transfer.py --work /tmp/cmg-transfer --jobs 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finetune.synth_tasks import TASK_FILE  # noqa: E402
from preprocess import atomic  # noqa: E402
from project_runs import (  # noqa: E402  (bench/, this script's directory)
    PRETRAIN_CONFIG, code_version, finetune_run, prepare_task, pretrained, pretraining_features,
)

CODE_PATHS = ("*.py", "*.yaml", "pyproject.toml", "constraints.txt")
# What a release depends on: a change to fine-tuning's code does not pretrain the releases again.
RELEASE_CODE_PATHS = ("preprocess/*.py", "pretrain/*.py", "configs/pretrain/*.yaml", "pyproject.toml", "constraints.txt")
# The codebook for this small world (5 shapes, 6 colours, sizes, places; hidden 128): the paper's
# 400 codes of width 256 would leave most codes dead; a code unused for 100 steps is reset.
CODEBOOK = {"num_codes": 64, "code_dim": 64, "dead_after": 100}
CMG_ON = ["cmg.enabled=true", *(f"cmg.{key}={value}" for key, value in CODEBOOK.items())]
RELEASES = {
    "cmg": CMG_ON,
    "no cmg": [],
    "without Cross-CPC": [*CMG_ON, "cmg.cross_cpc=0"],
    "without CLUB": [*CMG_ON, "cmg.club=0", "cmg.club_approximation=0"],
    "without MM-EMA": [*CMG_ON, "cmg.multimodal_ema=false"],
    "without code reset": [*CMG_ON, "cmg.code_reset=false"],
    # CLUB's weight: CMG's own (1) and a tenth of it, against the default 0.01 of "cmg"
    "CLUB weight 1": [*CMG_ON, "cmg.club=1"],
    "CLUB weight 0.1": [*CMG_ON, "cmg.club=0.1"],
}
# (train modality, test modality) of each protocol column
DIRECTIONS = {"text→image": ("text", "image"), "image→text": ("image", "text"),
              "text→text": ("text", "text"), "image→image": ("image", "image")}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="data, releases, runs and results (reused across runs)")
    parser.add_argument("--releases", nargs="+", default=list(RELEASES), choices=list(RELEASES))
    parser.add_argument("--pretrain-steps", type=int, default=0, help="steps of the pretraining stage (0: the config's)")
    parser.add_argument("--train-samples", type=int, default=1000)
    parser.add_argument("--test-samples", type=int, default=300)
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps of each head")
    parser.add_argument("--retrieval", action="store_true", help="also the retrieval variant (cmg and no cmg)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each one CPU thread)")
    return parser.parse_args(argv)


def pretrain_overrides(name: str, steps: int) -> list[str]:
    overrides = list(RELEASES[name])
    if steps:
        stages = yaml.safe_load(PRETRAIN_CONFIG.read_text())["stages"]
        stages[0]["steps"] = steps
        overrides.append("stages=" + json.dumps(stages))
    return overrides


def release_of(name: str, args, features: Path, code: str) -> Path:
    """The release ``name``, pretrained once per (overrides, ``RELEASE_CODE_PATHS``' version)."""
    overrides = pretrain_overrides(name, args.pretrain_steps)
    key = hashlib.sha256(json.dumps([overrides, code]).encode()).hexdigest()[:12]
    root = args.work / "releases" / f"{name.replace(' ', '_')}-{key}"
    return pretrained(features, root / "run", root / "release", overrides, log=root / "log.txt")


def representations(release_name: str) -> list[str]:
    """What the head reads: a release without CMG has only its states; the full CMG release is
    also read before quantisation and without CMG's modules, to see what each step adds."""
    if "cmg.enabled=true" not in RELEASES[release_name]:
        return ["hidden"]
    return ["codes", "semantic", "hidden"] if release_name == "cmg" else ["codes"]


def finetune_runs(release_name: str, release: Path, roots: dict[str, Path], args) -> list[tuple[str, list[str], str]]:
    """(result name, ``python -m finetune`` arguments, task) of every protocol run of one release."""
    runs = []
    for representation in representations(release_name):
        common = ["--init", str(release), f"fusion.cross_modal_representation={representation}", f"train.steps={args.steps}",
                  f"eval.every_steps={args.steps}", f"checkpoint.every_steps={args.steps}", "logging.progress_bar=false"]
        row = f"{release_name} ({representation})"
        for direction, (train, test) in DIRECTIONS.items():
            config = REPO / "configs" / "finetune" / "cross-modal-text-to-image.yaml"
            runs.append((f"{row}/{direction}", ["--config", str(config), *common, f"shards_root={roots['shape']}",
                         f"fusion.cross_modal_train={train}", f"fusion.cross_modal_eval={test}"], "shape"))
        if args.retrieval and release_name in ("cmg", "no cmg"):
            config = REPO / "configs" / "finetune" / "cross-modal-retrieval.yaml"
            runs.append((f"{row}/retrieval", ["--config", str(config), *common, f"shards_root={roots['retrieval']}"],
                         "retrieval"))
    return runs


def run_one(name: str, argv: list[str], code: str, work: Path) -> dict:
    key = hashlib.sha256(json.dumps([argv, code]).encode()).hexdigest()[:12]
    run_dir = work / "runs" / f"{name.replace(' ', '_').replace('/', '-')}-{key}"
    record, seconds = finetune_run(run_dir, *argv)
    return {"key": key, "argv": argv, "code": code, "run_dir": str(run_dir), "seconds": seconds,
            "metrics": record["metrics"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    results_file = args.work / "results.json"
    code = code_version(CODE_PATHS)
    features = pretraining_features(args.work / "pretrain", log=args.work / "pretrain" / "log.txt")
    roots = {"shape": prepare_task("shape", args.work, args.train_samples, args.test_samples, features)}
    if args.retrieval:
        roots["retrieval"] = prepare_task("retrieval", args.work, args.train_samples, args.test_samples, features)

    def one_release(name: str) -> list[tuple[str, dict]]:
        release = release_of(name, args, features, code_version(RELEASE_CODE_PATHS))
        done = []
        for result_name, run_argv, task in finetune_runs(name, release, roots, args):
            results = json.loads(results_file.read_text()) if results_file.is_file() else {}
            entry = results.get(result_name)
            if entry is None or entry.get("argv") != run_argv or entry.get("code") != code:
                entry = run_one(result_name, run_argv, code, args.work)
                entry["baselines"] = json.loads((roots[task] / "raw" / "test" / TASK_FILE).read_text())["statistics"]
                results = json.loads(results_file.read_text()) if results_file.is_file() else {}  # others wrote since
                results[result_name] = entry
                atomic.write_json(results_file, results)
            print(f"{result_name}: {json.dumps(entry['metrics'])} ({entry['seconds']:.0f} s)", flush=True)
            done.append((result_name, entry))
        return done

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # threads only wait on the subprocesses
        list(pool.map(one_release, args.releases))
    rows = [f"{name} ({r})" for name in args.releases for r in representations(name)]
    print(table(json.loads(results_file.read_text()), rows))
    return 0


def table(results: dict, rows: list[str]) -> str:
    lines = ["| release (what the head reads) | " + " | ".join(DIRECTIONS) + " | retrieval i2t / t2i R@1 | chance |",
             "|---" * (len(DIRECTIONS) + 3) + "|"]
    for name in rows:
        row = [name]
        chance = "-"
        for direction in DIRECTIONS:
            entry = results.get(f"{name}/{direction}")
            row.append(f"{entry['metrics']['accuracy']:.1f}" if entry else "-")
            chance = f"{entry['baselines']['chance']:.1f}" if entry else chance
        retrieval = results.get(f"{name}/retrieval")
        row.append(f"{retrieval['metrics']['i2t_r1']:.1f} / {retrieval['metrics']['t2i_r1']:.1f}" if retrieval else "-")
        lines.append("| " + " | ".join(row + [chance]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
