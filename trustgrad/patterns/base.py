"""The one interface every communication pattern implements, and the registry that resolves ``--pattern``.

A pattern is one rank's side of a protocol. The worker loop (``trustgrad.train``) owns data, epochs, records and
hooks; it hands each batch to ``Pattern.step``, which computes, communicates and updates the replica. Ranks that do
not train (parameter servers) run ``Pattern.serve`` instead. Protections wrap patterns (docs/architecture.md §3): an
encryption codec wraps the payload, the prover wraps the step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from .. import protect
from ..comm import Comm
from ..config import RunConfig
from ..errors import ConfigError
from ..registry import Registry
from ..replica import Replica

__all__ = ["Pattern", "GradientAveraging", "PATTERNS"]


class Pattern(ABC):
    name: ClassVar[str]
    #: whether a worker may die mid-run and the job still finish (asynchronous patterns)
    tolerates_worker_loss: ClassVar[bool] = False
    #: what this pattern's protocol offers protections (``trustgrad.protect.CAPABILITIES``): which codecs, gates and
    #: proof modes it runs with follows from what they need
    offers: ClassVar[frozenset[str]] = frozenset()
    #: why it cannot carry an encrypted payload, shown when a codec's need is not offered
    encryption_note: ClassVar[str] = "it has no encrypted protocol"
    #: model parallelism cuts the model's ``nn.Sequential`` into stages or shards: a user's factory must return one
    splits_sequential: ClassVar[bool] = False

    def __init__(self, cfg: RunConfig, comm: Comm):
        self.cfg = cfg
        self.comm = comm
        #: observers of what crosses the wire, ``fn(kind, payload)``: the server-view recorder, audits
        self.taps: list[Callable[[str, Any], None]] = []
        #: the job's protections by name (``protect.build``, the one reader of the protection flags)
        self.protections = protect.build(cfg)

    @property
    def encrypted(self) -> bool:
        """What this rank sends is encrypted (observers are shown ciphertexts, not gradients)."""
        return self.protections.encrypted

    def tap(self, kind: str, payload: Any) -> None:
        """Show observers a payload this rank sends or receives (``"gradient"``, ``"aggregate"``, ...)."""
        for observe in self.taps:
            observe(kind, payload)

    # ------------------------------------------------------------------ job shape
    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """Every check a job's config must pass for this pattern: its protections' needs, then ``validate``."""
        protect.check(cfg, cls, {n: PATTERNS.get(n).offers for n in PATTERNS})
        if cls.splits_sequential:
            _require_sequential(cls.name, cfg)
        cls.validate(cfg)

    @classmethod
    def offers_for(cls, cfg: RunConfig) -> frozenset[str]:
        """What this job's shape offers (a schedule or checkpoints may take some of ``offers`` away)."""
        return cls.offers

    @classmethod
    def validate(cls, cfg: RunConfig) -> None:
        """Raise ``ConfigError`` for options this pattern cannot honour."""

    @classmethod
    def world_size(cls, cfg: RunConfig) -> int:
        """Processes the job needs (workers, plus servers or stages where the pattern has them)."""
        return cfg.workers

    @classmethod
    def may_lose(cls, cfg: RunConfig, rank: int) -> bool:
        """Whether the job goes on if ``rank`` dies mid-run (the launcher asks). Default: ``tolerates_worker_loss``."""
        return cls.tolerates_worker_loss

    @classmethod
    def data_shards(cls, cfg: RunConfig) -> int:
        """How many shards the training set is cut into (one per data-parallel worker)."""
        return cfg.workers

    @property
    def worker_index(self) -> int | None:
        """Index of this rank's data shard, or ``None`` for a rank that does not train."""
        return self.comm.rank

    @property
    def num_workers(self) -> int:
        return self.data_shards(self.cfg)

    @property
    def start_step(self) -> int:
        """Steps this worker already took before a resume (known after ``attach``); the loop skips them."""
        return 0

    @property
    def coordinator(self) -> int:
        """The rank that evaluates the model, shows progress and writes the run records."""
        return 0

    # ------------------------------------------------------------------ lifecycle
    def local_model(self, model: nn.Sequential) -> nn.Module:
        """The part of the freshly built model this rank holds and trains (default: all of it).

        Model-parallel patterns keep a pipeline stage or shard the weights here; the replica wraps what this returns.
        """
        return model

    def full_model(self, replica: Replica) -> nn.Module:
        """The whole model to evaluate and save, on the coordinator (other ranks' return values are not used).

        Called on every training rank whenever the loop evaluates, so model-parallel patterns may gather in it.
        """
        return replica.model

    def attach(self, replica: Replica) -> None:
        """Called once before training. Default: every replica starts from the coordinator's weights."""
        flat = replica.flat_params()
        self.comm.broadcast(flat, src=0)
        replica.set_flat_params(flat)

    @abstractmethod
    def step(self, replica: Replica, x: torch.Tensor, y: torch.Tensor) -> float:
        """One training step on this worker's batch; returns the local loss."""

    def epoch_end(self, replica: Replica, epoch: int) -> dict[str, Any]:
        """Called on every training rank after each epoch; the coordinator's fields join that epoch's metrics line
        (e.g. the consensus distance of decentralized patterns)."""
        return {}

    def finish(self, replica: Replica) -> None:
        """Called once after the last step (e.g. a final merge)."""

    def serve(self) -> dict[str, Any]:
        raise NotImplementedError(f"pattern {self.name!r} has no server role")

    def stats(self) -> dict[str, Any]:
        """Extra fields for summary.json (staleness, rounds, ...)."""
        return {}


class GradientAveraging(Pattern):
    """Synchronous data parallelism: every step, replace the local gradient by the mean over workers, then step.

    With equal per-worker batch sizes this is exactly the gradient of the combined batch's mean loss, so W workers
    follow the trajectory of one process on the concatenated batches (tested to 1e-5).
    """

    offers = frozenset({"sync-rounds", "replicated-steps"})

    def step(self, replica: Replica, x: torch.Tensor, y: torch.Tensor) -> float:
        loss = replica.compute_gradients(x, y)
        flat = replica.flat_grad()
        if not self.encrypted:  # encrypted patterns tap the ciphertexts they send instead
            self.tap("gradient", flat)
        flat = self.sum(flat).div_(self.replicas())
        self.tap("aggregate", flat)
        replica.set_flat_grad(flat)
        replica.step()
        if replica.buffers:
            # BatchNorm running statistics: averaged like the gradient (through the same sum, so encrypted where the
            # gradient is), which keeps every replica's equal; the mean is exact for running means (docs/models.md)
            replica.set_flat_buffers(self.sum(replica.flat_buffers()).div_(self.replicas()))
        return loss

    def replicas(self) -> int:
        """How many replicas a sum adds up (the ranks still in the job: a ring may exclude a forger)."""
        return self.comm.world_size

    @abstractmethod
    def sum(self, flat: torch.Tensor) -> torch.Tensor:
        """Sum ``flat`` over all ranks (may work in place)."""


PATTERNS: Registry[type[Pattern]] = Registry("pattern")


def _require_sequential(pattern: str, cfg: RunConfig) -> None:
    """A user's model must be an ``nn.Sequential`` where a pattern cuts it (the zoo's always are)."""
    from ..data import load_dataset
    from ..factories import is_factory
    from ..models import build_model

    if not is_factory(cfg.model.name):
        return
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, cfg.seed, cfg.model)
    if not isinstance(model, nn.Sequential):
        raise ConfigError(
            f"pattern {pattern!r} cuts the model into stages of an nn.Sequential; {cfg.model.name!r} returned a "
            f"{type(model).__name__}: return an nn.Sequential, or use a data-parallel pattern"
        )
