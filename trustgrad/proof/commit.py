"""Commitments: a Merkle root over the proof's files and one over the training set, and the challenge derived from it.

Jia et al. (2021, Sec. 4) need the prover to be bound to every checkpoint *before* the verifier picks which segments to
re-execute; otherwise a spoofer forges only the segments it learns will be checked (Fang et al., EuroS&P 2023). The
prover therefore publishes one root over the digests of all files; the verifier recomputes it from the files and draws
its random segments from ``H(root || nonce)``.

Leaves are domain-separated (``0x00``) from inner nodes (``0x01``) so no inner node can pose as a leaf (the
second-preimage weakness of naive Merkle trees); an odd node is promoted unchanged. Leaves, nodes and the challenge
are BLAKE2b-256; a file's own digest is SHA-256 under :data:`SCHEME` (the prover hashes every checkpoint as it
trains, gigabytes per epoch, and SHA-256 runs in the CPU's SHA instructions at about twice BLAKE2b's speed here:
docs/proof.md) and BLAKE2b-256 under :data:`LEGACY_SCHEME`, which proofs written before the change name and the
verifier still reads. Both are collision resistant, so either binds every byte of the files.

>>> a, b = leaf("x", digest(b"1")), leaf("y", digest(b"2"))
>>> merkle_root([a, b]) == merkle_root([a, b]) != merkle_root([b, a])
True
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..data import sample_hashes

__all__ = [
    "SCHEME",
    "LEGACY_SCHEME",
    "FILE_HASHES",
    "digest",
    "file_digest",
    "leaf",
    "merkle_root",
    "dataset_root",
    "challenge_seed",
]

#: the scheme ``commitment.json`` names: the Merkle tree above over SHA-256 digests of the files
SCHEME = "merkle-blake2b-256/sha-256-files"
#: proofs written before the files' digests moved to SHA-256: the same tree over BLAKE2b-256 digests
LEGACY_SCHEME = "merkle-blake2b-256"
#: a fresh hash object for a file's digest under each scheme the verifier accepts
FILE_HASHES: dict[str, Callable[[], Any]] = {
    SCHEME: hashlib.sha256,
    LEGACY_SCHEME: lambda: hashlib.blake2b(digest_size=32),
}


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


def file_digest(data: bytes | memoryview, scheme: str = SCHEME) -> bytes:
    """The digest of one committed file's content under ``scheme``."""
    h = FILE_HASHES[scheme]()
    h.update(data)
    return h.digest()


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
