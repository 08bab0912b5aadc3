"""Two data stages: does a large noisy stage followed by a small clean one beat either alone?

    python bench/two_stage.py                       # data, three runs (two at a time), report
    python bench/two_stage.py --steps 900 --stage2-steps 150 --mismatch 0.3 --corrupt 0.2

ImageBERT's claim (Qi et al. 2020): pretraining on a large, noisy web set and then on a small,
clean one beats either set alone. This builds, from ``python -m preprocess synth``:

- stage 1: ``--noisy-samples`` scenes whose captions are noisy like web alt text: a share
  ``--mismatch`` is another scene's caption, a share ``--corrupt`` has wrong colours and dropped
  words (``--caption-mismatch`` / ``--caption-corrupt``, docs/synth.md);
- stage 2: ``--clean-samples`` other scenes with clean captions;
- a held-out clean shard for evaluation (other scenes again).

All three are extracted with ``configs/preprocess/quickstart.yaml``, the stage-2 and evaluation
sets with the stage-1 extraction's batch-norm calibration (``detector.calibration_from``), so the
three go through one network. Then ``python -m pretrain`` runs three times with the model,
data and objective settings of ``configs/pretrain/quickstart.yaml`` and the same total steps:
stage 1 only, stage 2 only, and stage 1 then stage 2 (``--stage2-steps`` of them on the clean
set). Each single-stage run uses the quickstart's first-stage schedule (it starts from the
pretrained text model, as that stage does); the second stage of the two-stage run uses the
quickstart's second-stage schedule. The report is the last held-out evaluation of each run
(ITM accuracy, zero-shot retrieval R@1/5/10 ranked by the ITM head), as a markdown table and as
JSON (``OUT/report-<settings key>.json``).

Data directories are named by their settings and resume; a run directory is named by its
config, the content of the feature shards it reads and the code it runs (``CODE``, hashed by
``project_runs.code_version``), and a finished one (``done.json``) is not run again.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from project_runs import code_version, command_env  # bench/, this script's directory

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs/pretrain/quickstart.yaml"
EXTRACT_CONFIG = REPO / "configs/preprocess/quickstart.yaml"
SAMPLES_PER_SHARD = 200
METRICS = ("itm_acc", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
CONDITIONS = ("stage 1 only", "stage 2 only", "stage 1 then 2")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "two-stage-out")
    p.add_argument("--steps", type=int, default=900, help="total optimizer steps of every run")
    p.add_argument("--stage2-steps", type=int, default=150, help="of --steps, on the clean set in the two-stage run")
    p.add_argument("--noisy-samples", type=int, default=1000)
    p.add_argument("--clean-samples", type=int, default=200)
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--mismatch", type=float, default=0.3, help="share of stage-1 captions from another scene")
    p.add_argument("--corrupt", type=float, default=0.2, help="share of stage-1 captions with wrong colours, dropped words")
    p.add_argument("--candidates", type=int, default=100, help="zero-shot retrieval gallery (images = captions)")
    p.add_argument("--eval-every", type=int, default=300)
    p.add_argument("--parallel", type=int, default=2, help="runs at once (each one process, one thread)")
    args = p.parse_args(argv)
    if not 0 < args.stage2_steps < args.steps:
        p.error("--stage2-steps must be between 0 and --steps")
    if not args.candidates <= args.eval_samples <= SAMPLES_PER_SHARD:
        p.error(f"need --candidates <= --eval-samples <= {SAMPLES_PER_SHARD} (the held-out set is one shard)")
    return args


def _key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def _python(*argv: str) -> None:
    subprocess.run([sys.executable, *argv], cwd=REPO, env=command_env(), check=True)


# ---------------------------------------------------------------- data


def build_data(args) -> Path:
    """Synthesise and extract the three sets (each command resumes); returns their features root."""
    sets = {  # name: (seed, samples, synth flags); distinct seeds, so no scene is in two sets
        "noisy": (1, args.noisy_samples, ["--caption-mismatch", str(args.mismatch), "--caption-corrupt", str(args.corrupt)]),
        "clean": (2, args.clean_samples, []),
        "eval": (3, args.eval_samples, []),
    }
    root = args.out / f"data-{_key({k: [v[0], v[1], *v[2]] for k, v in sets.items()})}"
    per_shard = SAMPLES_PER_SHARD
    for name, (seed, samples, flags) in sets.items():
        raw, features = root / "raw" / name, root / "features" / name
        _python("-m", "preprocess", "synth", "--out", str(raw), "--num-samples", str(samples), "--seed", str(seed),
                "--samples-per-shard", str(per_shard), *flags)
        last = (samples - 1) // per_shard
        calibration = [] if name == "noisy" else [f"detector.calibration_from={root / 'features' / 'noisy'}"]
        _python("-m", "preprocess", "extract", "--input", str(raw / f"{{00000..{last:05d}}}.tar"),
                "--output", str(features), "--config", str(EXTRACT_CONFIG), "torch_threads=1", "progress=false",
                *calibration)
    (root / "settings.json").write_text(json.dumps(sets, indent=1) + "\n")
    return root / "features"


def _shards(features: Path, name: str) -> str:
    last = len(list((features / name).glob("*.tar"))) - 1
    return f"{name}/{{00000..{last:05d}}}.tar"


# ---------------------------------------------------------------- runs


def run_configs(args, features: Path) -> dict[str, dict]:
    """The three pretraining configs: the quickstart's with the stages replaced."""
    base = yaml.safe_load(QUICKSTART.read_text())
    first, second = base["stages"]
    base["shards_root"] = str(features.resolve())
    # A bigger gallery than the quickstart's 50: one hit moves R@1 by 1 point instead of 2.
    base["eval"] |= {"every_steps": args.eval_every, "max_samples": args.eval_samples,
                     "retrieval_candidates": args.candidates}
    base["data"]["num_workers"] = 0  # two runs side by side on two cores: no loader process beside each
    base["logging"]["progress_bar"] = False
    base["checkpoint"]["every_steps"] = args.steps  # at stage ends (and on a stop signal) only: short runs
    noisy, clean, held_out = _shards(features, "noisy"), _shards(features, "clean"), "eval/00000.tar"

    def stage(template: dict, name: str, shards: str, steps: int) -> dict:
        return template | {"name": name, "shards": shards, "eval_shards": held_out, "steps": steps}

    stage1 = args.steps - args.stage2_steps
    stages = {
        CONDITIONS[0]: [stage(first, "noisy", noisy, args.steps)],
        CONDITIONS[1]: [stage(first, "clean", clean, args.steps)],
        CONDITIONS[2]: [stage(first, "noisy", noisy, stage1), stage(second, "clean", clean, args.stage2_steps)],
    }
    return {name: copy.deepcopy(base) | {"stages": s} for name, s in stages.items()}


# What a run's result depends on besides its config (which the run key holds whole): a change that
# touches only docs or this script's reporting keeps the cache.
CODE = ("preprocess", "pretrain", "configs", "pyproject.toml", "constraints.txt")


def _data_digest(features: Path, set_name: str) -> str:
    """The sha256 of one set's feature shards and spec: a run is named by what it reads, not by
    where, so designs that differ only in the noisy set share their clean-only run."""
    digest = hashlib.sha256()
    for path in sorted((features / set_name).glob("*.tar")) + [features / set_name / "feature_spec.json"]:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def run_key(config: dict, commit: str) -> str:
    features = Path(config["shards_root"])
    read = sorted({stage[key].split("/")[0] for stage in config["stages"] for key in ("shards", "eval_shards")})
    settings = {k: v for k, v in config.items() if k != "shards_root"}
    return _key({"config": settings, "data": {name: _data_digest(features, name) for name in read}, "commit": commit})


def run_all(args, configs: dict[str, dict]) -> dict[str, Path]:
    """Run every config not finished yet, ``--parallel`` at a time; returns the run directories."""
    commit = code_version(CODE)
    run_dirs, pending = {}, []
    for name, config in configs.items():
        slug = name.replace(" ", "-")
        run_dir = args.out / "runs" / f"{slug}-{run_key(config, commit)}"
        run_dirs[name] = run_dir
        if (run_dir / "done.json").is_file():
            print(f"{name}: done before ({run_dir})", flush=True)
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir.parent / f"{run_dir.name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        pending.append((name, run_dir))
    running: list[tuple[str, subprocess.Popen, float]] = []
    while pending or running:
        while pending and len(running) < args.parallel:
            name, run_dir = pending.pop(0)
            cmd = [sys.executable, "-m", "pretrain", "--config", str(run_dir.parent / f"{run_dir.name}.yaml"),
                   "--run-dir", str(run_dir), "--resume"]
            print(f"{name}: {' '.join(cmd)}", flush=True)
            log = open(run_dir.parent / f"{run_dir.name}.log", "a")
            proc = subprocess.Popen(cmd, cwd=REPO, env=command_env(),
                                    stdout=log, stderr=subprocess.STDOUT)
            running.append((name, proc, time.monotonic()))
        time.sleep(5)
        for item in list(running):
            name, proc, start = item
            if proc.poll() is not None:
                running.remove(item)
                print(f"{name}: exit {proc.returncode} after {time.monotonic() - start:.0f} s", flush=True)
                if proc.returncode:
                    raise SystemExit(f"{name} failed; see {run_dirs[name].parent / (run_dirs[name].name + '.log')}")
    return run_dirs


# ---------------------------------------------------------------- report


def report(args, run_dirs: dict[str, Path]) -> dict:
    results = {}
    for name, run_dir in run_dirs.items():
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        results[name] = {"run_dir": str(run_dir), "final": records[-1], "evaluations": records}
    chance = results[CONDITIONS[0]]["final"]
    table = ["| condition | ITM acc | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | R sum |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        final = result["final"]
        table.append(f"| {name} | " + " | ".join(f"{final[k]:.1f}" for k in METRICS) + " |")
    chances = [chance["itm_chance"]] + [chance[f"{k}_chance"] for k in METRICS[1:-1]]
    table.append("| chance | " + " | ".join(f"{c:.1f}" for c in [*chances, sum(chances[1:])]) + " |")
    # The two-stage run also evaluated at the end of its stage 1: the noisy set alone, fewer steps.
    stage1_end = next(r for r in results[CONDITIONS[2]]["evaluations"] if r["stage"] == 0 and
                      r["step"] == args.steps - args.stage2_steps)
    table.append(f"| (stage 1 then 2, at the end of stage 1, step {stage1_end['step']}) | " +
                 " | ".join(f"{stage1_end[k]:.1f}" for k in METRICS) + " |")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "parallel")}
    summary = {"settings": settings, "commit": code_version(CODE), "table": "\n".join(table), "results": results}
    path = args.out / f"report-{_key(settings)}.json"  # one per design, so reports of several sit side by side
    path.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"{path}:")
    print("\n".join(table))
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    features = build_data(args)
    run_dirs = run_all(args, run_configs(args, features))
    report(args, run_dirs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
