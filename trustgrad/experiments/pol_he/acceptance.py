"""Part 1: are honest claims accepted after CKKS? Relative error of decrypted honest gradients vs the replay.

Protocol, per seed:

1. An honest trajectory: digits/mlp, W workers, SGD with momentum; at each round every worker computes its gradient on
   the batch the PRF assigns it (the same rule the auditor replays: :class:`trustgrad.data.BatchPlan`).
2. Per key mode (``shared``; ``threshold-P``: P-party n-of-n keys, each partial decryption adds OpenFHE's smudging
   noise, not trustgrad's flooding: docs/threshold-keys.md measures that)
   and scale 2**s (128-bit parameters chosen by OpenFHE): each worker encrypts ``g / W`` as
   ``ps --encrypt ckks`` workers do; the server sums the W ciphertexts.
3. Two things are decrypted and audited: each worker's own ciphertext (times W: the claim as the key holders would
   read it), through :meth:`trustgrad.audit.Auditor.check` (replay at the round's parameters); and the server's sum
   (the mean the workers step with, cast to float32 as ``SecureWorker.decode_mean`` does) against the mean of the
   replays, with the same relative-l2 formula.
4. A claim is accepted at threshold t iff rel_l2 <= t and the auditor's cosine rule (<= 1e-6) holds. A decryption
   OpenFHE itself declares noise (``CryptoError``) counts as a rejection with rel_l2 = inf.

The control row ``plaintext`` audits the unencrypted claims: the replay is bit-exact (rel_l2 = 0), so every error in
the other rows is CKKS's.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...audit import Auditor
from ...audit.calibration import LEGACY_THRESHOLD
from ...config import RunConfig
from ...crypto import (
    CKKSParams,
    Context,
    EncryptedVector,
    aggregate,
    decrypt,
    encrypt,
    fuse,
    keygen,
    partial_decrypt,
    threshold_keygen,
)
from ...crypto.flooding import NO_FLOODING
from ...data import BatchPlan, load_dataset
from ...errors import CryptoError
from ...models import build_model
from ...replica import Replica, make_optimizer

__all__ = ["measure", "honest_rounds"]

Round = tuple[int, torch.Tensor, list[torch.Tensor]]  # (step, parameters, one gradient per worker)


def honest_rounds(cfg: RunConfig, steps: int, seconds: list[float] | None = None) -> list[Round]:
    """The per-worker honest gradients of ``steps`` rounds of synchronous training (step 1); the time of each
    gradient (forward, backward, flatten) is appended to ``seconds``."""
    ds = load_dataset(cfg.dataset)
    model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, cfg.seed, cfg.model)
    replica = Replica(model, make_optimizer(model, cfg.lr, cfg.momentum))
    plan = BatchPlan(len(ds.x_train), cfg.workers, cfg.seed, cfg.batch_size)
    rounds: list[Round] = []
    for step in range(steps):
        params, grads = replica.flat_params(), []
        for w in range(cfg.workers):
            idx = torch.from_numpy(plan.at(w, step))
            t0 = time.perf_counter()
            replica.compute_gradients(ds.x_train[idx], ds.y_train[idx])
            grads.append(replica.flat_grad().clone())
            if seconds is not None:
                seconds.append(time.perf_counter() - t0)
        rounds.append((step, params, grads))
        replica.set_flat_grad(torch.stack(grads).mean(0))
        replica.step()
    return rounds


def _keys(mode: str, scale: int) -> tuple[Any, Callable[[EncryptedVector], np.ndarray], int]:
    """(public key, decrypt function, ring dimension) for a key mode at scale 2**scale (step 2)."""
    if mode == "shared":
        ctx = Context(CKKSParams.for_aggregation("shared", scale_bits=scale))
        pk, sk = keygen(ctx)
        return pk, lambda v: decrypt(sk, v), ctx.ring_dim
    parties = int(mode.split("-")[1])
    ctx = Context(CKKSParams.for_aggregation("threshold", scale_bits=scale))
    pk, shares = None, []
    for _ in range(parties):
        pk, share = threshold_keygen(ctx, parties, pk)
        shares.append(share)
    # CKKS's own noise (OpenFHE's multiparty smudging included), the question of this part; the flooding every
    # deployed partial decryption adds on top is measured in docs/threshold-keys.md
    return pk, lambda v: fuse([partial_decrypt(sh, v, NO_FLOODING) for sh in shares]), ctx.ring_dim


def _rel(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    rn, gn = float(np.linalg.norm(ref)), float(np.linalg.norm(got))
    rel = float(np.linalg.norm(got - ref)) / max(rn, 1e-12)
    cos = 1.0 - float(got @ ref) / (rn * gn) if rn * gn > 0 else 1.0
    return rel, max(cos, 0.0)


@contextmanager
def _quiet_auditor():
    """The auditor warns on every rejection; at small scales that is every claim, by design of this experiment."""
    logger = logging.getLogger("trustgrad.audit.auditor")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _cell(mode: str, scale: int | None, claims: list[tuple[float, float]], aggs: list[tuple[float, float]], t: tuple):
    def stats(pairs: list[tuple[float, float]]) -> dict[str, Any]:
        rel = np.array([r for r, _ in pairs])
        finite = rel[np.isfinite(rel)]
        return {
            "n": len(pairs),
            "acceptance": {f"{th:g}": float(np.mean([r <= th and c <= Auditor.cos for r, c in pairs])) for th in t},
            "rel_l2_median": float(np.median(finite)) if finite.size else math.inf,
            "rel_l2_p95": float(np.percentile(finite, 95)) if finite.size else math.inf,
            "rel_l2_max": float(rel.max()) if rel.size else math.nan,
            "decryption_failures": int((~np.isfinite(rel)).sum()),
            "rel_l2": [float(r) for r in rel],
        }

    return {"mode": mode, "scale_bits": scale, "claims": stats(claims), "aggregates": stats(aggs)}


def measure(s: Any, out: Path, data: dict[str, Any]) -> dict[str, Any]:
    cells: dict[tuple[str, int | None], tuple[list, list]] = {}
    timing = {"plaintext_step": [], "audit_check": [], "encrypt": [], "decrypt": []}
    keys = {(m, sc): _keys(m, sc) for m in s.key_modes for sc in s.scales}
    ring = {f"{m}@{sc}": keys[(m, sc)][2] for m, sc in keys}
    w = s.he_workers
    with _quiet_auditor():
        for seed in range(s.seeds):
            cfg = RunConfig(workers=w, seed=seed, progress=False)
            rounds = honest_rounds(cfg, s.he_steps, timing["plaintext_step"])
            ds = load_dataset(cfg.dataset)
            auditor = Auditor(cfg, ds, w)
            for step, params, grads in rounds:
                ref_mean = torch.stack(grads).double().mean(0).numpy()
                claims, aggs = cells.setdefault(("plaintext", None), ([], []))
                for i, g in enumerate(grads):
                    t0 = time.perf_counter()
                    check = auditor.check(i, step, step, params, g)
                    timing["audit_check"].append(time.perf_counter() - t0)
                    claims.append((check.rel_l2, check.cos))
                aggs.append(_rel(torch.stack(grads).mean(0).numpy(), ref_mean))
                for (mode, scale), (pk, dec, _) in keys.items():
                    claims, aggs = cells.setdefault((mode, scale), ([], []))
                    t0 = time.perf_counter()
                    cts = [encrypt(pk, g.double().numpy() / w) for g in grads]
                    timing["encrypt"].append((time.perf_counter() - t0) / w)
                    for i, ct in enumerate(cts):
                        try:
                            t0 = time.perf_counter()
                            claimed = torch.from_numpy(np.asarray(dec(ct) * w, dtype=np.float32))
                            timing["decrypt"].append(time.perf_counter() - t0)
                        except CryptoError:
                            claims.append((math.inf, 1.0))
                            continue
                        check = auditor.check(i, step, step, params, claimed)
                        claims.append((check.rel_l2 if math.isfinite(check.rel_l2) else math.inf, check.cos))
                    try:
                        mean = np.asarray(dec(aggregate(cts)), dtype=np.float32)
                        aggs.append(_rel(mean, ref_mean))
                    except CryptoError:
                        aggs.append((math.inf, 1.0))
    med = {k: float(np.median(v)) if v else math.nan for k, v in timing.items()}
    return {
        "workers": w,
        "steps_per_seed": s.he_steps,
        "thresholds": list(s.thresholds),
        "default_threshold": LEGACY_THRESHOLD,
        "cos_rule": Auditor.cos,
        "ring_dim": ring,
        "cells": [_cell(m, sc, c, a, s.thresholds) for (m, sc), (c, a) in cells.items()],
        "median_seconds": med,
    }
