"""``trustgrad bench he_raw``: trustgrad's CKKS interface against raw OpenFHE calls on the same data.

One run, one context (the shared-key aggregation preset: N=8192, 4096 slots, Delta=2**40, 128-bit), one key pair:

- encrypt: ``workers`` vectors of ``values`` float32 values (trustgrad ``encrypt`` vs a loop of
  ``MakeCKKSPackedPlaintext`` + ``Encrypt`` on float64 slices);
- aggregate: slot-wise sum of the ``workers`` ciphertext vectors and one multiplication by ``1/workers``
  (trustgrad ``aggregate(..., scale=)`` vs ``EvalAddMany`` + ``EvalMult``);
- decrypt: the mean back to numpy (trustgrad ``decrypt`` vs ``Decrypt`` + ``GetRealPackedValueArray`` into one array).

Throughput is plaintext values per second (encrypt and aggregate count all workers' values); the ratio is
trustgrad's time over raw time (target <= 1.2). Each figure is the best of ``repeats`` runs. Set
``OMP_NUM_THREADS=1`` (``benchmarks/run`` does).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from trustgrad.crypto import CKKSParams, Context, aggregate, decrypt, encrypt, keygen

from ..options import OptionParser
from . import BENCHMARKS, BenchResult

__all__ = ["run"]

TARGET_RATIO = 1.2


def _best(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def run(values: int = 1_000_000, workers: int = 4, repeats: int = 3, seed: int = 0) -> dict[str, Any]:
    """Measure encrypt / aggregate / decrypt throughput via trustgrad and via raw OpenFHE; return the numbers."""
    if values < 1 or workers < 1 or repeats < 1:
        raise ValueError("values, workers and repeats must be positive")
    ctx = Context(CKKSParams.for_aggregation("shared"))
    pk, sk = keygen(ctx)
    cc, s = ctx.cc, ctx.slots
    rng = np.random.default_rng(seed)
    grads = [rng.standard_normal(values).astype(np.float32) for _ in range(workers)]

    def raw_encrypt() -> list[list[Any]]:
        out = []
        for g in grads:
            x = np.ascontiguousarray(g, dtype=np.float64)
            out.append([cc.Encrypt(pk._pk, cc.MakeCKKSPackedPlaintext(x[i : i + s])) for i in range(0, values, s)])
        return out

    def raw_aggregate(cts: list[list[Any]]) -> list[Any]:
        return [cc.EvalMult(cc.EvalAddMany(list(group)), 1.0 / workers) for group in zip(*cts, strict=True)]

    def raw_decrypt(cts: list[Any]) -> np.ndarray:
        out = np.empty(len(cts) * s)
        for i, ct in enumerate(cts):
            out[i * s : (i + 1) * s] = cc.Decrypt(sk._sk, ct).GetRealPackedValueArray()
        return out[:values].astype(np.float32)

    t_enc, evs = _best(lambda: [encrypt(pk, g) for g in grads], repeats)
    t_enc_raw, raw_cts = _best(raw_encrypt, repeats)
    t_agg, mean = _best(lambda: aggregate(evs, scale=1.0 / workers), repeats)
    t_agg_raw, raw_mean = _best(lambda: raw_aggregate(raw_cts), repeats)
    t_dec, out = _best(lambda: decrypt(sk, mean), repeats)
    t_dec_raw, out_raw = _best(lambda: raw_decrypt(raw_mean), repeats)

    reference = np.mean(np.stack(grads).astype(np.float64), axis=0)
    rows = {}
    for op, t, t_raw, n in (
        ("encrypt", t_enc, t_enc_raw, values * workers),
        ("aggregate", t_agg, t_agg_raw, values * workers),
        ("decrypt", t_dec, t_dec_raw, values),
    ):
        rows[op] = {"trustgrad_values_per_s": n / t, "raw_values_per_s": n / t_raw, "ratio": t / t_raw, "seconds": t}
    return {
        "values": values,
        "workers": workers,
        "ring_dim": ctx.ring_dim,
        "slots": s,
        "ciphertexts_per_vector": len(mean.ciphertexts),
        "ops": rows,
        "max_error": float(np.abs(out.astype(np.float64) - reference).max()),
        "max_error_raw": float(np.abs(out_raw.astype(np.float64) - reference).max()),
        "target_ratio": TARGET_RATIO,
        "passed": all(r["ratio"] <= TARGET_RATIO for r in rows.values()),
    }


def table(result: dict[str, Any]) -> str:
    """The result as a markdown table."""
    lines = [
        f"CKKS N={result['ring_dim']} ({result['slots']} slots), {result['values']:,} values x {result['workers']} "
        f"workers, max error {result['max_error']:.2e} (raw {result['max_error_raw']:.2e})",
        "",
        "| op | trustgrad values/s | raw OpenFHE values/s | ratio (target <= 1.2) |",
        "|---|---:|---:|---:|",
    ]
    for op, r in result["ops"].items():
        lines.append(
            f"| {op} | {r['trustgrad_values_per_s']:,.0f} | {r['raw_values_per_s']:,.0f} | {r['ratio']:.2f}x |"
        )
    return "\n".join(lines)


@BENCHMARKS.register("he_raw")
def _cli(args: list[str]) -> BenchResult:
    parser = OptionParser(prog="trustgrad bench he_raw", description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=1_000_000, help="values per worker vector")
    parser.add_argument("--workers", type=int, default=4, help="encrypted vectors aggregated")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    ns = parser.parse_args(args)
    result = run(ns.values, ns.workers, ns.repeats)
    return BenchResult("he_raw", table(result), result, result["passed"])


# -- the raw-OpenFHE anchor of the blind step check (``trustgrad bench blind``) ---------------------------------------


def raw_step_check(
    cc: Any, pk: Any, x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray, kind: str = "poly"
) -> dict[str, Any]:
    """The SGD-step check of a batch of ``logreg-poly`` written directly against OpenFHE (the prototype of
    docs/proposal.md's blind check): the batch is encrypted as one matrix, 16 features per ciphertext, so no
    gathering, no masks and no grouping. Slot ``fl * 512 + j * 16 + c`` of ciphertext k holds ``x_j[16 k + fl]``;
    ``W_k`` holds ``W[c, 16 k + fl]`` for every j; the weight claim sits at j = 0. Logits: 4 products and 4
    rotations; polynomial sigmoid; residuals times each X_k; sums over the 32 samples (5 rotations per ciphertext);
    the masked squared distance to the claim summed into slot 0 (8 rotations). Depth 6 (``kind="linear"``: no
    sigmoid, depth 4).

    Needs ``cc`` with depth >= 6, 8192 slots, rotation keys for the powers of two 1..4096, a batch of at most 32
    samples of 64 features and 10 classes. Returns the encrypted verdict and the seconds of encryption (batch, model,
    claim: what the data owner, server and worker would each encrypt) and of the check itself.
    """
    from trustgrad.blind.models import SIGMOID, reference_gradient

    fl, jn, cp, quads = 16, 32, 16, 4
    bsz, feats = x.shape
    classes = w.shape[0]
    if cc.GetRingDimension() // 2 != fl * jn * cp or feats != fl * quads or bsz > jn or classes > cp:
        raise ValueError("raw_step_check is written for 8192 slots, 64 features, <= 32 samples, <= 16 classes")
    dw, db = reference_gradient(kind, x, np.eye(classes)[y] if y.ndim == 1 else y, w, b)
    onehot = np.eye(classes)[y] if y.ndim == 1 else y

    def grid() -> np.ndarray:
        return np.zeros((fl, jn, cp))

    def enc(g: np.ndarray) -> Any:
        return cc.Encrypt(pk, cc.MakeCKKSPackedPlaintext(g.reshape(-1).tolist()))

    def rotsum(ct: Any, steps: list[int]) -> Any:
        for r in steps:
            ct = cc.EvalAdd(ct, cc.EvalRotate(ct, r))
        return ct

    t0 = time.perf_counter()
    xs, ws, cs = [], [], []
    for k in range(quads):
        gx, gw, gc = grid(), grid(), grid()
        gx[:, :bsz, :classes] = x[:, 16 * k : 16 * k + fl].T[:, :, None]
        gw[:, :, :classes] = w[:, 16 * k : 16 * k + fl].T[:, None, :]
        gc[:, 0, :classes] = dw[:, 16 * k : 16 * k + fl].T
        xs.append(enc(gx))
        ws.append(enc(gw))
        cs.append(enc(gc))
    gy, gb, gcb = grid(), grid(), grid()
    gy[:, :bsz, :classes] = onehot[None, :, :]
    gb[:, :, :classes] = b
    gcb[0, 0, :classes] = db
    y_ct, b_ct, cb_ct = enc(gy), enc(gb), enc(gcb)
    t_encrypt = time.perf_counter() - t0

    t0 = time.perf_counter()
    mask, cell = grid(), grid()
    mask[:, 0, :classes] = 1.0
    cell[0, :bsz, :classes] = 1.0 / bsz
    mask_pt = cc.MakeCKKSPackedPlaintext(mask.reshape(-1).tolist())
    bias_pt = cc.MakeCKKSPackedPlaintext((mask * (np.arange(fl) == 0)[:, None, None]).reshape(-1).tolist())
    cell_pt = cc.MakeCKKSPackedPlaintext(cell.reshape(-1).tolist())
    z = cc.Relinearize(cc.EvalAddMany([cc.EvalMultNoRelin(xk, wk) for xk, wk in zip(xs, ws)]))
    z = cc.EvalAdd(rotsum(z, [512, 1024, 2048, 4096]), b_ct)
    c0, c1, c3 = SIGMOID
    if kind == "poly":
        z = cc.EvalAdd(cc.EvalAdd(cc.EvalMult(cc.EvalMult(z, c3), cc.EvalSquare(z)), cc.EvalMult(z, c1)), c0)
    p = z
    r = cc.EvalSub(p, y_ct)
    sample_rots = [16, 32, 64, 128, 256]
    diffs = []
    for xk, ck in zip(xs, cs):
        t = rotsum(cc.EvalMult(r, cc.EvalMult(xk, 1.0 / bsz)), sample_rots)
        diffs.append(cc.EvalSub(cc.EvalMult(t, mask_pt), cc.EvalMult(ck, mask_pt)))
    tb = rotsum(cc.EvalMult(r, cell_pt), sample_rots)
    diffs.append(cc.EvalSub(cc.EvalMult(tb, bias_pt), cc.EvalMult(cb_ct, bias_pt)))
    q = cc.Relinearize(cc.EvalAddMany([cc.EvalMultNoRelin(d, d) for d in diffs]))
    verdict = rotsum(q, [1, 2, 4, 8, 512, 1024, 2048, 4096])
    t_check = time.perf_counter() - t0
    return {
        "verdict": verdict,
        "encrypt_s": t_encrypt,
        "check_s": t_check,
        "key_switches": 1 + 4 + 2 * (kind == "poly") + 4 + 25 + 1 + 8,
    }
