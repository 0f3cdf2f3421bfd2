"""``allreduce``: synchronous data parallelism through the engine's collective (gloo's or NCCL's all-reduce)."""

from __future__ import annotations

import torch

from .base import PATTERNS, GradientAveraging


@PATTERNS.register("allreduce")
class AllReduce(GradientAveraging):
    name = "allreduce"
    encryption_note = "the engine's all-reduce adds plaintext tensors; use ring (threshold keys) or ps"

    def sum(self, flat: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(flat)
