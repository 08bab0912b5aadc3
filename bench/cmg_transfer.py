"""CMG's cross-modal generalisation protocol on the synthetic world: a head trained on one
modality, tested on the other, for releases with CMG's objectives and without them.

Releases, all from the same 1,200 synthetic scenes:

- ``no cmg``: ``configs/pretrain/bench-small.yaml`` (a random ImageBERT, hidden 128, 3 layers,
  MLM, MOC, MRFR and ITM, 3,000 steps), the control and the base of the others;
- ``cmg``: ``configs/pretrain/cmg-bench-small.yaml`` on it: CMG's modules added to the finished
  ``no cmg`` release and trained alone on its frozen encoder (``stages[].objectives: cmg``,
  1,000 steps), CMG's own setting;
- the paper's ablations that fit, each the ``cmg`` release's config with an override:
  ``without Cross-CPC`` (``cmg.cross_cpc=0``), ``without CLUB`` (``cmg.club=0
  cmg.club_approximation=0``), ``without MM-EMA`` (``cmg.multimodal_ema=false``), ``without
  code reset`` (``cmg.code_reset=false``);
- CLUB's weight: ``CLUB weight 1`` (CMG's) and ``CLUB weight 0.1``, against the default 0.01;
- not run unless named: ``cmg during pretraining``, CMG's objectives beside the masked ones
  from the first step (``bench-small.yaml`` with ``cmg.enabled``, about 3x slower).

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
and every run resumes when killed. ``--cmg-seed N`` trains the CMG releases again with another
seed on the same base release (reused when ``WORK/releases`` holds it).

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
CMG_CONFIG = REPO / "configs" / "pretrain" / "cmg-bench-small.yaml"
# The codebook's shape and reset for this small world: the CMG config's cmg section.
CODEBOOK = {key: value for key, value in yaml.safe_load(CMG_CONFIG.read_text())["cmg"].items() if key != "enabled"}
CMG_ON = ["cmg.enabled=true", *(f"cmg.{key}={value}" for key, value in CODEBOOK.items())]
BASE = "no cmg"  # the release the CMG_CONFIG ones start from (their model.release)
RELEASES = {  # name -> (config, overrides)
    BASE: (PRETRAIN_CONFIG, []),
    "cmg": (CMG_CONFIG, []),
    "without Cross-CPC": (CMG_CONFIG, ["cmg.cross_cpc=0"]),
    "without CLUB": (CMG_CONFIG, ["cmg.club=0", "cmg.club_approximation=0"]),
    "without MM-EMA": (CMG_CONFIG, ["cmg.multimodal_ema=false"]),
    "without code reset": (CMG_CONFIG, ["cmg.code_reset=false"]),
    # CLUB's weight: CMG's own (1) and a tenth of it, against the default 0.01 of "cmg"
    "CLUB weight 1": (CMG_CONFIG, ["cmg.club=1"]),
    "CLUB weight 0.1": (CMG_CONFIG, ["cmg.club=0.1"]),
    "cmg during pretraining": (PRETRAIN_CONFIG, CMG_ON),
}
DEFAULT_RELEASES = [name for name in RELEASES if name != "cmg during pretraining"]
# (train modality, test modality) of each protocol column
DIRECTIONS = {"text→image": ("text", "image"), "image→text": ("image", "text"),
              "text→text": ("text", "text"), "image→image": ("image", "image")}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="data, releases, runs and results (reused across runs)")
    parser.add_argument("--releases", nargs="+", default=DEFAULT_RELEASES, choices=list(RELEASES))
    parser.add_argument("--pretrain-steps", type=int, default=0,
                        help="steps of bench-small.yaml's stage (0: the config's)")
    parser.add_argument("--cmg-steps", type=int, default=0, help="steps of the CMG stage on the release (0: the config's)")
    parser.add_argument("--cmg-seed", type=int, default=0,
                        help="seed of the CMG stage (its modules' initialisation and data order); the base release keeps 0")
    parser.add_argument("--train-samples", type=int, default=1000)
    parser.add_argument("--test-samples", type=int, default=300)
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps of each head")
    parser.add_argument("--retrieval", action="store_true", help="also the retrieval variant (cmg and no cmg)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each one CPU thread)")
    return parser.parse_args(argv)


def with_steps(config: Path, steps: int) -> list[str]:
    """The override that sets ``config``'s (only) stage to ``steps`` (none for 0)."""
    if not steps:
        return []
    stages = yaml.safe_load(config.read_text())["stages"]
    stages[0]["steps"] = steps
    return ["stages=" + json.dumps(stages)]


def release_of(name: str, args, features: Path, code: str, base: Path | None) -> Path:
    """The release ``name``, pretrained once per (config, overrides, ``RELEASE_CODE_PATHS``'
    version); the CMG_CONFIG releases on ``base`` (the ``no cmg`` release)."""
    config, overrides = RELEASES[name]
    if config == CMG_CONFIG:
        overrides = [*overrides, *with_steps(config, args.cmg_steps), f"model.release={base}",
                     *([f"seed={args.cmg_seed}"] if args.cmg_seed else [])]
    else:
        overrides = [*overrides, *with_steps(config, args.pretrain_steps)]
    key = hashlib.sha256(json.dumps([config.name, overrides, code]).encode()).hexdigest()[:12]
    root = args.work / "releases" / f"{name.replace(' ', '_')}-{key}"
    return pretrained(features, root / "run", root / "release", overrides, log=root / "log.txt", config=config)


def has_cmg(release_name: str) -> bool:
    config, overrides = RELEASES[release_name]
    return config == CMG_CONFIG or "cmg.enabled=true" in overrides


def representations(release_name: str) -> list[str]:
    """What the head reads: a release without CMG has only its states; the full CMG release is
    also read before quantisation and without CMG's modules, to see what each step adds."""
    if not has_cmg(release_name):
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

    release_code = code_version(RELEASE_CODE_PATHS)
    base = release_of(BASE, args, features, release_code, None)  # before the others: they start from it

    def one_release(name: str) -> list[tuple[str, dict]]:
        release = release_of(name, args, features, release_code, base)
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
