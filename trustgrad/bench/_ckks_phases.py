"""The CKKS work of one ``ps`` step at a model's size, timed in this process in bounded memory (``bench scale``).

A ``ps --encrypt ckks`` job at ResNet-18 size holds gigabytes of ciphertexts per process (96 bytes per value), more
than a shared machine may have free; this times the same phases on a sample of the gradient's ciphertexts, a few at a
time, and scales to the whole gradient (each ciphertext costs the same): each worker encrypts its gradient (pre-scaled
by 1/W, as the codec does), the server adds W of them, each worker decrypts the sum (threshold keys: its flooded
partial decryption, then the fusion of all W). The workers' phases run in parallel, one worker's time is the step's.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

SLOTS = 4096  # the aggregation preset: N = 8192 (docs/wire.md)
CHUNK = 16 * SLOTS  # values per timed piece: a few MB of ciphertexts at a time


def ckks_phases(num_params: int, keys: str, workers: int, sample: float) -> dict[str, Any]:
    """Seconds per step of encrypt (one worker), aggregate (server), decrypt (one worker), and bytes per step on
    the wire (pushes, replies and, with threshold keys, the partial decryptions every worker sends every other)."""
    from ..crypto import CKKSParams, Context, aggregate, decrypt, encrypt, fuse, keygen, partial_decrypt, threshold_keys

    ctx = Context(CKKSParams.for_aggregation(keys))
    if keys == "shared":
        pk, sk = keygen(ctx)
    else:
        pk, shares = threshold_keys(ctx, workers)
    rng = np.random.default_rng(0)
    pieces = max(1, round(sample * -(-num_params // CHUNK)))
    took = {"encrypt": 0.0, "aggregate": 0.0, "decrypt": 0.0}
    sent, payload = 0, 0
    for _ in range(pieces):
        g = (rng.standard_normal(CHUNK) / workers).astype(np.float32)
        ct = _timed(took, "encrypt", encrypt, pk, g)
        total = _timed(took, "aggregate", aggregate, [ct] * workers)
        if keys == "shared":
            _timed(took, "decrypt", decrypt, sk, total)
            partial_bytes = 0
        else:
            mine = _timed(took, "decrypt", partial_decrypt, shares[0], total)
            others = [partial_decrypt(s, total) for s in shares[1:]]
            _timed(took, "decrypt", fuse, [mine, *others])
            partial_bytes = len(mine.to_bytes())
        payload += len(ct.to_bytes())
        sent += 2 * workers * len(ct.to_bytes()) + workers * (workers - 1) * partial_bytes
    scale = num_params / (pieces * CHUNK)
    out: dict[str, Any] = {k: v * scale for k, v in took.items()}
    # expansion as ``secure.stats`` defines it: a payload's ciphertext bytes over the same values as float32
    out.update(bytes_per_step=sent * scale, expansion=payload / (pieces * CHUNK * 4), sample=min(1.0, 1 / scale))
    return out


def _timed(took: dict[str, float], phase: str, fn: Any, *args: Any) -> Any:
    started = time.perf_counter()
    out = fn(*args)
    took[phase] += time.perf_counter() - started
    return out
