"""``trustgrad bench proof``: what Proof-of-Learning costs, measured against training in the same run.

Two further modes measure what a passed proof is worth (docs/proof.md):

- ``--soundness``: adaptive forgeries (one re-committed checkpoint, momentum decoys, partial interpolation at several
  f) against the default verifier: the exact acceptance probability (every segment replayed once, then the sampling
  rule) next to the acceptance over ``--nonces`` fresh nonces and the bound the verifier reports.
- ``--honest-zoo``: false rejections of honest proofs recorded by real 2-process allreduce runs, for ``--seeds``
  seeds x every model in the zoo.

Anchor: the same job (digits/mlp, allreduce, same worker count) trained without recording. Recording overhead is
(train time + proof finalisation with ``--proof record``) / (train time without) - 1, median over alternating
repetitions (target <= 10% at k=10; the reference's synchronous torch.save cost 24-32%). Verification time is reported
as a fraction of the training time next to the fraction of steps it re-executes (target: within 1.2x of it).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from ..config import RunConfig
from ..options import OptionParser
from . import BENCHMARKS, BenchResult


def _parse(args: list[str]) -> argparse.Namespace:
    p = OptionParser(prog="trustgrad bench proof", description=__doc__)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=7)  # runs of ~1 s: fewer medians are at the mercy of one hiccup
    p.add_argument("--q", type=int, default=1)
    p.add_argument("--r", type=int, default=None)
    p.add_argument("--soundness", action="store_true", help="adaptive forgeries: exact and sampled acceptance")
    p.add_argument("--honest-zoo", action="store_true", help="false rejections over --seeds x every zoo model")
    p.add_argument(
        "--deltas",
        type=lambda t: tuple(float(v) for v in t.split(",")),
        default=(0.01, 0.25),
        help="--max-forgery-acceptance values to measure (--soundness; default 0.01,0.25: the default and a loose one)",
    )
    p.add_argument("--nonces", type=int, default=100, help="fresh nonces per forgery (--soundness)")
    p.add_argument(
        "--rows",
        type=lambda t: tuple(v.strip() for v in t.split(",") if v.strip()),
        default=(),
        help="only the forgeries whose name starts with one of these comma-separated prefixes (--soundness; "
        "default all): "
        "a long confirmation split over processes or sessions",
    )
    p.add_argument("--models", type=lambda t: t.split(","), default=None, help="zoo models (--honest-zoo; default all)")
    p.add_argument("--seeds", type=int, default=20, help="seeds per zoo model (--honest-zoo)")
    p.add_argument("--steps", type=int, default=66, help="training steps of each proof (--soundness, --honest-zoo)")
    return p.parse_args(args)


@BENCHMARKS.register("proof")
def run_bench(args: list[str]) -> BenchResult:
    from ..proof import VerifyOptions, verify
    from ..run import run

    opts = _parse(args)
    if opts.soundness:
        from ._proof_soundness import soundness_bench

        return soundness_bench(opts)
    if opts.honest_zoo:
        from ._proof_soundness import honest_zoo_bench

        return honest_zoo_bench(opts)
    plain_t, rec_t, hook_t = [], [], []
    with tempfile.TemporaryDirectory(prefix="tg-bench-proof-") as tmp:
        base = RunConfig().replace(workers=opts.workers, epochs=opts.epochs, progress=False, proof={"k": opts.k})
        proof_dir = Path(tmp) / "rec" / "proof"
        for i in range(opts.repeats):  # interleaved, in alternating order, so load drift hits both alike
            if i % 2:
                rec = run(base.replace(out=str(Path(tmp) / "rec"), proof={"mode": "record"}))
            plain = run(base.replace(out=str(Path(tmp) / "plain")))
            plain_t.append(plain.summary["train_seconds"])
            if not i % 2:
                rec = run(base.replace(out=str(Path(tmp) / "rec"), proof={"mode": "record"}))
            rec_t.append(rec.summary["train_seconds"] + rec.summary.get("proof_finalize_seconds", 0.0))
            hook_t.append(rec.summary.get("proof_hook_seconds", 0.0) / rec.summary["train_seconds"])
        verdict = verify(proof_dir, VerifyOptions(q=opts.q, r=opts.r, threads=1))
        proof_bytes = sum(f.stat().st_size for f in proof_dir.rglob("*") if f.is_file())
    train, recorded = statistics.median(plain_t), statistics.median(rec_t)
    overhead = recorded / train - 1.0
    verify_fraction = verdict.seconds / train
    reexec = verdict.reexecuted_fraction
    ratio = verify_fraction / reexec if reexec else float("nan")
    passed = overhead <= 0.10 and ratio <= 1.2 and verdict.valid
    table = "\n".join(
        [
            f"proof bench: digits/mlp, allreduce x{opts.workers}, {verdict.steps} steps, k={opts.k}, "
            f"median of {opts.repeats}",
            "| measure | value | target |",
            "|---|---|---|",
            f"| training without proof (s) | {train:.3f} | anchor |",
            f"| training with --proof record (s) | {recorded:.3f} | |",
            f"| recording overhead (end to end) | {overhead:+.1%} | <= 10% |",
            f"| recorder time on the training thread / training | {statistics.median(hook_t):.1%} | |",
            f"| proof size (MB) | {proof_bytes / 1e6:.2f} | |",
            f"| verification (s), verdict | {verdict.seconds:.3f}, {'valid' if verdict.valid else 'INVALID'} | valid |",
            f"| verification time / training time | {verify_fraction:.1%} | |",
            f"| steps re-executed / training steps | {reexec:.1%} | |",
            f"| ratio of the two | {ratio:.2f}x | <= 1.2x |",
        ]
    )
    data = {
        "train_seconds": train,
        "record_seconds": recorded,
        "overhead": overhead,
        "hook_fraction": statistics.median(hook_t),
        "train_samples": plain_t,
        "record_samples": rec_t,
        "verify_seconds": verdict.seconds,
        "verify_fraction": verify_fraction,
        "reexecuted_fraction": reexec,
        "verify_to_reexec_ratio": ratio,
        "proof_bytes": proof_bytes,
        "valid": verdict.valid,
    }
    return BenchResult("proof", table, data, passed)
