"""The reference design's verifier (Jia et al.'s code as published), kept as a baseline the spoofs are shown against.

A per-tensor KS test of W0 against PyTorch's default initialization, then top-Q replay compared on the *weights* at
the reference thresholds; no commitment, seed, data-order or random-segment checks. The Fang and Zhang spoofs pass it
(docs/proof.md). Sizes and the memory budget are still checked: the baseline must not crash either.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from . import checks
from .verifier import Verdict, log, trust_named_factories

__all__ = ["verify_naive", "NAIVE_THRESHOLDS"]

#: the reference implementation's defaults (l1, l2, linf, cos on the weights)
NAIVE_THRESHOLDS = {"l1": 1000.0, "l2": 10.0, "linf": 0.1, "cos": 0.01}


def verify_naive(path: str | Path, q: int = 1, alpha: float = 0.01, data_dir: str | None = None) -> Verdict:
    """The reference design's verifier, as a baseline: KS test of W0 per tensor + top-Q replay, loose thresholds.

    It checks neither the commitment, nor W0 against a seed, nor the data order, nor any segment but the top-Q, and
    compares weights (not updates) at the reference thresholds — the gaps the published spoofs go through. (Sizes and
    the memory budget are still checked: the baseline must not crash either.)
    """
    started, audit = time.perf_counter(), checks.Audit()
    manifest = checks.read_manifest(path)
    # the baseline names no user code: a proof naming some is refused
    trust_named_factories(manifest, checks.VerifyOptions())
    verdict = Verdict(False, audit.reasons, mode="naive", thresholds=dict(NAIVE_THRESHOLDS), checks=audit.checks)
    try:
        proof = checks.open_proof(Path(path), manifest, audit, checks.VerifyOptions(data_dir=data_dir), commit=False)
        verdict.steps = proof.steps
        checks.build_declared_model(proof, audit)
        checks.load_indices(proof, audit)
        checks.check_checkpoints_and_bound(proof, audit, None)
        _naive_ks(proof, audit, alpha)
        segments = []
        for i in checks.top_q(proof, q):
            (a, b), epoch = proof.segments[i], proof.epoch(i)
            replayed = checks.reexecute(proof, a, b)
            d = _weight_distances(replayed, proof.store.get(b), proof)
            bad = tuple(f"{m} {d[m]:.3g} > {t:.3g}" for m, t in NAIVE_THRESHOLDS.items() if not d[m] <= t)
            segments.append(checks.SegmentCheck(a, b, epoch, "top-q", not bad, None, bad))
        checks.report_replay(audit, segments)
        verdict.segments = segments
        verdict.replayed_steps = sum(s.end - s.start for s in segments)
    except checks.Invalid:
        pass
    except (RuntimeError, ValueError, ArithmeticError, IndexError, KeyError, TypeError) as exc:
        log.exception("unexpected error while verifying %s (naive)", path)
        audit.fail("verifier", f"unexpected {type(exc).__name__} while checking this proof ({exc}); not accepted")
    verdict.valid = not audit.reasons
    verdict.seconds = time.perf_counter() - started
    return verdict


def _naive_ks(proof: checks.Proof, audit: checks.Audit, alpha: float) -> None:
    """Per-tensor KS test of W0 against PyTorch's default init U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (reference)."""
    from scipy.stats import kstest

    w0 = proof.store.get(0)
    fan_in: dict[str, int] = {}
    for name, p in proof.model.named_parameters():
        if p.dim() >= 2:
            fan_in[name.rsplit(".", 1)[0]] = int(np.prod(p.shape[1:]))
    for name, _ in proof.model.named_parameters():
        fan = fan_in.get(name.rsplit(".", 1)[0])
        if fan is None:
            continue
        bound = 1.0 / math.sqrt(fan)
        values = w0[f"model/{name}"].double().reshape(-1).numpy()
        p_value = float(kstest(values, "uniform", args=(-bound, 2 * bound)).pvalue)
        if p_value < alpha:
            audit.fail("ks", f"W0 tensor {name} fails the KS test (p = {p_value:.3g} < {alpha})")
    audit.ok("ks")


def _weight_distances(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], proof: checks.Proof) -> dict[str, float]:
    keys = [f"model/{n}" for n, _ in proof.model.named_parameters()]
    x = torch.cat([a[k].double().reshape(-1) for k in keys])
    y = torch.cat([b[k].double().reshape(-1) for k in keys])
    d = x - y
    cos = 1.0 - float(torch.dot(x, y)) / max(float(x.norm()) * float(y.norm()), 1e-300)  # |x||y|, not |x||x|
    return {"l1": float(d.abs().sum()), "l2": float(d.norm()), "linf": float(d.abs().max()), "cos": cos}
