"""Every command reports a mistake in its config or arguments as one line on stderr (exit 2) before
it imports torch, transformers, deepspeed, torchvision or webdataset: those imports alone take
seconds on a small machine (docs/benchmarks.md, "Config errors").

Each case runs the command in a fresh interpreter whose import system refuses the heavy modules:
importing one ends the process with exit 3 and names the module, so a heavy import that creeps in
before the error fails the test whatever the machine's speed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "deepspeed", "torchvision", "webdataset")
HEAVY_IMPORT_EXIT = 3

# Runs `python -m MODULE ARGS...` with an import hook that stops the process at the first heavy import.
GUARD = """
import os, runpy, sys

heavy, module, args = {heavy!r}, {module!r}, {args!r}
already = sorted(name for name in sys.modules if name.split(".")[0] in heavy)
if already:
    sys.stderr.write(f"the interpreter started with {{already}} imported; the check would be vacuous\\n")
    os._exit(4)


class RefuseHeavyImports:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in heavy:
            sys.stderr.write(f"heavy import before the error: {{name}}\\n")
            sys.stderr.flush()
            os._exit({exit_code})
        return None


sys.meta_path.insert(0, RefuseHeavyImports())
sys.argv = [module, *args]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run_guarded(module: str, args: list[str]) -> subprocess.CompletedProcess:
    code = GUARD.format(heavy=HEAVY, module=module, args=args, exit_code=HEAVY_IMPORT_EXIT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, key: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert len(lines) == 1 and key in lines[0], lines


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    "args, key",
    [
        (["detector.max_boxez=3"], "detector.max_boxez"),  # unknown key
        (["batch_size=0"], "batch_size"),
        (["detector.device=gpu0"], "detector.device"),  # was checked by torch.device
        (["detector.model=retinanet_resnet50_fpn"], "detector.model"),  # was checked by torchvision
        (["detector.label_format=onehot"], "detector.label_format"),
        (["--config", "{tmp}/bad.yaml"], "detector.devise"),  # a wrong key in the file
    ],
)
def test_extract(tmp_path, args, key):
    write(tmp_path / "bad.yaml", "detector:\n  devise: cpu\n")
    args = [a.format(tmp=tmp_path) for a in args]
    result = run_guarded("preprocess", ["extract", "--input", str(tmp_path / "raw.tar"), "--output", str(tmp_path / "out"), *args])
    assert_one_line_error(result, key)


@pytest.mark.parametrize(
    "args, key",
    [
        (["masking.text_rate=2"], "masking.text_rate"),
        (["data.batch_size=1"], "data.batch_size"),
        (["eval.max_samples=1"], "eval.max_samples"),
        (["model.pooling=max"], "model.pooling"),
        (["objectives.mlm=0", "objectives.moc=0", "objectives.mrfr=0", "objectives.itm=0"], "objectives"),
        (["deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
        (["data.batch_sise=8"], "data.batch_sise"),  # unknown key
        (["--config", "{tmp}/no-model.yaml"], "model.bert"),  # the required model section is missing
    ],
)
def test_pretrain(tmp_path, args, key):
    write(tmp_path / "no-model.yaml", "stages: [{name: a, shards: x.tar, eval_shards: y.tar, steps: 2}]\n")
    args = [a.format(tmp=tmp_path) for a in args]
    if "--config" not in args:
        args = ["--config", "configs/pretrain/quickstart.yaml", *args]
    result = run_guarded("pretrain", ["--run-dir", str(tmp_path / "run"), *args])
    assert_one_line_error(result, key)


@pytest.mark.parametrize(
    "args, key",
    [
        (["task.dropout=2"], "task.dropout"),
        (["fusion.name=bogus"], "fusion.name"),
        (["data.train="], "data.train"),  # required
        (["train.warmup_steps=-1"], "train.warmup_steps"),
        (["task.labels=[a]"], "task.labels"),  # unknown key
    ],
)
def test_finetune(tmp_path, args, key):
    config = ["--config", "configs/finetune/classification.yaml"]
    result = run_guarded("finetune", [*config, "--init", str(tmp_path / "release"), *args])
    assert_one_line_error(result, key)


def test_preprocess_synth(tmp_path):
    assert_one_line_error(run_guarded("preprocess", ["synth", "--out", str(tmp_path), "--num-samples", "0"]), "--num-samples")


def test_finetune_synth_tasks(tmp_path):
    args = ["--task", "classification", "--out", str(tmp_path), "--num-samples", "0"]
    assert_one_line_error(run_guarded("finetune.synth_tasks", args), "--num-samples")


@pytest.mark.parametrize("module", ["pretrain.export", "finetune.export"])
def test_export_of_a_missing_run(tmp_path, module):
    missing = str(tmp_path / "no-such-run")
    assert_one_line_error(run_guarded(module, ["--run", missing, "--out", str(tmp_path / "out")]), missing)


@pytest.mark.parametrize(
    "extra, key",
    [
        ([], "no-such-run"),  # the checkpoint is neither a run, a checkpoint nor an export
        (["--baselines", "{tmp}/missing.json"], "--baselines"),
        (["--baselines", "{tmp}/bad.json"], "--baselines"),
        (["--batch-size", "0"], "--batch-size"),
    ],
)
def test_finetune_evaluate(tmp_path, extra, key):
    write(tmp_path / "bad.json", '{"not": "a task.json"}')
    args = ["--checkpoint", str(tmp_path / "no-such-run"), "--data", str(tmp_path / "x.tar"), *extra]
    assert_one_line_error(run_guarded("finetune.evaluate", [a.format(tmp=tmp_path) for a in args]), key)


def test_the_guard_catches_a_heavy_import():
    """The check itself: a module that imports torch is stopped at that import."""
    result = run_guarded("pretrain.model", [])
    assert result.returncode == HEAVY_IMPORT_EXIT and "heavy import before the error: torch" in result.stderr, result.stderr


@pytest.mark.parametrize(
    "extra, key",
    [
        (["--release", "{tmp}/no-such-release", "--data", "{tmp}/data/00000.tar"], "no-such-release"),
        (["--release", "{tmp}", "--data", "{tmp}/data/{{00000..00001}}.tar"], "00001.tar does not exist"),
        (["--release", "{tmp}", "--data", "{tmp}/data/00000.tar", "--max-images", "1"], "--max-images"),
        (["--release", "{tmp}", "--data", "{tmp}/data/00000.tar", "--itm-samples", "0"], "--itm-samples"),
    ],
)
def test_pretrain_evaluate(tmp_path, extra, key):
    (tmp_path / "data").mkdir()
    write(tmp_path / "data" / "00000.tar", "")
    assert_one_line_error(run_guarded("pretrain.evaluate", [a.format(tmp=tmp_path) for a in extra]), key)


@pytest.mark.parametrize(
    "extra, key",
    [
        (["--annotations", "{tmp}/missing.json", "--split", "test"], "--annotations"),
        (["--annotations", "{tmp}/karpathy.json", "--split", "restval"], "--split"),
        (["--annotations", "{tmp}/karpathy.json", "--split", "test", "--include-restval"], "--include-restval"),
        (["--annotations", "{tmp}/karpathy.json", "--split", "test", "--samples-per-shard", "0"], "--samples-per-shard"),
    ],
)
def test_preprocess_from_captions(tmp_path, extra, key):
    write(tmp_path / "karpathy.json", '{"images": [], "dataset": "flickr30k"}')
    args = ["from-captions", *extra, "--images", str(tmp_path), "--out", str(tmp_path / "out")]
    assert_one_line_error(run_guarded("preprocess", [a.format(tmp=tmp_path) for a in args]), key)
