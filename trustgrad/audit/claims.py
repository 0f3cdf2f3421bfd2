"""Hash chains of claims, one per worker, and the audit sampling that depends on them.

``commitment_c = BLAKE2b(commitment_{c-1} || worker || step || version || BLAKE2b(payload))``, starting from a genesis
value bound to the run's seed and the worker. The audit decision for a round is a PRF of the round's commitments and a
nonce the auditor fixed (and published the hash of) before training: a worker cannot know at push time whether its
claim will be checked, because it depends on the other workers' pushes of the same round and on the nonce.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field

__all__ = ["ClaimChain", "audit_draw"]


def _h(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=32)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


@dataclass
class ClaimChain:
    """The commitments of one worker's claims, in order."""

    seed: int
    worker: int
    head: bytes = b""
    length: int = 0
    history: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.head:
            self.head = _h(b"trustgrad/claims/v1", str(self.seed).encode(), str(self.worker).encode())

    def extend(self, step: int, version: int, payload: bytes) -> bytes:
        self.head = _h(self.head, f"{self.worker}/{step}/{version}".encode(), _h(payload))
        self.length += 1
        self.history.append(self.head)
        return self.head


def new_nonce() -> tuple[bytes, str]:
    """A secret nonce for audit sampling and its public commitment (hex), published before training."""
    nonce = secrets.token_bytes(32)
    return nonce, _h(b"trustgrad/audit-nonce", nonce).hex()


def audit_draw(nonce: bytes, commitments: list[bytes], worker: int) -> float:
    """A uniform number in [0, 1) for ``worker`` in a round: audit iff it is below the audit rate."""
    digest = _h(b"trustgrad/audit-draw", nonce, *commitments, str(worker).encode())
    return int.from_bytes(digest[:8], "little") / 2**64
