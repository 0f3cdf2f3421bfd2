"""Ring all-reduce on CKKS ciphertexts under threshold keys: no peer ever sees another's gradient.

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
6. All-gather of the plaintext sums: every rank learns the sum, which is what all-reduce is for, and nothing else.

What is revealed: the sum (as with any all-reduce). What each peer sees of others: ciphertexts and decryption shares
of sums. Steps 3-6 exchange with every peer by cyclic shifts, so no ordering can deadlock.

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

__all__ = ["encrypted_ring_all_reduce", "RingKeys"]


class RingKeys:
    """The ring's codec under threshold keys: every rank a key party (set up on construction, collectively)."""

    encrypted = True

    def __init__(self, comm: Comm, cfg: RunConfig):
        from ...attacks.poisoning import wire_tamper
        from ...secure.rogue import behaviour

        self.comm, self.stats = comm, CryptoStats()
        self.tamper = wire_tamper(cfg.malicious, comm.rank)  # --malicious ...,attack=crafted-*
        conduct = behaviour(cfg.malicious, comm.rank)  # a rogue key party, in tests of the set-up
        self.keys = setup_keys(comm, cfg.crypto, range(comm.world_size), (), self.stats, None, conduct)

    def all_reduce(self, flat: torch.Tensor, observe: Callable[[str, Any], None] | None) -> torch.Tensor:
        return encrypted_ring_all_reduce(self.comm, flat, self.keys, self.stats, observe, self.tamper)

    def cost(self) -> dict[str, Any]:
        return self.stats.summary()


def encrypted_ring_all_reduce(
    comm: Comm,
    flat: torch.Tensor,
    keys: KeyRing,
    stats: CryptoStats,
    observe: Callable[[str, Any], None] | None = None,
    tamper: Callable[[str, bytes], bytes] | None = None,
) -> torch.Tensor:
    """Sum ``flat`` over all ranks in place; only ciphertexts, decryption shares and the final sum travel.

    ``observe("ciphertext", (bytes, sender))`` is shown the first ciphertext received from the previous rank;
    ``tamper(kind, bytes)`` rewrites what this rank sends (``--malicious ...,attack=crafted-*``).
    """
    tamper = tamper or (lambda kind, payload: payload)
    world, rank = comm.world_size, comm.rank
    if world == 1:
        return flat
    values = flat.detach().cpu().numpy().astype(np.float64)
    bounds = [len(values) * i // world for i in range(world + 1)]

    with stats.timing("encrypt"):
        chunks = [encrypt(keys.public_key, values[bounds[j] : bounds[j + 1]]) for j in range(world)]

    nxt, prv = (rank + 1) % world, (rank - 1) % world
    for s in range(world - 1):  # 2. reduce-scatter on ciphertexts
        send_j, recv_j = (rank - s) % world, (rank - s - 1) % world
        payload = tamper("ciphertext", chunks[send_j].to_bytes())
        stats.sent(len(payload), bounds[send_j + 1] - bounds[send_j])
        received = comm.exchange_bytes(payload, nxt, prv, _TAG)
        if observe is not None and s == 0:  # what a peer sees of its neighbour: ciphertext bytes
            observe("ciphertext", (received, prv))
        incoming = _vector(keys, received, prv, bounds[recv_j + 1] - bounds[recv_j])
        with stats.timing("aggregate"):
            chunks[recv_j] = chunks[recv_j] + incoming

    mine = (rank + 1) % world  # the chunk this rank owns, fully reduced
    reduced = {mine: chunks[mine]}
    blob = tamper("ciphertext", chunks[mine].to_bytes())
    for shift in range(1, world):  # 3. every rank gets every reduced chunk
        dst, src = (rank + shift) % world, (rank - shift) % world
        stats.sent(len(blob), bounds[mine + 1] - bounds[mine])
        j = (src + 1) % world
        reduced[j] = _vector(keys, comm.exchange_bytes(blob, dst, src, _TAG), src, bounds[j + 1] - bounds[j])

    with stats.timing("decrypt"):  # 4. shares of chunk j go to its owner
        shares = {j: partial_decrypt(keys.secret, reduced[j]) for j in range(world)}  # type: ignore[arg-type]
    collected = [shares[mine]]
    for shift in range(1, world):
        dst, src = (rank + shift) % world, (rank - shift) % world
        payload = tamper("partial", shares[(dst + 1) % world].to_bytes())
        stats.sent(len(payload), 0)
        collected.append(_partial(keys, comm.exchange_bytes(payload, dst, src, _TAG), src, reduced[mine]))
    with stats.timing("decrypt"):  # 5. fuse
        total = np.asarray(fuse(collected), dtype=np.float32)

    out = np.empty(len(values), dtype=np.float32)  # 6. all-gather of the plaintext sums
    out[bounds[mine] : bounds[mine + 1]] = total
    for shift in range(1, world):
        dst, src = (rank + shift) % world, (rank - shift) % world
        theirs = (src + 1) % world
        got = np.frombuffer(comm.exchange_bytes(total.tobytes(), dst, src, _TAG), dtype=np.float32)
        if got.size != bounds[theirs + 1] - bounds[theirs]:
            raise ValueError(
                f"rank {src} sent a sum of {got.size} values for a chunk of {bounds[theirs + 1] - bounds[theirs]}"
            )
        out[bounds[theirs] : bounds[theirs + 1]] = got
    flat.copy_(torch.from_numpy(out).to(flat.dtype))
    return flat


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
