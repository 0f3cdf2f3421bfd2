"""The audit threshold, calibrated to the replay platform: a stated multiple of measured honest nondeterminism.

A fixed threshold far above what honest workers produce is slack a liar can spend: with the old 3e-4 a worker could
push ``g + 2.9e-4 |g| u`` for any direction ``u`` (toward a backdoor, say) and pass every audit (docs/audits.md). So
the auditor measures, before training, how far an honest replay can be from an honest claim on this platform:

1. ``same_threads``: the same gradients (W0, the PRF batches of the first steps) replayed twice at the workers' thread
   count in float32 -- the situation of every audit in a local job (workers and auditor run the same code).
2. ``cross_threads``: replays at 1 vs 2 threads (and the workers' count) -- what workers on other thread counts or
   cores would add.
3. ``float64``: a float32 replay against a float64 one -- the size of float32 rounding itself.
4. ``channel``: what the claim's transport adds, e.g. a CKKS encrypt/decrypt round trip (encrypted audits). CKKS
   noise is absolute (it does not shrink with the gradient), so it is kept as an absolute l2 distance
   (``channel_abs``): a relative bound measured on the large gradients at W0 rejected an honest claim of step 7 whose
   gradient had shrunk (relative 2.1e-7 against 2.0e-7).

A claim is accepted iff ``|claim - replay| <= threshold x |replay| + abs_threshold``: ``threshold`` is ``MULTIPLE x``
the relative floor the policy (``--audit-threshold``) picks, ``abs_threshold`` is ``MULTIPLE x channel_abs``. Where
replay is bit-exact and the channel is plaintext both are 0: a claim must reproduce exactly.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..replica import Replica, make_optimizer
from ..thresholds import THRESHOLD_POLICIES, parse_policy

#: THRESHOLD_POLICIES (and parse_policy) live in ``trustgrad.thresholds``, below the config that validates with them
__all__ = ["MULTIPLE", "Calibration", "Measured", "THRESHOLD_POLICIES", "calibrate", "threads"]

log = logging.getLogger(__name__)

#: the threshold is this multiple of the measured floor: the floor is a maximum over a few replays, honest claims
#: over a whole run may land somewhat above it (CKKS noise is random), so leave an order of magnitude
MULTIPLE = 10.0

#: the fixed threshold audits used before calibration (kept for comparison: ``--audit-threshold 3e-4``)
LEGACY_THRESHOLD = 3e-4

#: gradients replayed per measurement: enough to see nondeterminism if there is any, cheap (~1 ms each for an MLP)
SAMPLES = 8


@dataclass(frozen=True)
class Measured:
    """Worst relative l2 between two honest computations of the same gradient, per source of difference."""

    same_threads: float
    cross_threads: float
    float64: float
    channel: float
    channel_abs: float
    samples: int
    threads: int
    seconds: float


@dataclass(frozen=True)
class Calibration:
    """The auditor's relative-l2 threshold and the measurement it rests on (reported in the run summary)."""

    threshold: float
    abs_threshold: float
    policy: str
    floor: float
    multiple: float
    basis: str
    measured: Measured | None

    def summary(self) -> dict[str, Any]:
        return {
            "audit_threshold": self.threshold,
            "audit_threshold_abs": self.abs_threshold,
            "audit_threshold_policy": self.policy,
            "audit_threshold_basis": self.basis,
            "audit_honest_floor": self.floor,
            "audit_threshold_multiple": self.multiple,
            "audit_calibration": asdict(self.measured) if self.measured is not None else None,
        }


def decide(policy: str, measured: Measured | None) -> Calibration:
    """The threshold a policy sets from a measurement (an explicit number needs none)."""
    choice = parse_policy(policy)
    if isinstance(choice, float):
        basis = f"explicit --audit-threshold {choice:g} (not calibrated)"
        return Calibration(choice, 0.0, "explicit", float("nan"), float("nan"), basis, measured)
    if measured is None:
        raise ValueError(f"policy {policy!r} needs a measurement")
    floor, what = THRESHOLD_POLICIES.get(choice)(measured)
    threshold, absolute = MULTIPLE * floor, MULTIPLE * measured.channel_abs
    if floor == 0.0:
        basis = f"exact: {what} was bit-exact in {measured.samples} honest replays (measured floor 0)"
    else:
        basis = f"{MULTIPLE:g} x {floor:.3g}, the worst {what} in {measured.samples} honest replays"
    if absolute:
        basis += f"; plus {MULTIPLE:g} x {measured.channel_abs:.3g} absolute l2, the worst claim-channel error"
    return Calibration(threshold, absolute, choice, floor, MULTIPLE, basis, measured)


@contextmanager
def threads(count: int) -> Iterator[None]:
    """Run torch ops with ``count`` intra-op threads (the replay must use the prover's count to be bit-exact)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm()) / max(float(b.norm()), 1e-300)


def calibrate(
    replica: Replica,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    params: torch.Tensor,
    worker_threads: int,
    channel: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Measured:
    """Measure honest nondeterminism of replay on ``batches`` at ``params`` (the four sources of the docstring)."""
    started = time.perf_counter()

    def grads(rep: Replica, count: int, p: torch.Tensor) -> list[torch.Tensor]:
        out = []
        with threads(count):
            for x, y in batches:
                rep.set_flat_params(p)
                rep.compute_gradients(x.to(p.dtype), y)
                out.append(rep.flat_grad().clone())
        return out

    base = grads(replica, worker_threads, params)
    again = grads(replica, worker_threads, params)
    other = {1, 2, worker_threads} - {worker_threads}
    cross = [grads(replica, t, params) for t in sorted(other)]
    model64 = copy.deepcopy(replica.model).double()
    rep64 = Replica(model64, make_optimizer(model64, 0.1), replica.loss_fn)
    wide = grads(rep64, worker_threads, params.double())
    sent = [channel(g) for g in base] if channel is not None else base
    measured = Measured(
        same_threads=max(_rel(a, b) for a, b in zip(again, base)),
        cross_threads=max((_rel(a, b) for c in cross for a, b in zip(c, base)), default=0.0),
        float64=max(_rel(a, b) for a, b in zip(base, wide)),
        channel=max(_rel(a, b) for a, b in zip(sent, base)),
        channel_abs=max(float((a.double() - b.double()).norm()) for a, b in zip(sent, base)),
        samples=len(batches),
        threads=worker_threads,
        seconds=round(time.perf_counter() - started, 4),
    )
    log.info("audit calibration: %s", measured)
    return measured
