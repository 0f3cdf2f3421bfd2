"""What a protection adds to a rank's peak memory: the OpenFHE part of the launch estimate (docs/limits.md).

The unit is **one encrypted copy of the model**, ``V`` = parameters x bytes per encrypted value (a fresh ciphertext's
serialized size over its slots: 96 bytes at the aggregation presets, N = 8192 with three towers). A rank holds several
such copies at its peak: the serialized bytes it sends or received, the parsed ciphertexts, the sum, the partial
decryptions, the decrypted result. The counts below are fitted to measured
peaks (``VmHWM`` of each rank less the same job's plaintext peak, ~470 MB) of 4-worker jobs on digits with ``mlp``
hidden 512 (0.30M parameters, V = 29 MB) and hidden 1024 (1.1M parameters, V = 108 MB), rounded up:

==============================  ===============================  ==========================================
codec                           worker / member: measured -> us   parameter server: measured -> us
==============================  ===============================  ==========================================
ckks-shared (ps)                6.9 V, 6.1 V -> 7 V               32.7 V, 21.4 V -> 8 V per worker + 8 V
ckks-threshold (ps)             11.3 V, 10.6-11.6 V -> 13 V       +775 MB, +2310 MB -> as shared
ckks-threshold (ring, gather)   34 V (hidden 512) -> 14 V +       (no server)
                                5 V per member
ckks-audited (ps, audits)       +156 MB (hidden 512)              +338 MB, auditor +265 MB -> as threshold,
                                                                  and one more V per worker
==============================  ===============================  ==========================================

The server's count is not constant (an 8,970-parameter mlp added 51 MB, 42 V): the largest measured per worker is
taken, so the estimate of a large model's server is up to 50% high. Since the workers' messages reach the server
over bounded links (``patterns/ps/transport.py``: each body arrives as bytes and is copied into its tensor) a 2-worker
server at hidden 512 rose by 714 MB (24 V) where it had risen by 482 MB: hence the 8 V on top. How the counts grow
with the number of workers is a model (each worker's update held a few times over), fitted at 4.

Every rank of an encrypted job adds :data:`OPENFHE_RANK` (the library, its context and keys at N = 8192: 40-50 MB
measured on an 8,970-parameter mlp, where V is 1 MB). Blind verification's keys and encrypted samples do not scale
with the model but with the data: see :func:`blind`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from ..config import RunConfig
from .needs import Footprint

__all__ = ["ckks_codec", "audited", "blind", "bytes_per_value", "OPENFHE_RANK"]

MB = 1 << 20
OPENFHE_RANK = 64 * MB
_WORKER_COPIES = {"shared": 7, "threshold": 13}
_SERVER_COPIES_PER_WORKER, _SERVER_COPIES = 8, 8
_RING_COPIES, _RING_COPIES_PER_MEMBER = 14, 5
_BLIND_RANK, _BLIND_SERVER, _BLIND_SAMPLE = 1200 * MB, 200 * MB, 540 << 10


@functools.lru_cache(maxsize=8)
def bytes_per_value(crypto: Any) -> float:
    """Serialized bytes of a fresh ciphertext per slot under ``crypto`` (a ``CryptoConfig``): built once and cached."""
    import numpy as np

    from ..crypto import CKKSParams, Context, encrypt, keygen

    context = Context(CKKSParams.from_config(crypto))
    public, _ = keygen(context)
    return len(encrypt(public, np.zeros(context.slots)).to_bytes()) / context.slots


def _copy(cfg: RunConfig, parameters: int) -> int:
    """``V``: one encrypted copy of ``parameters`` values, whole ciphertexts."""
    slots_bytes = bytes_per_value(cfg.crypto)
    return int(math.ceil(parameters * slots_bytes))


def ckks_codec(cfg: RunConfig, parameters: int) -> Footprint:
    v = _copy(cfg, parameters)
    per_rank = OPENFHE_RANK + _WORKER_COPIES[cfg.crypto.keys] * v
    if cfg.pattern.name != "ps":  # a ring member gathers every member's update, partials included
        return Footprint(OPENFHE_RANK + (_RING_COPIES + _RING_COPIES_PER_MEMBER * cfg.workers) * v)
    server = (_SERVER_COPIES_PER_WORKER * cfg.workers + _SERVER_COPIES) * v
    return Footprint(per_rank, max(0, server - _WORKER_COPIES[cfg.crypto.keys] * v))


def audited(cfg: RunConfig, parameters: int) -> Footprint:
    """Threshold keys under audit: as ``ckks-threshold``, and the auditor rank encrypts every admitted claim."""
    base = ckks_codec(cfg, parameters)
    return Footprint(base.per_rank, base.server + cfg.workers * _copy(cfg, parameters))


def blind(cfg: RunConfig, parameters: int) -> Footprint:
    """Blind verification (N = 16384, depth 7): 13 rotation keys and the relinearisation key on every rank (their
    contributions, the joint keys, the isolated parser's copies), and the encrypted samples: each owner's own, and
    every owner's at the server. Measured on ``make demo``'s blind job (4 owners of 359 digits, 0.53 MB per
    encrypted sample; tools/rankmem.py): workers 1.15-1.22 GB resident plus 0.12-0.14 GB in their parser helper, the
    server 1.78 + 0.16 GB (7.2 GB in all, from 15.8 GB before the set-up kept one rotation index at a time)."""
    from ..data import load_dataset

    train = len(load_dataset(cfg.dataset, cfg.data_dir).x_train)
    shard = math.ceil(train / max(1, cfg.workers))
    return Footprint(_BLIND_RANK + shard * _BLIND_SAMPLE, _BLIND_SERVER + train * _BLIND_SAMPLE)
