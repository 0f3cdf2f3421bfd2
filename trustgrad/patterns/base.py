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
    #: CKKS key modes with which this pattern encrypts what it sends (empty: it cannot), and why not otherwise
    encryption_keys: ClassVar[frozenset[str]] = frozenset()
    encryption_note: ClassVar[str] = "it has no encrypted protocol"
    #: Proof-of-Learning modes this pattern supports (record: a proof of the global trajectory; audit/blind: per-claim)
    proof_modes: ClassVar[frozenset[str]] = frozenset()
    #: model parallelism cuts the model's ``nn.Sequential`` into stages or shards: a user's factory must return one
    splits_sequential: ClassVar[bool] = False

    def __init__(self, cfg: RunConfig, comm: Comm):
        self.cfg = cfg
        self.comm = comm
        #: observers of what crosses the wire, ``fn(kind, payload)``: the server-view recorder, audits
        self.taps: list[Callable[[str, Any], None]] = []

    def tap(self, kind: str, payload: Any) -> None:
        """Show observers a payload this rank sends or receives (``"gradient"``, ``"aggregate"``, ...)."""
        for observe in self.taps:
            observe(kind, payload)

    # ------------------------------------------------------------------ job shape
    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """Every check a job's config must pass for this pattern: the shared ones, then ``validate``."""
        if cfg.crypto.encrypt != "none" and cfg.crypto.keys not in cls.encryption_keys:
            able = [n for n in PATTERNS if cfg.crypto.keys in PATTERNS.get(n).encryption_keys]
            raise ConfigError(
                f"--encrypt {cfg.crypto.encrypt} --keys {cfg.crypto.keys} is not supported by pattern {cls.name!r} "
                f"({cls.encryption_note}); patterns that support it: {', '.join(able) or 'none'}"
            )
        if cfg.proof.mode != "none" and cfg.proof.mode not in cls.proof_modes:
            able = [n for n in PATTERNS if cfg.proof.mode in PATTERNS.get(n).proof_modes]
            raise ConfigError(
                f"--proof {cfg.proof.mode} is not supported by pattern {cls.name!r}; "
                f"patterns that support it: {', '.join(able) or 'none yet'}"
            )
        if cls.splits_sequential:
            _require_sequential(cls.name, cfg)
        cls.validate(cfg)

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

    proof_modes = frozenset({"record"})

    def step(self, replica: Replica, x: torch.Tensor, y: torch.Tensor) -> float:
        loss = replica.compute_gradients(x, y)
        flat = replica.flat_grad()
        if self.cfg.crypto.encrypt == "none":  # encrypted patterns tap the ciphertexts they send instead
            self.tap("gradient", flat)
        flat = self.sum(flat).div_(self.comm.world_size)
        self.tap("aggregate", flat)
        replica.set_flat_grad(flat)
        replica.step()
        if replica.buffers:
            # BatchNorm running statistics: averaged like the gradient (through the same sum, so encrypted where the
            # gradient is), which keeps every replica's equal; the mean is exact for running means (docs/models.md)
            replica.set_flat_buffers(self.sum(replica.flat_buffers()).div_(self.comm.world_size))
        return loss

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
