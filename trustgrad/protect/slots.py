"""The three slots a pattern calls (docs/architecture.md §3): codec, gate, observer.

A pattern schedules (who sends what to whom, when); a protection fills a slot and never reaches into the pattern.
Everything here is an interface and the values that cross it; implementations live in ``codecs/`` and ``gates/``.

- **codec**: what crosses the wire. The sender ``encode``s; the receiver ``decode``s (validating first, never
  decrypting at a server), ``combine``s a round (mean, or homomorphic sum) and ``publish``es it; the key holders
  ``reveal`` it (``apply``: decrypt and take the optimizer step). A codec that needs the key holders' work before a
  round is answered (threshold decryption, re-keying) says so through ``settle`` and ``rekey``.
- **gate**: what a receiver admits. It takes a round's claims (``Batch``) or one claim (``Claim``) and returns a
  ``Verdict``: the admitted contributions, the excluded senders with why, and ``Correction``s the server applies to
  its own state. A gate reads what it is given and never edits the server.
- **observer**: what is recorded, ``fn(kind, payload)`` on ``Pattern.taps`` (the server-view recorder, metrics); the
  proof recorder wraps the optimizer step in ``trustgrad.proof``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

__all__ = [
    "Batch", "Claim", "Correction", "Verdict", "Gate", "ServerCodec", "WorkerCodec", "Observer", "Combine", "Received",
]  # fmt: skip

#: a round's admitted contributions, in sender order -> the update (the codec's mean, or a robust rule's)
Combine = Callable[[list[Any]], Any]


@dataclass(frozen=True)
class Claim:
    """One push as the receiver saw it: the sender's rank, its step (clock), the model version it computed on, the
    bytes it sent and what the codec decoded them to."""

    rank: int
    step: int
    version: int
    payload: bytes
    value: Any


@dataclass(frozen=True)
class Batch:
    """A synchronous round as a gate sees it: read-only copies and references, never the server itself.

    ``replica`` is the server's model and optimizer, to read or deep-copy; ``combine`` is how the server turns
    admitted contributions into an update (a gate that replays rounds must combine as the server does)."""

    version: int
    values: dict[int, Any]  # rank -> decoded contribution
    steps: dict[int, int]  # rank -> the step it claims
    standing: frozenset[int]  # ranks not dropped or excluded (finished ones included)
    replica: Any = None
    combine: Combine | None = None

    def with_values(self, values: dict[int, Any]) -> Batch:
        return Batch(self.version, values, self.steps, self.standing, self.replica, self.combine)


@dataclass(frozen=True)
class Correction:
    """A change to the server's own state that a gate asks for; the server applies it (``Server._correct``).

    ``params`` / ``momentum``: adopt this model and optimizer momentum (None momentum: start it afresh), e.g. after an
    exact repair. ``rollback``: under per-worker momentum (DANA), add ``delta`` back to the parameters and clear the
    sender's momentum buffer."""

    params: torch.Tensor | None = None
    momentum: torch.Tensor | None = None
    rollback_rank: int | None = None
    delta: torch.Tensor | None = None

    def restore(self, replica: Any) -> None:
        """Adopt ``params`` and ``momentum`` into ``replica`` (the server's own call: nothing here runs unasked)."""
        if self.params is None:
            return
        replica.set_flat_params(self.params)
        if self.momentum is None:  # before the first step SGD has no buffer: the next step starts one
            replica.optimizer.state.clear()
        else:
            replica.set_flat_momentum(self.momentum)


@dataclass(frozen=True)
class Verdict:
    """What a gate decided: contributions admitted (possibly recomputed), senders excluded (rank -> reason),
    corrections the server applies before it uses the admitted contributions."""

    admitted: dict[int, Any]
    excluded: dict[int, str] = field(default_factory=dict)
    corrections: tuple[Correction, ...] = ()

    @classmethod
    def admit_all(cls, values: dict[int, Any]) -> Verdict:
        return cls(dict(values))


class Gate(ABC):
    """What a receiver admits. ``screen`` (synchronous rounds) is required; the rest are hooks with no effect."""

    def observe(self, claim: Claim) -> None:
        """Every push, before it is screened (claim chains commit to the exact bytes)."""

    @abstractmethod
    def screen(self, batch: Batch) -> Verdict:
        """A complete synchronous round -> what is admitted."""

    def screen_one(self, claim: Claim) -> Verdict:
        """Asynchronous schedules: one claim on arrival (default: admitted)."""
        return Verdict({claim.rank: claim.value})

    def combine(self, values: list[Any], senders: list[int] | None) -> Any | None:
        """A gate that replaces the mean (a robust rule) returns the update here; others return None."""
        return None

    def applied(self, batch: Batch) -> None:
        """The round about to be applied (after the verdicts' corrections): ``batch.values`` are admitted."""

    def after_exclusion(self, survivors: list[int]) -> None:
        """The server has excluded this gate's rejected senders (blind checks re-key among the survivors here)."""

    def published(self, payload: bytes) -> None:
        """The round's published aggregate (what the workers move to), as bytes (encrypted codecs)."""

    def sent(self, version: int, params: torch.Tensor, held: set[int]) -> None:
        """Asynchronous schedules: parameters sent as ``version``; ``held``: versions live workers still compute on."""

    def stepped(self, rank: int, delta: torch.Tensor) -> None:
        """Asynchronous schedules: ``rank``'s gradient moved the parameters by ``-delta``."""

    def close(self) -> None:
        """The run is over."""

    def summary(self) -> dict[str, Any]:
        return {}


class ServerCodec(ABC):
    """The receiving side of a codec at a server (the workers' side is ``WorkerCodec``)."""

    #: the server never holds a plaintext update or model: worker 0 evaluates, nothing is checkpointed
    encrypted: bool = False
    #: a refused push excludes its sender and the run goes on (else the run fails, naming it)
    excludes_refused: bool = False
    #: the encrypted aggregate of the last round (empty: none; plaintext codecs send the model instead)
    latest: bytes = b""

    @abstractmethod
    def max_payload(self, num_params: int) -> int:
        """The most bytes one honest push of ``num_params`` values takes (bounds what is allocated)."""

    @abstractmethod
    def decode(self, payload: bytes, rank: int, num_params: int) -> Any:
        """Validate a push before any native code parses it, and decode it (``LaunchError`` naming the sender)."""

    @abstractmethod
    def combine(self, values: list[Any]) -> Any:
        """A round's contributions (in sender order) -> their mean (a plaintext tensor, or a ciphertext)."""

    def refused_at_setup(self) -> dict[int, str]:
        """Senders whose key material failed validation during set-up (rank -> why): excluded before round 0."""
        return {}

    def refused(self, rank: int, reason: str) -> None:
        """The server excluded ``rank`` (a refused push, a failed partial): note it, re-key before decrypting."""

    #: an excluded sender still holds a share every decryption needs: ``rekey`` before the next round is decrypted
    rekey_pending: bool = False

    def rekey(self, survivors: list[int], num_params: int) -> dict[int, Any]:
        """New keys among ``survivors`` and the round's pushes again under them (rank -> decoded contribution)."""
        raise NotImplementedError(f"{type(self).__name__} has no keys to renew")

    def publish(self, combined: Any) -> None:
        """The round's aggregate, as the workers receive it (``latest``)."""

    def settle(self, live: list[int]) -> dict[int, str]:
        """Reveal: the key holders decrypt the round before it is answered; returns the senders to exclude."""
        return {}

    def key_material(self) -> list[str]:
        return []

    def cost(self) -> dict[str, Any]:
        """Cost of the codec (seconds, bytes) for the run's summary."""
        return {}

    def decisions(self) -> dict[str, Any]:
        """What the codec decided (refused payloads, re-keyings) for the run's summary."""
        return {}


class WorkerCodec(ABC):
    """The sending side of a codec at a worker: encode a gradient; reveal a round (decrypt, then step)."""

    #: what the server answers is an encrypted aggregate (bytes), not the model's parameters
    encrypted: bool = False

    @abstractmethod
    def encode(self, flat: torch.Tensor) -> bytes:
        """A flat float32 gradient -> the bytes pushed."""

    @abstractmethod
    def max_payload(self, num_params: int) -> int:
        """The most bytes an honest aggregate of ``num_params`` values takes."""

    @abstractmethod
    def apply(self, replica: Any, payload: Any) -> None:
        """Reveal the round's answer on ``replica``: an encrypted aggregate (bytes) is decrypted and stepped on;
        plaintext parameters (a float32 tensor) are adopted."""

    def serve(self, request: int, count: int, replica: Any) -> None:
        """A request of the server for this key holder's work before it answers (decryptions, re-keying)."""
        raise NotImplementedError(f"{type(self).__name__} serves no requests")

    def cost(self) -> dict[str, Any]:
        """Cost of the codec (seconds, bytes) for the run's summary."""
        return {}


@dataclass(frozen=True)
class Received:
    """A push as a server received it (``kind == "received"`` on its taps), shown only when it was computed on the
    model the server holds: ``replica`` is that model, to read."""

    sender: int  # worker index
    step: int
    payload: bytes
    value: Any  # what the codec decoded
    encrypted: bool
    replica: Any


class Observer(Protocol):
    """Shown what crosses the wire: ``"gradient"``, ``"aggregate"``, ``"ciphertext"`` and their payloads."""

    def __call__(self, kind: str, payload: Any) -> None: ...
