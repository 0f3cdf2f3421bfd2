"""Vertical model parallelism: a pipeline of layer stages on consecutive ranks, fed micro-batches.

GPipe (Huang et al. 2019) splits each mini-batch into M micro-batches and runs all forwards, then all backwards;
1F1B (PipeDream-Flush, Narayanan et al. 2021) alternates one forward and one backward after a warm-up, which keeps at
most S micro-batches' activations alive instead of M. Both leave each of S equal stages idle for a fraction
(S-1)/(M+S-1) of a step (the bubble). Gradients are accumulated over the micro-batches and, with torch's default
``scale_grads=True``, divided by M: with a mean loss per micro-batch and equal micro-batches that is exactly the
gradient of the mini-batch's mean loss, so one pipeline step equals one step of the whole model in one process.

The schedules are torch.distributed.pipelining's (``PipelineStage``, ``ScheduleGPipe``, ``Schedule1F1B``); every
point-to-point wait carries the process group's timeout. ``StageTimer`` measures each stage's busy time around its
forward and backward compute, which gives the measured bubble.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from ..errors import ConfigError
from ..registry import Registry

__all__ = ["SCHEDULES", "Pipeline", "StageTimer", "theoretical_bubble"]

SCHEDULES: Registry[type] = Registry("pipeline schedule")
SCHEDULES.register("gpipe")(ScheduleGPipe)
SCHEDULES.register("1f1b")(Schedule1F1B)


def theoretical_bubble(stages: int, microbatches: int) -> float:
    """Idle fraction of each of S equal stages under GPipe or 1F1B with M micro-batches: (S-1)/(M+S-1)."""
    return (stages - 1) / (microbatches + stages - 1)


@dataclass
class StageTimer:
    """Busy seconds of one stage: wall time inside its forward and backward compute (communication excluded)."""

    forward: float = 0.0
    backward: float = 0.0
    calls: int = 0

    @property
    def busy(self) -> float:
        return self.forward + self.backward

    def wrap(self, stage: PipelineStage) -> None:
        """Time the stage's per-micro-batch compute; the schedule's sends and receive-waits stay outside."""
        stage.forward_one_chunk = self._timed(stage.forward_one_chunk, "forward")  # type: ignore[method-assign]
        stage.backward_one_chunk = self._timed(stage.backward_one_chunk, "backward")  # type: ignore[method-assign]

    def _timed(self, fn: Callable, which: str) -> Callable:
        def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                setattr(self, which, getattr(self, which) + time.perf_counter() - start)
                self.calls += 1

        return timed


@dataclass
class Pipeline:
    """One rank's stage of a pipeline: ``step(x, y)`` runs a schedule over the mini-batch and returns its mean loss.

    ``x`` is read on the first stage only and ``y`` on the last; all stages are given the same mini-batch.
    ``group`` is the pipeline's process group (the default group, or one replica's ranks in data x pipeline).
    """

    module: nn.Module
    stage_index: int
    num_stages: int
    microbatches: int
    schedule: str
    group: dist.ProcessGroup | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timer: StageTimer | None = None

    def __post_init__(self) -> None:
        stage = PipelineStage(self.module, self.stage_index, self.num_stages, self.device, group=self.group)
        if self.timer is not None:
            self.timer.wrap(stage)
        self.stage = stage
        self.runner = SCHEDULES.get(self.schedule)(stage, self.microbatches, loss_fn=nn.functional.cross_entropy)
        self.bytes_sent, self._in_chunk = 0, False
        self.module.register_forward_hook(self._count_bytes)
        forward_one_chunk = stage.forward_one_chunk

        def flagged(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self._in_chunk = True  # the schedule's forwards only; shape inference sends nothing
            try:
                return forward_one_chunk(*args, **kwargs)
            finally:
                self._in_chunk = False

        stage.forward_one_chunk = flagged  # type: ignore[method-assign]

    def _count_bytes(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        # per micro-batch, a stage sends its activation forward and the gradient w.r.t. its input (same size) back
        if not self._in_chunk:
            return
        if not self.is_last:
            self.bytes_sent += _nbytes(output)
        if not self.is_first:
            self.bytes_sent += sum(_nbytes(t) for t in inputs if isinstance(t, torch.Tensor))

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float | None:
        """Forward and backward of every micro-batch; leaves the mini-batch gradient in ``p.grad``.

        Returns the mean loss on the last stage, None elsewhere.
        """
        if len(x) % self.microbatches:
            raise ConfigError(f"--microbatches {self.microbatches} must divide the batch size {len(x)}")
        losses: list[torch.Tensor] = []
        if self.is_first and self.is_last:
            self.runner.step(x, target=y, losses=losses)
        elif self.is_first:
            self.runner.step(x)
        elif self.is_last:
            self.runner.step(target=y, losses=losses)
        else:
            self.runner.step()
        if not self.is_last:
            return None
        return float(torch.stack([loss.detach() for loss in losses]).mean())


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
