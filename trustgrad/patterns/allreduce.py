"""``allreduce``: synchronous data parallelism through the engine's collective (gloo's or NCCL's all-reduce).

Like PyTorch's DDP, the gradient's sum runs in buckets started during backward (``patterns/buckets.py``), so most of
the communication hides behind computation. A rank whose step needs the whole gradient (observers on the taps are
shown it and the aggregate; a malicious wrapper rewrites it after backward) fills the same buckets after backward, so
its collectives still match its peers'. Parameters of mixed dtypes take the one flat all-reduce of
``GradientAveraging``.
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
        # every rank builds the same buckets (the same model), so every rank starts the same collectives in the same
        # order whichever path its step takes below
        if self.comm.world_size > 1 and len({p.dtype for p in replica.params}) == 1:
            # BatchNorm statistics ride in the last bucket when they share the parameters' dtype (they always do in
            # the zoo); otherwise their own collective follows the buckets
            ride = all(b.dtype == replica.params[0].dtype for b in replica.buffers)
            self.buckets = GradBuckets(replica.params, self.comm, buffers=replica.buffers if ride else None)

    def step(self, replica: Replica, x: torch.Tensor, y: torch.Tensor) -> float:
        if self.buckets is None:
            return super().step(replica, x, y)
        # observers are shown the whole gradient, and a replica that rewrites its gradient after backward (attacks)
        # sends the rewritten one: those ranks fill the buckets after backward instead of during it
        early = not self.taps and type(replica).compute_gradients is Replica.compute_gradients
        self.buckets.arm(early)
        # the buckets read every gradient in their hooks (or in ``flush``, where None counts as zeros) and ``finish``
        # writes every p.grad, so the gradients need not be zeroed first (only the plain Replica's takes the flag)
        loss = replica.compute_gradients(x, y, set_to_none=True) if early else replica.compute_gradients(x, y)
        if self.taps:
            self.tap("gradient", replica.flat_grad())
        self.buckets.flush()
        # BatchNorm statistics are final after forward (the optimizer never touches them): their mean arrives with
        # the last bucket's, or (another dtype) their sum starts now and runs beside the optimizer step; averaging
        # them before or after the step, as the plain path does, gives the same values
        alone = replica.buffers and not self.buckets.buffers
        stats = self.comm.all_reduce_async(replica.flat_buffers()) if alone else None
        self.buckets.finish()
        if self.taps:
            self.tap("aggregate", replica.flat_grad())
        replica.step()
        if stats is not None:
            replica.set_flat_buffers(stats.wait().div_(self.comm.world_size))
        return loss

    def finish(self, replica: Replica) -> None:
        if self.buckets is not None:
            self.buckets.close()
            self.buckets = None
