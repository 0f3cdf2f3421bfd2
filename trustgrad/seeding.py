"""Seeds the prover cannot choose: every random choice of a run derives from one committed seed through a PRF.

Proof-of-Learning spoofs (Zhang et al. 2022; Fang et al. 2023) pick initial weights and batches to suit a forged
trajectory. trustgrad derives both from the run's seed with keyed BLAKE2b, so a verifier holding the seed recomputes
W0 and every batch index exactly (DESIGN: "nothing the prover may choose").

>>> derive_seed(0, "order", 1, 2) == derive_seed(0, "order", 1, 2)
True
>>> derive_seed(0, "order", 1, 2) != derive_seed(0, "order", 2, 1)
True
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["derive_seed", "rng", "epoch_permutation", "batch_indices"]


def derive_seed(seed: int, *path: object) -> int:
    """A 63-bit integer PRF(seed, path): keyed BLAKE2b over the path's components, '/'-separated."""
    key = int(seed).to_bytes(16, "little", signed=True)
    message = "/".join(str(p) for p in path).encode()
    digest = hashlib.blake2b(message, key=key, digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def rng(seed: int, *path: object) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(derive_seed(seed, *path)))


def epoch_permutation(seed: int, worker: int, epoch: int, n: int) -> np.ndarray:
    """The order in which ``worker`` visits the ``n`` samples of its shard in ``epoch``."""
    return rng(seed, "order", worker, epoch).permutation(n)


def batch_indices(shard: np.ndarray, seed: int, worker: int, epoch: int, step: int, batch_size: int) -> np.ndarray:
    """Global training-set indices of ``worker``'s batch ``step`` (0-based within the epoch).

    Batches are consecutive slices of the epoch's permutation; the last incomplete batch is dropped, so every worker of
    a synchronous job takes the same number of steps.
    """
    order = epoch_permutation(seed, worker, epoch, len(shard))
    return shard[order[step * batch_size : (step + 1) * batch_size]]
