"""bench/zero_memory.py's CPU peak: the allocator's own total of live bytes, which counts a block
freed on another thread (gloo's workers free collectives' buffers) where the profiler's per-thread
free events miss it."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20


def zero_memory():
    spec = importlib.util.spec_from_file_location("bench_zero_memory", REPO / "bench" / "zero_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_peak_drops_a_block_freed_on_another_thread():
    bench = zero_memory()
    peaks = bench.PhasePeaks(on_cuda=False)
    held: list[torch.Tensor] = []
    bench.count_cpu_bytes_on_all_threads()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with peaks.phase("first"):
                held.append(torch.ones(8 * MiB, dtype=torch.uint8))
                freeing = threading.Thread(target=held.clear)  # the profiler does not follow this thread
                freeing.start()
                freeing.join()
            with peaks.phase("second"):
                block = torch.ones(4 * MiB, dtype=torch.uint8)
                del block
        peaks.read_profile(prof)
    finally:
        bench.count_cpu_bytes_on_all_threads(False)
    assert 8 * MiB <= peaks.peaks["first"] < 9 * MiB
    # Summing the events' sizes would give 12 MiB here: the 8 MiB block's free is not among them.
    assert 4 * MiB <= peaks.peaks["second"] < 5 * MiB
