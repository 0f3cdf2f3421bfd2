"""``trustgrad bench blind``: where a blind-verified round spends its seconds and bytes, against raw OpenFHE.

The demo's shape (``make demo``): 4 workers, each a data owner of a 359-sample digits shard, batch 32 x 64 features
x 10 classes, ``logreg-poly`` (degree-3 sigmoid, depth 7, N = 16384, 128-bit), in one process with shared keys (the
threshold protocol's extra messages are counted from the measured object sizes, below). Phases:

- ``keygen``: key pair and relinearisation key; ``rotation keys``: the check's rotation keys (their bytes are what
  every key party sends to the combiner and the combiner to the server);
- ``samples``: one data owner encrypting its shard once (set-up and every re-key, per worker, in parallel);
- ``model update``: the server's encrypted SGD step (sum of the round's claims, one scalar product) and the mean it
  publishes;
- ``check``: recomputing one claim's gradient and its weighted distance (per claim; ``round`` mode checks all claims
  of a round in one evaluation, reported per claim);
- ``verdict``: decrypting one verdict (per decryption; threshold mode: every party's partial plus fusion);
- ``re-key``: keys, rotation keys and the survivors' samples again (the sum of those phases).

Bytes per round: the claims, the verdicts sent to every key party and their partial decryptions back, the published
mean to every worker and the workers' partial decryptions of it to each other. Set-up bytes: every owner's samples,
every party's rotation keys to the combiner, the public key with evaluation keys to the server.

The anchor, measured in the same run on the same context and keys: the same step check written directly against
OpenFHE (:func:`trustgrad.bench.he_raw.raw_step_check`: the batch encrypted as one matrix, no gathering), and the
plaintext recomputation in numpy. Set ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import openfhe

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
from trustgrad.crypto import Context, PublicKey, decrypt, keygen
from trustgrad.data import BatchPlan, load_dataset

from ..options import OptionParser
from . import BENCHMARKS, BenchResult
from .he_raw import raw_step_check

__all__ = ["run"]

K = 1024.0  # claims are pushed as K * gradient (trustgrad.patterns.ps.blind.K)
MB = 1e6
LR = 0.3  # the demo's learning rate


def _timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _one(
    kind: str, x: np.ndarray, y: np.ndarray, workers: int, batch: int, rounds: int, seed: int, mode: str
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    classes = int(y.max()) + 1
    ctx = Context(BlindParams.for_check(kind))
    lay = Layout(x.shape[1], classes, ctx.slots)
    cc = ctx.cc
    t_keygen, (pk0, sk) = _timed(lambda: keygen(ctx, eval_mult=True))
    t_rot, _ = _timed(lambda: cc.EvalRotateKeyGen(sk._sk, list(lay.rotations)))
    pk = PublicKey(ctx, pk0._pk, eval_mult=True, rotations=lay.rotations)
    rot_bytes = len(openfhe.SerializeEvalAutomorphismKeyString(openfhe.BINARY, pk.tag))
    mult_bytes = len(openfhe.SerializeEvalMultKeyString(openfhe.BINARY, pk.tag))
    pk_bytes = len(pk.to_bytes())

    plan = BatchPlan(len(x), workers, seed, batch)
    store = SampleStore(lay)
    t_samples, sample_bytes = [], []
    for shard in plan.shards:
        t, s = _timed(lambda shard=shard: encrypt_samples(pk, lay, x[shard], y[shard], shard))
        t_samples.append(t)
        sample_bytes.append(len(s.to_bytes()))
        store.add(s)
    verifier = BlindVerifier(pk, lay, kind)
    w, b = rng.normal(0, 0.1, (classes, x.shape[1])), rng.normal(0, 0.1, classes)
    model = encrypt_model(pk, lay, w, b)

    check_s, verdict_s, update_s, plain_s, errors, tamper = [], [], [], [], [], []
    decryptions = 0
    for step in range(rounds):
        batches = [plan.at(i, step) for i in range(workers)]
        grads = []
        for ids in batches:
            t0 = time.perf_counter()
            grads.append(reference_gradient(kind, x[ids], np.eye(classes)[y[ids]], w, b))
            plain_s.append(time.perf_counter() - t0)
        claims = [encrypt_claim(pk, lay, g[0] * K, g[1] * K) for g in grads]
        weights = [rng.uniform(0.5, 1.0, lay.slots) for _ in claims]
        if mode == "round":
            t0 = time.perf_counter()
            packed = verifier.check_round(store, batches, model, claims, claim_scale=K, weights=weights)
            check_s.append((time.perf_counter() - t0) / workers)
            t0 = time.perf_counter()
            distances = verifier.finish_round(packed, lambda vs: [verifier.finish(decrypt(sk, v)) for v in vs])
            verdict_s.append((time.perf_counter() - t0) / packed.decryptions)
            decryptions += packed.decryptions
        else:
            distances = []
            for ids, claim, wt in zip(batches, claims, weights):
                t0 = time.perf_counter()
                v = verifier.distance_to(verifier.recompute(store, ids, model), claim, claim_scale=K, weights=wt)
                check_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                distances.append(verifier.finish(decrypt(sk, v)))
                verdict_s.append(time.perf_counter() - t0)
                decryptions += 1
        errors += [abs(d) for d in distances]
        if step == 0:  # one entry of worker 0's claim off by 1e-4: the weighted distance is in [0.25e-8, 1e-8]
            bad = (grads[0][0].copy(), grads[0][1])
            bad[0][0, 0] += 1e-4
            v = verifier.distance_to(verifier.recompute(store, batches[0], model), encrypt_claim(pk, lay, *bad))
            tamper.append(verifier.finish(decrypt(sk, v)))
        t0 = time.perf_counter()
        model, mean = _update(cc, model, claims)
        update_s.append(time.perf_counter() - t0)
        w = w - LR * np.mean([g[0] for g in grads], axis=0)  # the plaintext twin of the encrypted step
        b = b - LR * np.mean([g[1] for g in grads], axis=0)

    # the anchor: the same check in raw OpenFHE, on the same context and keys, worker 0's first batch
    ids = plan.at(0, 0)
    raw = raw_step_check(cc, pk._pk, x[ids], y[ids], w, b, kind)
    raw_err = abs(cc.Decrypt(sk._sk, raw["verdict"]).GetRealPackedValueArray()[0])

    claim_bytes = len(claims[0].to_bytes())
    mean_bytes = len(mean.to_bytes())
    verdict_bytes = len(v.to_bytes())
    per_round = {
        "claims": workers * claim_bytes,
        "verdicts": 2 * workers * verdict_bytes * decryptions / rounds,  # out to every party, partials back
        "mean": workers * mean_bytes + workers * (workers - 1) * mean_bytes,  # published, then partials
    }
    setup = {"samples": sum(sample_bytes), "rotation keys": workers * rot_bytes, "public key": pk_bytes}
    return {
        "kind": kind,
        "mode": mode,
        "depth": ctx.params.depth,
        "ring_dim": ctx.ring_dim,
        "workers": workers,
        "batch": batch,
        "rotation_keys": len(lay.rotations),
        "seconds": {
            "keygen": t_keygen,
            "rotation keys": t_rot,
            "samples (one owner)": float(np.mean(t_samples)),
            "model update": float(np.median(update_s)),
            "check (per claim)": float(np.median(check_s)),
            "verdict (per decryption)": float(np.median(verdict_s)),
            "re-key": t_keygen + t_rot + float(np.mean(t_samples)),
        },
        "setup_seconds": t_keygen + t_rot + float(np.mean(t_samples)),
        "round_seconds": float(np.median(check_s)) * workers
        + float(np.median(verdict_s)) * decryptions / rounds
        + float(np.median(update_s)),
        "bytes": {
            "rotation keys (one party)": rot_bytes,
            "eval-mult key": mult_bytes,
            "public key with eval keys": pk_bytes,
            "samples (one owner)": float(np.mean(sample_bytes)),
            "claim": claim_bytes,
            "verdict": verdict_bytes,
            "published mean": mean_bytes,
        },
        "setup_bytes": sum(setup.values()),
        "round_bytes": sum(per_round.values()),
        "round_bytes_parts": per_round,
        "decryptions_per_round": decryptions / rounds,
        "plaintext_s": float(np.median(plain_s)),
        "check_s": float(np.median(check_s)),
        "raw_check_s": raw["check_s"],
        "raw_encrypt_s": raw["encrypt_s"],
        "raw_honest_error": float(raw_err),
        "honest_error_max": float(max(errors)),
        "tamper_1e-4_min": float(min(tamper)),
    }


def _update(cc: Any, model: Any, claims: list[Any]) -> tuple[Any, Any]:
    """The server's step: ``model += (-lr / (K k)) * sum(claims)`` and the published mean (blind_server.aggregate)."""
    from trustgrad.blind.step_check import to_last_level
    from trustgrad.crypto import EncryptedVector

    k = len(claims)
    total = [cc.EvalAddMany([c.ciphertexts[i] for c in claims]) for i in range(2)]
    cts = [cc.EvalAdd(m, cc.EvalMult(t, -LR / (K * k))) for m, t in zip(model.ciphertexts, total)]
    mean = to_last_level(cc, [cc.EvalMult(t, 1.0 / k) for t in total], model.context.params.depth - 1)
    new = EncryptedVector(model.context, cts, model.length, "float64", model.tag, 1)
    return new, EncryptedVector(model.context, mean, model.length, "float64", model.tag, model.context.params.depth)


def run(
    batch: int = 32,
    samples: int | None = None,
    repeats: int = 2,
    seed: int = 0,
    kinds: tuple[str, ...] = ("poly",),
    *,
    workers: int = 4,
    modes: tuple[str, ...] = ("claim",),
) -> dict[str, Any]:
    """Measure each check kind and mode over ``repeats`` rounds; returns ``{"batch": ..., "rows": [...]}`` (each row
    also carries ``check_s``, seconds per claim). ``samples``: only the first ``samples`` digits, split over
    ``samples // batch`` owners (a quick run)."""
    if batch < 1 or workers < 1 or repeats < 1 or (samples is not None and samples < batch):
        raise ValueError("need batch, workers and repeats >= 1 and samples >= batch")
    rounds = repeats
    ds = load_dataset("digits")
    x = ds.x_train.reshape(len(ds.x_train), -1).double().numpy()
    y = ds.y_train.long().numpy()
    if samples is not None:
        x, y, workers = x[:samples], y[:samples], max(1, samples // batch)
    rows = [_one(k, x, y, workers, batch, rounds, seed, m) for k in kinds for m in modes]
    return {"batch": batch, "features": x.shape[1], "workers": workers, "rows": rows}


def table(result: dict[str, Any]) -> str:
    lines = [
        f"Blind verification, the demo's shape: {result['workers']} workers, batch {result['batch']} x "
        f"{result['features']} features x 10 classes, shared CKKS keys, one process",
        "",
    ]
    for r in result["rows"]:
        raw = r["raw_check_s"]
        lines += [
            f"### {r['kind']} (depth {r['depth']}, N={r['ring_dim']}, {r['rotation_keys']} rotation keys), "
            f"checks per {r['mode']}",
            "",
            "| phase | seconds | x raw OpenFHE check | | object | MB |",
            "|---|---:|---:|---|---|---:|",
        ]
        sec, byt = list(r["seconds"].items()), list(r["bytes"].items())
        for i in range(max(len(sec), len(byt))):
            s = f"| {sec[i][0]} | {sec[i][1]:.3f} | {sec[i][1] / raw:.2f}x |" if i < len(sec) else "| | | |"
            b = f" | {byt[i][0]} | {byt[i][1] / MB:.2f} |" if i < len(byt) else " | | |"
            lines.append(s + b)
        lines += [
            "",
            f"- check per claim {r['seconds']['check (per claim)']:.3f} s; anchor: raw OpenFHE {raw:.3f} s (same "
            f"context and keys; honest error {r['raw_honest_error']:.1e}), plaintext numpy {r['plaintext_s']:.1e} s",
            f"- set-up {r['setup_seconds']:.1f} s (keys, rotation keys, one owner's samples; owners in parallel), "
            f"{r['setup_bytes'] / MB:,.0f} MB; per round {r['round_seconds']:.2f} s, {r['round_bytes'] / MB:.1f} MB "
            f"({', '.join(f'{k} {v / MB:.1f}' for k, v in r['round_bytes_parts'].items())}); "
            f"{r['decryptions_per_round']:.1f} verdict decryptions per round",
            f"- honest distance <= {r['honest_error_max']:.1e}; one entry off by 1e-4: {r['tamper_1e-4_min']:.1e}",
            "",
        ]
    return "\n".join(lines)


@BENCHMARKS.register("blind")
def _cli(args: list[str]) -> BenchResult:
    parser = OptionParser(prog="trustgrad bench blind", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="samples per checked step")
    parser.add_argument("--workers", type=int, default=4, help="data owners and claims per round (the demo: 4)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds checked (median reported)")
    parser.add_argument("--kind", choices=["linear", "poly", "both"], default="poly")
    parser.add_argument("--mode", choices=["claim", "round", "both"], default="both",
                        help="claim: one evaluation and one verdict per claim (before); round: all claims of a round "
                        "in one evaluation")  # fmt: skip
    ns = parser.parse_args(args)
    kinds = ("linear", "poly") if ns.kind == "both" else (ns.kind,)
    modes = ("claim", "round") if ns.mode == "both" else (ns.mode,)
    result = run(ns.batch, None, ns.rounds, kinds=kinds, workers=ns.workers, modes=modes)
    return BenchResult("blind", table(result), result, None)
