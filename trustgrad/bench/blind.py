"""``trustgrad bench blind``: seconds per blind step check against the plaintext recomputation, same run.

For each check kind (linear: depth 5; poly: degree-3 sigmoid, depth 7) on N=16384, 128-bit, shared keys: key
generation, key and setup sizes, one data owner encrypting ``samples`` digits once, then ``repeats`` checks of a
random PRF-style batch of ``batch`` samples (64 features x 10 classes): recompute (steps 1-5) and distance (steps 6-7)
separately, the decrypted distance of the honest claim against the plaintext one (float64) and of a claim with one
entry off by 1e-4. The anchor is the plaintext recomputation of the same gradient in numpy. Set
``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from trustgrad.blind import (
    BlindParams,
    BlindVerifier,
    Layout,
    SampleStore,
    encrypt_claim,
    encrypt_model,
    encrypt_samples,
    reference_gradient,
)
from trustgrad.crypto import Context, decrypt, keygen
from trustgrad.data import load_dataset

from ..options import OptionParser
from . import BENCHMARKS, BenchResult

__all__ = ["run"]


def _one(kind: str, x: np.ndarray, y: np.ndarray, batch: int, repeats: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    classes = int(y.max()) + 1
    t0 = time.perf_counter()
    ctx = Context(BlindParams.for_check(kind))
    lay = Layout(x.shape[1], classes, ctx.slots)
    pk, sk = keygen(ctx, eval_mult=True, rotations=lay.rotations)
    t_keys = time.perf_counter() - t0
    ids = np.arange(len(x))
    t0 = time.perf_counter()
    samples = encrypt_samples(pk, lay, x, y, ids)
    t_setup = time.perf_counter() - t0
    store = SampleStore(lay)
    store.add(samples)
    verifier = BlindVerifier(pk, lay, kind)
    w, b = rng.normal(0, 0.1, (classes, x.shape[1])), rng.normal(0, 0.1, classes)
    model = encrypt_model(pk, lay, w, b)
    rec_s, dist_s, plain_s, errors, groups, tamper = [], [], [], [], [], []
    for _ in range(repeats):
        chosen = rng.choice(ids, batch, replace=False)
        t0 = time.perf_counter()
        g = reference_gradient(kind, x[chosen], np.eye(classes)[y[chosen]], w, b)
        plain_s.append(time.perf_counter() - t0)
        claim = encrypt_claim(pk, lay, *g)
        t0 = time.perf_counter()
        rec = verifier.recompute(store, chosen, model)
        rec_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dist = verifier.distance_to(rec, claim)
        dist_s.append(time.perf_counter() - t0)
        errors.append(abs(verifier.finish(decrypt(sk, dist))))
        groups.append(len(store.groups(chosen)))
        bad = (g[0].copy(), g[1])
        bad[0][0, 0] += 1e-4
        tamper.append(verifier.finish(decrypt(sk, verifier.distance_to(rec, encrypt_claim(pk, lay, *bad)))))
    check = np.array(rec_s) + np.array(dist_s)
    return {
        "kind": kind,
        "depth": ctx.params.depth,
        "ring_dim": ctx.ring_dim,
        "rotation_keys": len(lay.rotations),
        "keygen_s": t_keys,
        "public_key_mb": len(pk.to_bytes()) / 1e6,
        "context_bytes": len(ctx.to_bytes()),
        "setup_encrypt_s": t_setup,
        "setup_samples": len(x),
        "setup_mb": len(samples.to_bytes()) / 1e6,
        "claim_mb": len(encrypt_claim(pk, lay, w, b).to_bytes()) / 1e6,
        "verdict_kb": len(dist.to_bytes()) / 1e3,
        "groups_mean": float(np.mean(groups)),
        "recompute_s": float(np.median(rec_s)),
        "distance_s": float(np.median(dist_s)),
        "check_s": float(np.median(check)),
        "plaintext_s": float(np.median(plain_s)),
        "honest_error_max": float(max(errors)),
        "tamper_1e-4_min": float(min(tamper)),
    }


def run(
    batch: int = 32, samples: int = 256, repeats: int = 3, seed: int = 0, kinds: tuple[str, ...] = ("linear", "poly")
):
    """Measure both check kinds; returns ``{"batch": ..., "rows": [per-kind dict]}``."""
    if batch < 1 or samples < batch or repeats < 1:
        raise ValueError("need batch >= 1, samples >= batch, repeats >= 1")
    ds = load_dataset("digits")
    x = ds.x_train.reshape(len(ds.x_train), -1).double().numpy()[:samples]
    y = ds.y_train.long().numpy()[:samples]
    return {"batch": batch, "features": x.shape[1], "rows": [_one(k, x, y, batch, repeats, seed) for k in kinds]}


def table(result: dict[str, Any]) -> str:
    lines = [
        f"Blind step check, batch {result['batch']} x {result['features']} features x 10 classes, shared CKKS keys",
        "",
        "| kind | depth | N | check s (recompute + distance) | plaintext s | ratio | honest err | 1e-4 tamper "
        "| groups | keys MB | setup MB / samples | claim MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['kind']} | {r['depth']} | {r['ring_dim']} | {r['check_s']:.2f} ({r['recompute_s']:.2f} + "
            f"{r['distance_s']:.2f}) | {r['plaintext_s']:.2e} | {r['check_s'] / r['plaintext_s']:,.0f}x | "
            f"{r['honest_error_max']:.1e} | {r['tamper_1e-4_min']:.1e} | {r['groups_mean']:.1f} | "
            f"{r['public_key_mb']:.0f} | {r['setup_mb']:.0f} / {r['setup_samples']} | {r['claim_mb']:.1f} |"
        )
    return "\n".join(lines)


@BENCHMARKS.register("blind")
def _cli(args: list[str]) -> BenchResult:
    parser = OptionParser(prog="trustgrad bench blind", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="samples per checked step")
    parser.add_argument("--samples", type=int, default=256, help="samples the data owner encrypts at setup")
    parser.add_argument("--repeats", type=int, default=3, help="checks per kind (median reported)")
    parser.add_argument("--kind", choices=["linear", "poly", "both"], default="both")
    ns = parser.parse_args(args)
    kinds = ("linear", "poly") if ns.kind == "both" else (ns.kind,)
    result = run(ns.batch, ns.samples, ns.repeats, kinds=kinds)
    return BenchResult("blind", table(result), result, None)
