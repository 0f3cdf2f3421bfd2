"""``allreduce``: synchronous data parallelism through the engine's collective (gloo's or NCCL's all-reduce).

Like PyTorch's DDP, the gradient's sum runs in buckets started during backward (``patterns/buckets.py``), so most of
the communication hides behind computation. A step that needs the whole flat gradient takes the plain path of
``GradientAveraging``: observers on the taps (they are shown the gradient and the aggregate), a replica that rewrites
its gradient after backward (a malicious wrapper), or parameters of mixed dtypes.
"""

from __future__ import annotations

import torch

from ..replica import Replica
from .base import PATTERNS, GradientAveraging
from .buckets import GradBuckets


@PATTERNS.register("allreduce")
class AllReduce(GradientAveraging):
    name = "allreduce"
    encryption_note = "the engine's all-reduce adds plaintext tensors; use ring (threshold keys) or ps"
    buckets: GradBuckets | None = None

    def sum(self, flat: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(flat)

    def attach(self, replica: Replica) -> None:
        super().attach(replica)
        if _overlappable(replica):
            self.buckets = GradBuckets(replica.params, self.comm)

    def step(self, replica: Replica, x: torch.Tensor, y: torch.Tensor) -> float:
        if self.buckets is None or self.taps or self.comm.world_size == 1:
            return super().step(replica, x, y)
        self.buckets.arm()
        loss = replica.compute_gradients(x, y)
        self.buckets.flush()
        # BatchNorm statistics are final after forward (the optimizer never touches them): their sum starts now and
        # runs beside the optimizer step; averaging them after the step, as the plain path does, gives the same values
        stats = self.comm.all_reduce_async(replica.flat_buffers()) if replica.buffers else None
        self.buckets.finish()
        replica.step()
        if stats is not None:
            replica.set_flat_buffers(stats.wait().div_(self.comm.world_size))
        return loss

    def finish(self, replica: Replica) -> None:
        if self.buckets is not None:
            self.buckets.close()
            self.buckets = None


def _overlappable(replica: Replica) -> bool:
    """Whether each gradient, as backward accumulates it, is the one the step sends: not so for a replica whose
    ``compute_gradients`` rewrites gradients afterwards (attacks), nor for mixed dtypes (one flat bucket each)."""
    plain = type(replica).compute_gradients is Replica.compute_gradients
    return plain and bool(replica.params) and len({p.dtype for p in replica.params}) == 1
