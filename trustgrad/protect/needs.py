"""What protections need and patterns offer (capabilities), and the registries of protections (``catalog``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import RunConfig
from ..registry import Registry

__all__ = ["CAPABILITIES", "Need", "Spec", "CODECS", "GATES", "PROOFS"]

#: what a pattern may offer, and what each word promises
CAPABILITIES = {
    "codec-payload": "what it sends passes through the job's codec (encode, decode, combine, reveal)",
    "keyless-aggregator": "a party that holds no key combines what the others send",
    "sync-rounds": "one update per worker per round, applied together",
    "no-plaintext-state": "nothing but the key holders keeps model or optimizer state (no server momentum, no "
    "server checkpoints)",
    "per-claim": "each worker's update reaches a receiver as a claim of its own (worker, step, version)",
    "replicated-steps": "every worker takes the same global step, so one proof records the trajectory",
    "excludes-workers": "a receiver can exclude a sender and the run goes on without it",
}

UNSUPPORTED_KEYS = (
    "--encrypt {encrypt} --keys {keys} is not supported by pattern {pattern!r} ({note}); patterns that support it: "
    "{able}"
)
UNSUPPORTED_PROOF = "--proof {proof} is not supported by pattern {pattern!r}; patterns that support it: {able}"
ENCRYPTED_SYNC = (
    "{pattern} --encrypt ckks runs --schedule sync without checkpoints: asynchronous schedules keep per-worker "
    "momentum at the server (DANA) and checkpoints hold the model, both plaintext the server must not have"
)


@dataclass(frozen=True)
class Need:
    """Capabilities a protection needs together, and the one-line refusal when the pattern lacks one. ``pattern``:
    the need is about the pattern's kind (its refusal lists the patterns that have it), else about this job's shape."""

    offers: frozenset[str]
    message: str
    pattern: bool = True


@dataclass(frozen=True)
class Footprint:
    """Bytes a protection adds to every rank of a job at its peak, and to its server rank on top (an estimate for
    the launch's memory check: ``protect/footprint.py``)."""

    per_rank: int = 0
    server: int = 0

    def __add__(self, other: Footprint) -> Footprint:
        return Footprint(self.per_rank + other.per_rank, self.server + other.server)


@dataclass(frozen=True)
class Spec:
    """A protection as the registries hold it: its needs, an extra check of the job, and how each role builds it."""

    needs: tuple[Need, ...] = ()
    validate: Callable[[RunConfig, frozenset[str], str], None] | None = None  # (cfg, offers, pattern name)
    server: Callable[..., Any] | None = None  # codecs: (comm, cfg, parties, initial) ; gates: see ``Protections``
    worker: Callable[..., Any] | None = None  # codecs: (comm, cfg, parties, rank, initial)
    peer: Callable[..., Any] | None = None  # codecs of patterns without a server (ring): (comm, cfg)
    extra_rank: bool = False  # the protection runs on a rank of its own after the workers (an auditor)
    encrypted: bool = False  # a codec whose server holds no plaintext
    memory: Callable[[RunConfig, int], Footprint] | None = None  # (cfg, parameters): what it adds to a rank's peak


CODECS: Registry[Spec] = Registry("codec")
GATES: Registry[Spec] = Registry("gate")
#: ``--proof`` modes: what each needs of a pattern (the recorder itself is ``trustgrad.proof``; audits are gates)
PROOFS: Registry[Spec] = Registry("proof mode")
