"""``trustgrad verify PROOF``: check a Proof-of-Learning folder; exit 0 valid, 1 invalid, 2 unusable input."""

from __future__ import annotations

import argparse
import json
import math

__all__ = ["add_parser", "render_verdict"]

#: claims a reader may mistake for verified: what carried the gradients, where, how, and with whom
_TRAJECTORY_FREE = {"pattern", "name", "device", "threads", "encrypt", "keys", "malicious"}


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:  # also refuses nan: every comparison with nan is false
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _mebibytes(text: str) -> int:
    value = float(text)
    if not (math.isfinite(value) and 0 < value <= 1 << 40):
        raise argparse.ArgumentTypeError(f"must be a positive number of MiB (at most 2^40), got {text}")
    return max(1, int(value * 2**20))


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "verify",
        help="verify a Proof-of-Learning written by `trustgrad train --proof record`",
        description="Check a proof (OUT/proof): commitment, sizes and memory budget first, then initial weights, data "
        "order, update sizes, and re-execute the largest segment of every epoch plus enough random ones (each with "
        "the segment before it) that a proof with at least a fraction F of wrong segments is accepted with "
        "probability at most DELTA. Exit 0 if valid, 1 if invalid, 2 if the input is not a usable proof. "
        "Example: trustgrad verify runs/a/proof --max-forgery-acceptance 0.001 --json",
    )
    parser.add_argument("proof", metavar="PROOF", help="the proof folder (OUT/proof)")
    parser.add_argument("--json", action="store_true", help="print the verdict as one JSON object")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for re-execution (default: as is)")
    parser.add_argument("--naive", action="store_true", help="the reference design's verifier (KS test + top-Q only)")
    parser.add_argument(
        "--max-forgery-acceptance",
        metavar="DELTA",
        type=_probability,
        default=0.01,
        help="largest acceptance probability allowed for a proof with >= F wrong segments; sets how many segments "
        "are re-executed (default 0.01)",
    )
    parser.add_argument(
        "--forged-fraction",
        metavar="F",
        type=_probability,
        default=0.1,
        help="the fraction of wrong segments DELTA is stated for (default 0.1)",
    )
    parser.add_argument("--all", action="store_true", help="re-execute every segment (no forged segment escapes)")
    parser.add_argument("--q", type=int, default=1, help="largest updates re-executed per epoch (default 1)")
    parser.add_argument("--r", type=int, default=None, help="random segments to draw (default: chosen from DELTA, F)")
    parser.add_argument("--nonce", help="challenge nonce (hex); default: fresh random, printed for reproduction")
    parser.add_argument("--expect-seed", type=int, help="the seed this prover registered: rejects copied proofs")
    parser.add_argument("--expect-root", help="the commitment root the prover published when it trained")
    parser.add_argument("--data-dir", help="folder holding the training set, for datasets read from files")
    for kind in ("model", "loss", "dataset"):
        parser.add_argument(
            f"--{kind}",
            metavar="PKG.MOD:NAME",
            help=f"the {kind} factory you trust, for a proof of a run with a user's {kind}: it must be the one the "
            "proof names (a proof never makes verify import code by itself)",
        )
    parser.add_argument(
        "--memory-budget",
        metavar="MIB",
        type=_mebibytes,
        default=None,
        help="memory one verification may plan to use (default: half of what is available)",
    )
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..proof import VerifyOptions, verify, verify_naive

    for name in ("threads", "q"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1")
    if args.r is not None and args.r < 0:
        raise ConfigError("--r must be >= 0")
    if args.naive and (args.model or args.loss or args.dataset):
        raise ConfigError("--naive verifies zoo models only: it takes no --model, --loss or --dataset")
    if args.naive:
        verdict = verify_naive(args.proof, q=args.q, data_dir=args.data_dir)
    else:
        options = VerifyOptions(
            q=args.q,
            r=args.r,
            max_forgery_acceptance=args.max_forgery_acceptance,
            forged_fraction=args.forged_fraction,
            check_all=args.all,
            nonce=args.nonce,
            threads=args.threads,
            expected_seed=args.expect_seed,
            expected_root=args.expect_root,
            data_dir=args.data_dir,
            memory_budget=args.memory_budget,
            model_factory=args.model,
            loss_factory=args.loss,
            dataset_factory=args.dataset,
        )
        verdict = verify(args.proof, options)
    print(json.dumps(verdict.to_dict()) if args.json else render_verdict(verdict))
    return 0 if verdict.valid else 1


def render_verdict(v) -> str:  # noqa: ANN001 - a Verdict; imported lazily to keep `trustgrad --help` fast
    head = f"proof {'VALID' if v.valid else 'INVALID'} ({v.mode} verifier, {v.seconds:.2f} s"
    head += f", re-executed {v.reexecuted_fraction:.0%} of {v.steps} steps)"
    lines = [head]
    if v.root:
        lines.append(f"  commitment root {v.root[:16]}..., challenge nonce {v.nonce}")
    if v.soundness:
        from ..proof.soundness import Soundness

        lines.append(f"  soundness: {Soundness(**v.soundness).statement()}")
    for s in v.segments:
        status = "ok  " if s.passed else "FAIL"
        if s.distances is not None:
            d = s.distances
            rel = d.l2 / d.ref_l2 if d.ref_l2 else float("nan")
            detail = f"l2 {d.l2:.2e} ({rel:.1e} of the update {d.ref_l2:.3g}), cos {d.cos:.1e}"
        else:
            detail = "; ".join(s.violations) or "within the reference thresholds"
        lines.append(f"  {status} {s.chosen_by:11} segment {s.start}-{s.end} (epoch {s.epoch}): {detail}")
    unread = sorted(
        k
        for k in v.claims.get("not_checked", {})
        if k.split(".")[-1] in _TRAJECTORY_FREE and k.split(".")[0] != "model"
    )
    if unread:
        lines.append(f"  not evidenced by the proof (taken on trust; --json says why): {', '.join(unread)}")
    lines += [f"  reason: {r}" for r in v.reasons]
    return "\n".join(lines)
