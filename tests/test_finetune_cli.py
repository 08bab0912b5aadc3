"""End to end: ``python -m finetune`` through DeepSpeed (1 rank, gloo), resume, then ``python -m finetune.evaluate``.

Also the feature-spec check (the run stops naming both sides) and the retrieval evaluation
against brute-force ranking of the full score matrix.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from finetune.config import DataConfig, EvalConfig, FinetuneConfig, TaskConfig
from finetune.data import TaskCollate, read_samples
from finetune.evaluation import evaluate_samples
from finetune.fusion import FusionConfig
from finetune.tasks import build_finetune_model
from pretrain.release import load_release
from pretrain_runs import free_port
from tests.finetune_fixtures import (
    per_image_layout,
    symbolic_spec,
    task_config_dict,
    tiny_release,
    write_symbolic_task_shards,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "finetune" / "classification.yaml"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    port = free_port()
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MASTER_PORT=str(port))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(name, None)
    return env


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune_cli")
    release = tiny_release(root / "release")
    write_symbolic_task_shards("classification", root / "data" / "train", 48, seed=1)
    write_symbolic_task_shards("classification", root / "data" / "val", 16, seed=2)
    return root, release


def _overrides(root: Path, steps: int) -> list[str]:
    return [
        f"shards_root={root / 'data'}", "data.train=train/00000.tar", "data.val=val/00000.tar",
        f"train.steps={steps}", "train.lr=1.0e-3", "train.warmup_steps=0", "data.batch_size=8", "data.num_workers=0",
        "data.max_text_length=24", "eval.every_steps=3", "checkpoint.every_steps=3", "logging.every_steps=2",
        "logging.progress_bar=false", "fusion.name=mbt", "fusion.mbt_fusion_layer=1",
    ]


@pytest.mark.slow
def test_finetune_resume_and_evaluate(workspace):
    root, release = workspace
    run_dir = root / "run"
    first = _run(["-m", "finetune", "--config", str(CONFIG), "--init", str(release), "--run-dir", str(run_dir),
                  *_overrides(root, 6)])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "global_step6"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]
    assert any((run_dir / "tb").iterdir())

    # A longer schedule resumes from step 6 instead of starting over.
    again = _run(["-m", "finetune", "--config", str(CONFIG), "--init", str(release), "--run-dir", str(run_dir),
                  "--resume", *_overrides(root, 9)])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed from global_step6" in again.stdout + again.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6, 9]
    trained = json.loads((run_dir / "results.json").read_text())
    assert trained["task"] == "classification" and trained["fusion"] == "mbt" and trained["step"] == 9

    # The evaluate CLI rebuilds the model from the run dir alone and measures the same thing.
    out = root / "eval" / "results.json"
    evaluated = _run(["-m", "finetune.evaluate", "--checkpoint", str(run_dir), "--data", str(root / "data" / "val" / "00000.tar"),
                      "--out", str(out)])
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["checkpoint"].endswith("global_step9") and result["num_samples"] == 16
    assert result["metrics"]["accuracy"] == pytest.approx(trained["metrics"]["accuracy"])
    assert result["metrics"]["macro_f1"] == pytest.approx(trained["metrics"]["macro_f1"])

    # Exported as a safetensors directory, the model evaluates the same without the run or DeepSpeed.
    exported = root / "exported"
    done = _run(["-m", "finetune.export", "--run", str(run_dir), "--out", str(exported)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {"config.json", "model.safetensors", "finetune_config.yaml", "feature_spec.json"} <= {p.name for p in exported.iterdir()}
    again = _run(["-m", "finetune.evaluate", "--checkpoint", str(exported), "--data", str(root / "data" / "val" / "00000.tar")])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    from_export = json.loads((exported / "results.json").read_text())
    assert from_export["checkpoint"] == str(exported)
    assert from_export["metrics"] == pytest.approx(result["metrics"])
    check = subprocess.run([sys.executable, "-c", _LOAD_EXPORT, str(exported)], cwd=REPO, env=_env(), capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0 and check.stdout.split() == ["FinetuneModel", "mbt", "no-deepspeed"], check.stderr[-3000:]


@pytest.mark.slow
def test_mi2p_foreign_extractor_stays_pretrained_through_training_checkpoint_and_export(workspace):
    """The project's trainer (DeepSpeed, AdamW over its parameter groups): MI2P's frozen foreign
    copy comes out of the checkpoint and the export bit-identical to the release's encoder, while
    the host encoder it was copied from has trained."""
    from finetune.export import export, load_finetuned
    from pretrain import checkpoint

    root, release = workspace
    run_dir = root / "run-mi2p"
    # fp32: under bf16 DeepSpeed casts the whole module, the frozen copy included (rounded once, then fixed).
    overrides = [o for o in _overrides(root, 3) if not o.startswith("fusion.")] + ["fusion.name=mi2p", "deepspeed.precision=fp32"]
    done = _run(["-m", "finetune", "--config", str(CONFIG), "--init", str(release), "--run-dir", str(run_dir), *overrides])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    pretrained = {k.removeprefix("imagebert."): v for k, v in load_release(release).model.state_dict().items()}
    weights = checkpoint.consolidated_weights(run_dir / "checkpoints", "global_step3")
    foreign = {k.removeprefix("fusion.foreign_encoder."): v for k, v in weights.items() if k.startswith("fusion.foreign_encoder.")}
    changed = [k for k, v in foreign.items() if not torch.equal(v, pretrained[k])]
    assert foreign and not changed, changed[:5]
    host = "bert.encoder.layer.0.output.dense.weight"
    assert not torch.equal(weights[f"fusion.encoder.{host}"], pretrained[host])
    model = load_finetuned(export(run_dir, root / "exported-mi2p")).model
    for name, param in model.fusion.foreign_encoder.named_parameters():
        assert torch.equal(param, pretrained[name]) and not param.requires_grad, name


_LOAD_EXPORT = """
import sys
from finetune.export import load_finetuned
finetuned = load_finetuned(sys.argv[1])
print(type(finetuned.model).__name__, finetuned.cfg.fusion.name, "deepspeed" if "deepspeed" in sys.modules else "no-deepspeed")
"""


def test_mismatched_feature_spec_stops_naming_both(workspace, tmp_path):
    root, release = workspace
    other = tiny_release(tmp_path / "release_1024", spec=replace(symbolic_spec(), feature_dim=24))
    result = _run(["-m", "finetune", "--config", str(CONFIG), "--init", str(other), "--run-dir", str(tmp_path / "run"),
                   *_overrides(root, 2)], timeout=120)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert "release_1024" in message and "train/00000.tar" in message and "feature_dim: 24 vs 16" in message
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before any heavy work


def test_retrieval_evaluation_matches_brute_force_ranking(tmp_path):
    torch.manual_seed(0)
    release = load_release(tiny_release(tmp_path / "release"))
    pattern = write_symbolic_task_shards("retrieval", tmp_path / "data", 7, seed=5, captions_per_image=2)
    task = TaskConfig(**task_config_dict("retrieval"))
    cfg = FinetuneConfig(task=task, data=DataConfig(train=pattern, max_text_length=24),
                         eval=EvalConfig(batch_size=5, retrieval_image_chunk=3, retrieval_caption_chunk=4))
    model = build_finetune_model(copy.deepcopy(release.model), task, FusionConfig(name="single_stream")).eval()
    samples = read_samples(pattern, release.tokenizer, symbolic_spec(), cfg.data, task)
    metrics = evaluate_samples(model, samples, cfg, release.tokenizer.pad_token_id, torch.device("cpu"))
    assert metrics["num_images"] == 7 and metrics["num_captions"] == 14

    # Brute force: score all 7 x 14 pairs in one batch, rank by sorting.
    collate = TaskCollate(release.tokenizer.pad_token_id, task)
    images = [samples[2 * i] for i in range(7)]
    pairs = [{**images[i], "input_ids": c["input_ids"]} for i in range(7) for c in samples]
    with torch.no_grad():
        scores = model.predict(collate(pairs)).view(7, 14)
    assert len(scores.unique()) == scores.numel()  # no ties: a hit is a plain rank check
    caption_image = torch.arange(14) // 2
    for k in (1, 5, 10):
        top_captions = torch.sort(scores, dim=1, descending=True).indices[:, :k]
        i2t = (caption_image[top_captions] == torch.arange(7)[:, None]).any(1).float().mean() * 100
        top_images = torch.sort(scores.T, dim=1, descending=True).indices[:, :k]
        t2i = (top_images == caption_image[:, None]).any(1).float().mean() * 100
        assert metrics[f"i2t_r{k}"] == pytest.approx(i2t.item(), abs=1e-4)
        assert metrics[f"t2i_r{k}"] == pytest.approx(t2i.item(), abs=1e-4)
    # a random model is not perfect, so the check above compares real rankings
    assert metrics["i2t_r1"] < 100 or metrics["t2i_r1"] < 100
    # The same images as one sample each with both captions (preprocess from-captions' layout): the same ranking.
    per_image = read_samples(per_image_layout(tmp_path / "data", tmp_path / "per-image"), release.tokenizer,
                             symbolic_spec(), cfg.data, task)
    assert len(per_image) == 7
    again = evaluate_samples(model, per_image, cfg, release.tokenizer.pad_token_id, torch.device("cpu"))
    assert again == pytest.approx(metrics, abs=1e-9)
