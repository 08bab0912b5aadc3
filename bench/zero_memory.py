"""ZeRO memory per rank: ZeRO-0, ZeRO-2, ZeRO-3 and ZeRO-2 with the optimizer offloaded to the CPU.

    python bench/zero_memory.py --json zero-memory.json                    # BERT-base, 2 ranks, fp32
    python bench/zero_memory.py --precision bf16 --buckets deepspeed       # DeepSpeed's 5e8-element buckets
    python bench/zero_memory.py --nproc 1                                  # one GPU: only the offload saves
    python bench/zero_memory.py --quick                                    # tiny model, 2 steps (the test)

Each configuration is one ``torchrun --nproc_per_node N`` launch (gloo on the CPU, nccl on CUDA) of
the trainer's engine (``pretrain.engine.build_engine``, the DeepSpeed config the trainer makes)
over an ImageBERT at BERT-base size (hidden 768, 12 layers, 12 heads, vocab 30522, 2048-d region
features, 40 tokens + 36 regions), a few training steps on a fixed batch. Each rank reports:

model states   bytes of the tensors the engine holds after a backward and after a step (the larger
               of the two), walked from the engine and counted once per storage, in four parts:
               params (the module's parameters; at ZeRO-3 this rank's partitions), grads (the
               module's .grad, the optimizer's gradient partitions), optimizer (fp32 master copies
               and Adam moments), and buffers (whatever else DeepSpeed holds: reduce buckets).
               Model states = params + grads + optimizer, what the ZeRO paper counts; buffers are
               shown beside them. Tensors are counted at their storage size, so an allocated but
               untouched bucket counts in full, as it would on a GPU.
peak allocated the most bytes live at once, activations and transient copies included, in the
               training steps (the table says whether in forward+backward or in the optimizer step)
               and, apart, while the model and engine were built (``PhasePeaks``). CUDA:
               ``torch.cuda.max_memory_allocated``. CPU: the same figure from the CPU allocator's
               own running total of live bytes, which the profiler's memory events carry
               (``profile_memory=True``), counted from just before the model was built. The
               allocator keeps that total across all threads only with c10's
               ``caffe2_report_cpu_memory_usage`` flag (``count_cpu_bytes_on_all_threads``): without
               it, a block freed on a gloo worker thread (where the last reference to a
               collective's buffer often drops) is never subtracted, and adding up the events'
               sizes instead counted such blocks as live for the rest of the run, by a different
               amount on each rank and in each run (hundreds of MiB at ZeRO-3).
peak RSS       growth of the process's peak resident set over its peak before the model was built.
               Includes what the allocators cache and what gloo/DeepSpeed hold outside torch, and
               counts only pages touched (an untouched bucket is free here): noisy at small sizes.

Beside them: the ZeRO paper's bytes per parameter (Psi parameters, N ranks; mixed precision with
Adam: 2+2+12 at stage 0, 2+(2+12)/N at stage 2, (2+2+12)/N at stage 3; fp32: 4+4+8, 4+(4+8)/N,
16/N). Ratios are each figure over ZeRO-0's, per rank (the largest rank).

Partitioning needs N >= 2 ranks, and two ranks cannot share one GPU under NCCL: on a machine with
one GPU run ``--nproc 1``, where only the offload saves device memory. On the CPU the offload moves
the optimizer to where it already is, so it changes little there; on either, the offloaded step
is the engine's own optimizer, torch's fused AdamW, on the host (nothing is compiled).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

# name -> (ZeRO stage, optimizer offloaded to the CPU)
CONFIGS = {"zero0": (0, False), "zero2": (2, False), "zero3": (3, False), "zero2-offload": (2, True)}
LABELS = {"zero0": "ZeRO-0", "zero2": "ZeRO-2", "zero3": "ZeRO-3", "zero2-offload": "ZeRO-2 + offload"}
# Two steps: the second backward is the first moment that gradients and Adam moments coexist.
BERT_BASE = {"hidden": 768, "layers": 12, "heads": 12, "vocab": 30522, "feature_dim": 2048, "text": 40, "regions": 36,
             "batch": 8, "steps": 2}
QUICK = {"hidden": 64, "layers": 2, "heads": 2, "vocab": 2000, "feature_dim": 64, "text": 8, "regions": 4,
         "batch": 2, "steps": 2}
MODEL_STATES = ("params", "grads", "optimizer")
PHASE_MARK = "zero_memory."  # profiler annotations of the phases (PhasePeaks)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="ranks per launch (1 on a one-GPU machine)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    p.add_argument("--buckets", choices=("deepspeed", "model"), default="model",
                   help="sized to the model (the engine's pretrain.engine.zero_buckets), or DeepSpeed's defaults")
    p.add_argument("--extra", default="{}", help="JSON merged last into the DeepSpeed config (a knob to try)")
    p.add_argument("--quick", action="store_true", help="tiny model, 2 steps (the test)")
    for name, value in BERT_BASE.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"default {value} ({QUICK[name]} with --quick)")
    p.add_argument("--classes", type=int, default=5, help="region classes of the MOC head")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one rank of one configuration
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else BERT_BASE).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def device() -> torch.device:
    return bench_pretrain().device()


# DeepSpeed's own defaults, which the engine replaces with sizes fitted to the model
# (pretrain.engine.zero_buckets): --buckets deepspeed puts them back to show what they cost.
DEEPSPEED_BUCKETS = {"zero_optimization": {
    "reduce_bucket_size": int(5e8), "allgather_bucket_size": int(5e8), "stage3_prefetch_bucket_size": int(5e7),
    "stage3_max_live_parameters": int(1e9), "stage3_max_reuse_distance": int(1e9),
}}


def analytic_bytes_per_param(precision: str, stage: int, offload: bool, ranks: int, on_cuda: bool) -> float:
    """The ZeRO paper's model-state bytes per parameter on this rank's device (params + grads + Adam)."""
    # k: fp32 master copy (bf16 only) and 2 moments. Without ZeRO, bf16 is autocast over fp32
    # weights (pretrain.engine.deepspeed_config): fp32's bytes, the same 16 in all.
    p, g, k = (2, 2, 12) if precision == "bf16" and stage > 0 else (4, 4, 8)
    if offload and on_cuda:
        return p  # gradients and optimizer go to the host; the device keeps the working parameters
    return {0: p + g + k, 1: p + g + k / ranks, 2: p + (g + k) / ranks, 3: (p + g + k) / ranks}[stage]


# ---------------------------------------------------------------- one rank


@functools.cache
def bench_pretrain():
    """bench/pretrain.py, for its model and batch (loaded by path: as a module it would be named
    ``pretrain``, which is the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_pretrain", REPO / "bench" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(args, stage: int, offload: bool):
    """The trainer's engine (``build_engine`` from a job config, as bench/pretrain.py's TrainerLoop
    does) at this ZeRO stage, with the step the pretraining trainer runs."""
    from preprocess.config import from_dict, merge
    from pretrain.config import PretrainConfig
    from pretrain.engine import build_engine
    from pretrain.trainer import pretraining_step

    model = bench_pretrain().imagebert(args)
    num_params = sum(p.numel() for p in model.parameters())
    extra = merge(DEEPSPEED_BUCKETS if args.buckets == "deepspeed" else {}, json.loads(args.extra))
    if offload:
        extra = merge(extra, {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}})
    cfg = from_dict(PretrainConfig, {
        "model": {"bert_config": {}, "tokenizer": "unused"},
        "data": {"batch_size": args.batch},
        "stages": [{"name": "bench", "shards": "x.tar", "eval_shards": "y.tar", "steps": 10**6, "warmup_steps": 10}],
        "deepspeed": {"zero_stage": stage, "precision": args.precision, "gradient_clipping": 1.0, "extra": extra},
    })
    engine = build_engine(model, cfg.deepspeed, cfg.stages[0], args.batch, Path("unused"))
    return engine, pretraining_step(cfg.objectives), num_params


def storage_key(t: torch.Tensor):
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes(), t.device


class StateCounter:
    """Adds up the storages the engine holds, each once, in the first category that reaches it."""

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.seen: set[int] = set()
        self.bytes = {name: 0 for name in (*MODEL_STATES, "buffers")}
        self.host_bytes = 0  # tensors on the CPU when the device is a GPU (the offload)
        self.buffers: dict[str, int] = {}  # buffers by the attribute that holds them

    def add(self, category: str, t: torch.Tensor | None, where: str = "") -> None:
        if t is None or t.device.type == "meta":
            return
        ptr, nbytes, dev = storage_key(t)
        if nbytes == 0 or ptr in self.seen:
            return
        self.seen.add(ptr)
        if dev.type != self.dev.type:
            self.host_bytes += nbytes
            return
        self.bytes[category] += nbytes
        if category == "buffers":
            self.buffers[where] = self.buffers.get(where, 0) + nbytes

    def count(self, engine) -> None:
        basic = engine.basic_optimizer
        params = list(engine.module.parameters())
        for p in params:
            self.add("params", p)
            self.add("params", getattr(p, "ds_tensor", None))  # ZeRO-3: this rank's partition
        for p in params:
            self.add("grads", p.grad)
        masters = [q for group in basic.param_groups for q in group["params"]]
        for q in masters:
            self.add("grads", q.grad)  # ZeRO-1/2/3: this rank's fp32 gradient partition
        for q in masters:
            self.add("optimizer", q)  # the fp32 master copy (the module's own parameter at fp32 ZeRO-0)
        for master, state in basic.state.items():
            self.add("optimizer", master)  # keyed by the master partitions ZeRO-3 swaps into param_groups
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    self.add("optimizer", value)
        # Everything else the ZeRO optimizer holds, by attribute: gradient partitions, buckets, flat buffers.
        if engine.optimizer is not basic:
            for name, value in vars(engine.optimizer).items():
                category = "grads" if "grad" in name and "ipg" not in name and "bucket" not in name else "buffers"
                for t in reachable_tensors(value):
                    self.add(category, t, name)


def reachable_tensors(root) -> list[torch.Tensor]:
    """Tensors reachable from ``root`` through containers and DeepSpeed/torch.optim objects."""
    found, stack, seen = [], [root], set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
            if obj.is_leaf and obj.grad is not None:
                stack.append(obj.grad)
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif type(obj).__module__.startswith(("deepspeed.", "torch.optim")) and hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return found


def engine_state(engine) -> dict:
    counter = StateCounter(device())
    counter.count(engine)
    return {"bytes": counter.bytes, "model_states": sum(counter.bytes[c] for c in MODEL_STATES),
            "host_bytes": counter.host_bytes,
            "buffers_by_attribute": dict(sorted(counter.buffers.items(), key=lambda kv: -kv[1])[:6])}


def count_cpu_bytes_on_all_threads(on: bool = True) -> None:
    """Make c10's CPU allocator keep its total of live bytes over every thread (its
    ``caffe2_report_cpu_memory_usage`` flag, which torch exposes to no Python API), so that the
    profiler's memory events carry the true total. Blocks allocated before this call are not in it."""
    import ctypes

    libc10 = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libc10.so"))
    ctypes.c_bool.in_dll(libc10, "FLAGS_caffe2_report_cpu_memory_usage").value = on


class PhasePeaks:
    """The most bytes allocated at once in each phase of the run: "build" (model and engine),
    "forward_backward" and "optimizer_step" (the latter two over all steps). CUDA: the allocator's
    peak, reset at each phase's start. CPU: the largest total of live bytes the CPU allocator
    reported with an event in the phase (``count_cpu_bytes_on_all_threads``), less its total
    when the profile started. Events come from the threads the profiler follows: a transient
    block a gloo thread allocates and frees between two of them is not seen."""

    def __init__(self, on_cuda: bool):
        self.on_cuda = on_cuda
        self.peaks: dict[str, int] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.on_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with torch.profiler.record_function(PHASE_MARK + name):
            yield
        if self.on_cuda:
            torch.cuda.synchronize()
            self.peaks[name] = max(self.peaks.get(name, 0), torch.cuda.max_memory_allocated())

    def read_profile(self, prof) -> None:
        from torch._C._profiler import _EventType

        marks, memory = [], []
        pending = list(prof.profiler.kineto_results.experimental_event_tree())
        while pending:
            event = pending.pop()
            pending.extend(event.children)
            if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
                fields = event.extra_fields
                memory.append((event.start_time_ns, fields.total_allocated, fields.alloc_size))
            elif event.tag == _EventType.TorchOp and event.name.startswith(PHASE_MARK):
                marks.append((event.start_time_ns, event.end_time_ns, event.name[len(PHASE_MARK):]))
        marks.sort()
        memory.sort()
        if not memory:
            return
        before = memory[0][1] - memory[0][2]  # live when the profile began (blocks from before the flag aside)
        m = 0
        for start, total, _ in memory:
            while m < len(marks) and marks[m][1] < start:
                m += 1
            if m < len(marks) and marks[m][0] <= start:
                name = marks[m][2]
                self.peaks[name] = max(self.peaks.get(name, 0), total - before)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(args) -> None:
    import deepspeed
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    stage, offload = CONFIGS[args.worker]
    on_cuda = torch.cuda.is_available()
    if on_cuda:
        torch.cuda.set_device(device())
    deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo", verbose=False)
    rss_before = peak_rss_bytes()
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    # CPU: the profiler's allocator events give the peak; it records nothing else we need.
    if not on_cuda:
        count_cpu_bytes_on_all_threads()
    tracing = contextlib.nullcontext() if on_cuda else profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    states = []
    peaks = PhasePeaks(on_cuda)
    with tracing as prof:
        # Building has its own peak (ZeRO-3 partitions a model first built whole on every rank;
        # ``deepspeed.zero.Init`` would avoid that), reported apart from the steps'.
        with peaks.phase("build"):
            engine, step_fn, num_params = build(args, stage, offload)
            batch = bench_pretrain().make_batch(args, device())
        for _ in range(args.steps):
            with peaks.phase("forward_backward"):
                losses = step_fn(engine, batch)
                engine.backward(losses["loss"])
            states.append(engine_state(engine))  # gradients held, before the step frees or reduces them
            with peaks.phase("optimizer_step"):
                engine.step()
            states.append(engine_state(engine))  # optimizer states held
    if not on_cuda:
        peaks.read_profile(prof)
    steps_phase = max(("forward_backward", "optimizer_step"), key=lambda name: peaks.peaks[name])
    state = max(states, key=lambda s: s["model_states"] + s["bytes"]["buffers"])
    result = {
        "config": args.worker, "rank": dist.get_rank(), "world_size": dist.get_world_size(), "params": num_params,
        "model_states": state["model_states"], "state_bytes": state["bytes"], "buffers_by_attribute": state["buffers_by_attribute"],
        "host_state_bytes": state["host_bytes"],
        "peak_allocated": peaks.peaks[steps_phase], "peak_allocated_in": steps_phase,
        "peak_allocated_build": peaks.peaks["build"], "peak_allocated_by_phase": peaks.peaks,
        "peak_rss_growth": peak_rss_bytes() - rss_before,
        "analytic_bytes_per_param": analytic_bytes_per_param(args.precision, stage, offload, dist.get_world_size(), on_cuda),
        "final_loss": losses["loss"].detach().item(),
    }
    # One write, newline included: the ranks share the pipe, and print() writes the text and its
    # end separately when stdout is unbuffered, so two ranks' lines could run into one.
    sys.stdout.write("ZEROMEM " + json.dumps(result) + "\n")
    sys.stdout.flush()
    dist.barrier()


# ---------------------------------------------------------------- the launches


def launch(args, name: str) -> list[dict]:
    """One torchrun of ``name``; each rank's result, by rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--standalone",  # torchrun's own rendezvous on a free local port
           str(Path(__file__).resolve()), "--worker", name, "--precision", args.precision, "--buckets", args.buckets,
           "--classes", str(args.classes), "--extra", args.extra]
    for field in BERT_BASE:
        cmd += ["--" + field.replace("_", "-"), str(getattr(args, field))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.setdefault("OMP_NUM_THREADS", "1")  # ranks share the cores
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    ranks = [json.loads(line[len("ZEROMEM "):]) for line in proc.stdout.splitlines() if line.startswith("ZEROMEM ")]
    if len(ranks) != args.nproc:
        raise RuntimeError(f"{name}: {len(ranks)} of {args.nproc} ranks reported:\n{proc.stdout[-3000:]}")
    return sorted(ranks, key=lambda r: r["rank"])


def machine() -> dict:
    import deepspeed

    from preprocess.launch_env import cpu_info

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu: {cpu_info().get('model name', '?')}"
    return {"load_average": os.getloadavg(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "device": device}


def summarise(runs: dict[str, list[dict]]) -> list[dict]:
    """One row per configuration: the largest rank's figures and their ratios to ZeRO-0's."""
    figures = ("model_states", "buffers", "peak_allocated", "peak_allocated_build", "peak_rss_growth")
    rows = []
    for name, ranks in runs.items():
        row = {"config": name, "params": ranks[0]["params"],
               "analytic_bytes_per_param": ranks[0]["analytic_bytes_per_param"],
               "analytic_model_states": ranks[0]["analytic_bytes_per_param"] * ranks[0]["params"],
               "host_state_bytes": max(r["host_state_bytes"] for r in ranks),
               "peak_allocated_in": max(ranks, key=lambda r: r["peak_allocated"])["peak_allocated_in"]}
        for fig in figures:
            row[fig] = max(r["state_bytes"]["buffers"] if fig == "buffers" else r[fig] for r in ranks)
        rows.append(row)
    base = next((r for r in rows if r["config"] == "zero0"), None)
    for row in rows:
        for fig in ("analytic_model_states", "model_states", "peak_allocated", "peak_allocated_build", "peak_rss_growth"):
            row[fig + "_ratio"] = row[fig] / base[fig] if base and base[fig] else None
    return rows


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def ratio(x: float | None) -> str:
    return "" if x is None else f" ({x:.2f}x)"


def table(rows: list[dict]) -> str:
    lines = [
        ("| configuration | ZeRO paper: bytes/param, per rank | model states (params+grads+optimizer)"
         " | DeepSpeed buffers | peak allocated, steps | peak allocated, building | peak RSS growth |"),
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {LABELS[r['config']]} | {r['analytic_bytes_per_param']:g} B: {mib(r['analytic_model_states'])}"
            f"{ratio(r['analytic_model_states_ratio'])} | {mib(r['model_states'])}{ratio(r['model_states_ratio'])}"
            f" | {mib(r['buffers'])} | {mib(r['peak_allocated'])}{ratio(r['peak_allocated_ratio'])}, {r['peak_allocated_in']}"
            f" | {mib(r['peak_allocated_build'])}{ratio(r['peak_allocated_build_ratio'])}"
            f" | {mib(r['peak_rss_growth'])}{ratio(r['peak_rss_growth_ratio'])} |"
        )
    return "\n".join(lines)


def notes(args, on_cuda: bool) -> list[str]:
    out = []
    if args.nproc == 1:
        out.append("1 rank: ZeRO partitions over ranks, so stages 2 and 3 save nothing here; only the offload "
                   "moves optimizer state off the device.")
    if "zero2-offload" in args.configs and not on_cuda:
        out.append("CPU run: the offload moves the optimizer state to the CPU, where it already is; expect little change.")
    if args.buckets == "deepspeed":
        out.append("Buckets at DeepSpeed's defaults (reduce_bucket_size 5e8 elements): the ZeRO-2/3 reduce bucket is "
                   "allocated in full and counted under buffers and peak allocated (the engine sizes them to the model).")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    on_cuda = torch.cuda.is_available()
    if on_cuda and args.nproc > torch.cuda.device_count():
        raise SystemExit(f"--nproc {args.nproc} needs {args.nproc} GPUs (NCCL ranks cannot share one); "
                         f"this machine has {torch.cuda.device_count()}: use --nproc 1")
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; choose from {list(CONFIGS)}")
    result = {"machine": machine(), "nproc": args.nproc, "precision": args.precision, "buckets": args.buckets,
              "extra": json.loads(args.extra),
              "shape": {f: getattr(args, f) for f in (*BERT_BASE, "classes")}}
    runs = {}
    for name in names:
        print(f"{LABELS[name]}: launching {args.nproc} ranks ...", file=sys.stderr, flush=True)
        runs[name] = launch(args, name)
    result["machine"]["load_average_after"] = os.getloadavg()
    result["ranks"] = runs
    result["rows"] = summarise(runs)
    result["notes"] = notes(args, on_cuda)
    print(f"{result['machine']['device']}, {args.nproc} ranks, {args.precision}, "
          f"{result['rows'][0]['params'] / 1e6:.1f} M parameters, buckets: {args.buckets}; "
          f"load average {result['machine']['load_average'][0]:.2f} before, {result['machine']['load_average_after'][0]:.2f} after")
    print(table(result["rows"]))
    for line in result["notes"]:
        print("- " + line)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
