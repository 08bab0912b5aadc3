"""Averaging gradients over the ranks while the backward still runs, at ZeRO-0 (as DDP does).

Without ZeRO, DeepSpeed all-reduces the gradients in one pass after the backward: a flat copy of
all of them, the all-reduce, a copy back, while the ranks compute nothing (two CPU ranks at the
reference shape of ``bench/pretrain.py``: 0.93-0.94 of DDP's rate). Here gradients go out in
buckets of about 25 MB (DDP's default) as the backward produces them, each as soon as it is
complete, asynchronously; the optimizer's step waits for them. Buckets go out in the same order on
every rank (a collective is matched by its order): a bucket waits for the ones before it, and a
bucket with a parameter that got no gradient this step goes out at the step with zeros there, as
DeepSpeed's own reduction does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

BUCKET_BYTES = 25 * 2**20


class OverlappedGradientAverage:
    """Registers on ``model``'s trainable parameters and ``optimizer``; ``is_boundary()`` says
    whether this backward ends a gradient-accumulation cycle (only then are gradients averaged)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, is_boundary) -> None:
        self.is_boundary = is_boundary
        self.world_size = dist.get_world_size()
        # The backward produces gradients roughly in the reverse of the parameters' order.
        self.buckets: list[list[nn.Parameter]] = [[]]
        size = 0
        for param in reversed([p for p in model.parameters() if p.requires_grad]):
            if size >= BUCKET_BYTES:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(param)
            size += param.numel() * param.element_size()
        self.bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        self._reset()
        for bucket in self.buckets:
            for param in bucket:
                param.register_post_accumulate_grad_hook(self._gradient_ready)
        # Register before gradient clipping's pre-step hook: hooks run in order, and the clipping
        # must see the averages.
        optimizer.register_step_pre_hook(lambda *_: self.finish())

    def _reset(self) -> None:
        self.missing = [len(bucket) for bucket in self.buckets]
        self.launched: list[tuple[torch.Tensor, dist.Work]] = []

    def _gradient_ready(self, param: nn.Parameter) -> None:
        if not self.is_boundary():
            return
        self.missing[self.bucket_of[id(param)]] -= 1
        while len(self.launched) < len(self.buckets) and self.missing[len(self.launched)] == 0:
            self._launch(len(self.launched))

    def _launch(self, index: int) -> None:
        bucket = self.buckets[index]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
        flat.div_(self.world_size)
        self.launched.append((flat, dist.all_reduce(flat, async_op=True)))

    def finish(self) -> None:
        """Launch what the backward did not complete, wait for all, write the averages back."""
        while len(self.launched) < len(self.buckets):
            self._launch(len(self.launched))
        for bucket, (flat, work) in zip(self.buckets, self.launched):
            work.wait()
            offset = 0
            for param in bucket:
                averaged = flat[offset : offset + param.numel()].view_as(param)
                if param.grad is None:
                    param.grad = averaged.clone()
                else:
                    param.grad.copy_(averaged)
                offset += param.numel()
        self._reset()
