"""Commitments: a Merkle root over the proof's files and one over the training set, and the challenge derived from it.

Jia et al. (2021, Sec. 4) need the prover to be bound to every checkpoint *before* the verifier picks which segments to
re-execute; otherwise a spoofer forges only the segments it learns will be checked (Fang et al., EuroS&P 2023). The
prover therefore publishes one root over the digests of all files; the verifier recomputes it from the files and draws
its random segments from ``H(root || nonce)``.

Leaves are domain-separated (``0x00``) from inner nodes (``0x01``) so no inner node can pose as a leaf (the
second-preimage weakness of naive Merkle trees); an odd node is promoted unchanged. BLAKE2b-256 throughout.

>>> a, b = leaf("x", digest(b"1")), leaf("y", digest(b"2"))
>>> merkle_root([a, b]) == merkle_root([a, b]) != merkle_root([b, a])
True
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..data import sample_hashes

__all__ = ["digest", "leaf", "merkle_root", "dataset_root", "challenge_seed"]


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


def leaf(name: str, file_digest: bytes) -> bytes:
    """The leaf of one committed file: its name (so files cannot be swapped) and its content digest."""
    return hashlib.blake2b(b"\x00" + name.encode() + b"\x00" + file_digest, digest_size=32).digest()


def merkle_root(leaves: list[bytes]) -> bytes:
    if not leaves:
        return digest(b"")
    level = list(leaves)
    while len(level) > 1:
        nxt = [
            hashlib.blake2b(b"\x01" + level[i] + level[i + 1], digest_size=32).digest()
            for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def dataset_root(x: torch.Tensor, y: torch.Tensor) -> str:
    """Merkle root (hex) over the per-sample hashes of raw bytes, dtype, shape and label (``data.sample_hashes``)."""
    return merkle_root([leaf(str(i), h) for i, h in enumerate(sample_hashes(x, y))]).hex()


def challenge_seed(root: str, nonce: str) -> np.random.Generator:
    """The verifier's random generator for segment selection: BLAKE2b(root || nonce), unknown before commitment."""
    seed = hashlib.blake2b(f"pol-challenge|{root}|{nonce}".encode(), digest_size=16).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(seed, "little")))
