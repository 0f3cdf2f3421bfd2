"""The ring's codec: CKKS ciphertexts under threshold keys, so no peer ever sees another's gradient.

The ring algorithm is ``patterns/ring.ring_all_reduce``, the same for plaintext and ciphertexts; this codec fills
steps 1-5 (``encode``, ``exchange`` + ``combine``, ``reveal``), and step 6 is the plaintext ring's all-gather.

Protocol, for W ranks that each hold a share of an n-of-n threshold key (``secure.keys``) and a flat vector cut into
W chunks (chunk j is *owned* by rank j-1, the rank that finishes reducing it in a plaintext ring):

1. Encrypt: every rank encrypts each of its W chunks under the joint public key.
2. Reduce-scatter on ciphertexts, W-1 steps: at step s rank r sends ciphertext chunk (r - s) to r+1 and adds the
   ciphertext chunk (r - s - 1) it receives (homomorphic addition). Rank r ends with Enc(sum of chunk r+1); what it
   saw on the way were ciphertexts only.
3. Distribute the reduced ciphertexts: each owner sends Enc(sum of its chunk) to every other rank.
4. Partial decryption: every rank computes its decryption share of every reduced chunk and sends the share of chunk
   j only to chunk j's owner (OpenFHE's advice: partials go to the party that fuses, never broadcast).
5. The owner fuses the W shares into the plaintext sum of its chunk (all W are required: one missing share fails).
6. All-gather of the plaintext sums around the ring: every rank learns the sum, which is what all-reduce is for,
   and nothing else.

What is revealed: the sum (as with any all-reduce). What each peer sees of others: ciphertexts and decryption shares
of sums. Steps 3-5 exchange with every peer by cyclic shifts, so no ordering can deadlock; step 6 is the ring's.

Every ciphertext and partial decryption a rank receives is validated before OpenFHE parses it, against what the
receiver knows: the chunk's length, the joint key, the layout of a fresh (step 2) or summed (step 3) encryption
(docs/wire.md). A refused payload ends the all-reduce with a one-line ``LaunchError`` naming its sender: an
all-reduce needs every rank's share, so there is no one to go on without.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ...comm import Comm
from ...config import RunConfig
from ...crypto import EncryptedVector, encrypt, fuse, partial_decrypt
from ...crypto.threshold import PartialDecryption
from ...errors import CryptoError, LaunchError
from ...secure import CryptoStats, KeyRing, setup_keys
from ...tags import RING_CIPHERTEXT as _TAG

__all__ = ["RingCodec"]


class RingCodec:
    """One rank's side of the encrypted ring: every rank a key party of the job's threshold key."""

    encrypted = True

    def __init__(
        self, comm: Comm, keys: KeyRing, stats: CryptoStats, tamper: Callable[[str, bytes], bytes] | None = None
    ):
        self.comm, self.keys, self.stats = comm, keys, stats
        self.tamper = tamper or (lambda kind, payload: payload)  # --malicious ...,attack=crafted-*: what we send

    @classmethod
    def for_job(cls, comm: Comm, cfg: RunConfig) -> RingCodec:
        """Key set-up among every rank of the job (collective), with this rank's conduct under ``--malicious``."""
        from ...attacks.poisoning import wire_tamper
        from ...secure.rogue import behaviour

        stats = CryptoStats()
        conduct = behaviour(cfg.malicious, comm.rank)  # a rogue key party, in tests of the set-up
        keys = setup_keys(comm, cfg.crypto, range(comm.world_size), (), stats, None, conduct)
        return cls(comm, keys, stats, wire_tamper(cfg.malicious, comm.rank))

    def encode(self, chunks: list[torch.Tensor]) -> list[EncryptedVector]:
        """Step 1: every chunk encrypted under the joint public key."""
        with self.stats.timing("encrypt"):
            return [encrypt(self.keys.public_key, c.detach().cpu().numpy().astype(np.float64)) for c in chunks]

    def exchange(self, chunk: EncryptedVector, dst: int, src: int, length: int) -> tuple[bytes, EncryptedVector]:
        """Step 2's message: ``chunk`` to ``dst``; ``src``'s chunk of ``length`` values back, validated."""
        payload = self.tamper("ciphertext", chunk.to_bytes())
        self.stats.sent(len(payload), len(chunk))
        received = self.comm.exchange_bytes(payload, dst, src, _TAG)
        return received, _vector(self.keys, received, src, length)

    def combine(self, vectors: list[EncryptedVector]) -> EncryptedVector:
        """Homomorphic addition."""
        with self.stats.timing("aggregate"):
            total = vectors[0]
            for v in vectors[1:]:
                total = total + v
            return total

    def reveal(self, reduced: EncryptedVector, mine: int, bounds: list[int]) -> torch.Tensor:
        """Steps 3-5: this rank's reduced chunk ``mine`` to every rank, every rank's partial decryption of each chunk
        to that chunk's owner, fused here: the plaintext sum of chunk ``mine`` (float32)."""
        comm, world, rank = self.comm, self.comm.world_size, self.comm.rank
        chunks = {mine: reduced}
        blob = self.tamper("ciphertext", reduced.to_bytes())
        for shift in range(1, world):  # 3. every rank gets every reduced chunk
            dst, src = (rank + shift) % world, (rank - shift) % world
            self.stats.sent(len(blob), bounds[mine + 1] - bounds[mine])
            j = (src + 1) % world
            chunks[j] = _vector(self.keys, comm.exchange_bytes(blob, dst, src, _TAG), src, bounds[j + 1] - bounds[j])
        with self.stats.timing("decrypt"):  # 4. shares of chunk j go to its owner
            shares = {j: partial_decrypt(self.keys.secret, chunks[j]) for j in range(world)}  # type: ignore[arg-type]
        collected = [shares[mine]]
        for shift in range(1, world):
            dst, src = (rank + shift) % world, (rank - shift) % world
            payload = self.tamper("partial", shares[(dst + 1) % world].to_bytes())
            self.stats.sent(len(payload), 0)
            collected.append(_partial(self.keys, comm.exchange_bytes(payload, dst, src, _TAG), src, reduced))
        with self.stats.timing("decrypt"):  # 5. fuse
            return torch.from_numpy(np.asarray(fuse(collected), dtype=np.float32))

    def cost(self) -> dict[str, Any]:
        return self.stats.summary()


def _vector(keys: KeyRing, data: bytes, sender: int, length: int) -> EncryptedVector:
    """A chunk from ``sender``: ``length`` zero-padded float64 values under the joint key, else named."""
    try:
        return EncryptedVector.from_bytes(
            keys.context, data, public_key=keys.public_key, length=length, padded=True, dtype="float64", exact=True
        )
    except CryptoError as exc:
        raise LaunchError(f"ring: rank {sender} sent an invalid ciphertext: {exc}", rank=sender) from None


def _partial(keys: KeyRing, data: bytes, sender: int, chunk: EncryptedVector) -> PartialDecryption:
    """``sender``'s share of the chunk this rank owns, else named."""
    try:
        partial = PartialDecryption.from_bytes(
            keys.context,
            data,
            length=len(chunk),
            parties=len(keys.parties),
            padded=True,
            dtype=chunk.dtype,
            exact=True,
        )
    except CryptoError as exc:
        raise LaunchError(f"ring: rank {sender} sent an invalid partial decryption: {exc}", rank=sender) from None
    if partial.tag != chunk.tag:
        raise LaunchError(f"ring: rank {sender} sent a partial decryption under another key", rank=sender)
    return partial
