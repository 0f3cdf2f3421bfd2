"""``local-sgd``: exploration then exploitation — H local SGD steps on every worker, then a merge of the replicas.

Communicating every H steps instead of every step cuts the bytes by H (Stich 2019, "Local SGD converges fast and
communicates little"; Lin et al. 2020). Each worker keeps its own momentum buffer across merges. Two merges
(``--merge``), each a small class in ``MERGES``:

``average``
    All-reduce of the parameters, divided by W: after the merge every replica is the mean (model averaging).

``elastic``
    Synchronous elastic averaging SGD (EASGD, Zhang, Choromanska & LeCun 2015, Eq. 5-6 with tau = H). A center
    variable c lives on rank 0, next to its worker: no extra process, and rank 0 already coordinates. A merge round:

    1. every worker i != 0 sends x_i to rank 0; rank 0 sends back the current center c (point-to-point);
    2. every worker moves toward the center: x_i <- x_i - alpha (x_i - c);
    3. rank 0 moves the center toward the workers' mean: c <- c + alpha (mean_i x_i - c).

    The paper's symmetric force moves c by p*alpha (beta = p alpha); for alpha > 1/p (the default 0.5 with 4
    workers) that overshoots and the center diverges. Moving c by alpha (beta = alpha) has the same fixed point and
    is stable for every alpha in (0, 1) and any worker count: without gradients the gap between the workers' mean
    and the center shrinks by |1 - 2 alpha| per round. The run reports the center, as EASGD does.

Bytes: ``average`` sends 2 (W-1)/W P per rank per merge (ring all-reduce accounting), the same as ``allreduce`` per
step; ``elastic`` sends 2 (W-1) P in total per merge, again what ``allreduce`` sends per step. So local SGD's
``bytes_sent`` is 1/H of ``allreduce``'s for the same steps (plus one final merge when H does not divide them).
"""

from __future__ import annotations

from typing import Any

import torch

from ..comm import Comm
from ..config import RunConfig
from ..errors import ConfigError
from ..registry import Registry
from ..replica import Replica
from ..tags import LOCAL_SGD_MERGE
from .base import PATTERNS, Pattern
from .consensus import ConsensusMonitor

__all__ = ["LocalSGD", "MERGES", "Average", "Elastic"]

MERGES: Registry[type] = Registry("merge")

_MERGE_TAG = LOCAL_SGD_MERGE  # + round: point-to-point tags of elastic rounds (trustgrad.tags)


@MERGES.register("average")
class Average:
    reports = "the average of all replicas (identical after the final merge)"

    def __init__(self, comm: Comm, alpha: float):
        self.comm = comm

    def __call__(self, flat: torch.Tensor, round_: int) -> torch.Tensor:
        return self.comm.all_reduce(flat).div_(self.comm.world_size)

    def final(self, flat: torch.Tensor) -> torch.Tensor:
        return flat


@MERGES.register("elastic")
class Elastic:
    reports = "the EASGD center variable (held by rank 0)"

    def __init__(self, comm: Comm, alpha: float):
        self.comm, self.alpha = comm, alpha
        self.center: torch.Tensor | None = None

    def __call__(self, flat: torch.Tensor, round_: int) -> torch.Tensor:
        comm, tag = self.comm, _MERGE_TAG + round_
        if comm.rank != 0:
            center = torch.empty_like(flat)
            pending = [comm.isend(flat, 0, tag), comm.irecv(center, 0, tag)]
            for work in pending:
                comm.wait(work)
            return flat - self.alpha * (flat - center)
        if self.center is None:
            self.center = flat.clone()  # every replica starts from rank 0's W0 (Pattern.attach)
        peers = range(1, comm.world_size)
        bufs = [torch.empty_like(flat) for _ in peers]
        pending = [comm.irecv(b, p, tag) for b, p in zip(bufs, peers)]
        pending += [comm.isend(self.center, p, tag) for p in peers]
        for work in pending:
            comm.wait(work)
        mean = torch.stack([flat, *bufs]).mean(0)
        moved = flat - self.alpha * (flat - self.center)
        self.center = self.center + self.alpha * (mean - self.center)
        return moved

    def final(self, flat: torch.Tensor) -> torch.Tensor:
        return self.center if self.center is not None else flat


@PATTERNS.register("local-sgd")
class LocalSGD(Pattern):
    name = "local-sgd"

    @classmethod
    def validate(cls, cfg: RunConfig) -> None:
        p = cfg.pattern
        MERGES.get(p.merge)
        if p.local_steps < 1:
            raise ConfigError(f"local_steps (H) must be >= 1, got {p.local_steps}")
        if not 0.0 < p.alpha < 1.0:
            raise ConfigError(f"alpha must be in (0, 1), got {p.alpha}")

    def attach(self, replica: Replica) -> None:
        super().attach(replica)
        p = self.cfg.pattern
        self.merge = MERGES.get(p.merge)(self.comm, p.alpha)
        self.monitor = ConsensusMonitor(self.comm, self.coordinator, p.peer_timeout, list(range(self.num_workers)))
        self.steps = self.rounds = 0

    def step(self, replica: Replica, x: torch.Tensor, y: torch.Tensor) -> float:
        loss = replica.compute_gradients(x, y)
        replica.step()
        self.steps += 1
        if self.steps % self.cfg.pattern.local_steps == 0:
            self._merge(replica)
        return loss

    def _merge(self, replica: Replica) -> None:
        replica.set_flat_params(self.merge(replica.flat_params(), self.rounds))
        if replica.buffers and isinstance(self.merge, Average):
            # model averaging averages BatchNorm statistics too; elastic workers keep their own (docs/models.md)
            replica.set_flat_buffers(self.comm.all_reduce(replica.flat_buffers()).div_(self.comm.world_size))
        self.rounds += 1

    def epoch_end(self, replica: Replica, epoch: int) -> dict[str, Any]:
        measured = self.monitor.gather(replica.flat_params())
        return measured.record() if measured else {}

    def finish(self, replica: Replica) -> None:
        if self.steps % self.cfg.pattern.local_steps:  # the last exploration phase is merged too
            self._merge(replica)
        self.monitor.gather(
            replica.flat_params(), final=True
        )  # final consensus distance, before rank 0 takes the center
        if self.comm.rank == self.coordinator:
            replica.set_flat_params(self.merge.final(replica.flat_params()))

    def stats(self) -> dict[str, Any]:
        p = self.cfg.pattern
        return {
            "merge": p.merge,
            "local_steps": p.local_steps,
            **({"alpha": p.alpha} if p.merge == "elastic" else {}),
            "communication_rounds": self.rounds,
            "reported_model": self.merge.reports,
            **self.monitor.stats(),
        }
