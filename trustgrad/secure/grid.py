"""Fixed-point updates, so that every key holder decrypts an aggregate to the same bits.

OpenFHE's CKKS decoding adds fresh Gaussian noise on every decryption (its mitigation of key recovery from
decryptions, Li-Micciancio): two decryptions of one ciphertext differ by about 5e-9 here (scale 2^40). SGD turns
that into weight differences of the same size, which audits absorb (their calibrated absolute term). Adam does not:
on a coordinate whose mean gradient is near zero it divides the noise by its own square root and steps by about lr,
so each worker's replica, and the auditor's copy, drifted apart within three rounds (measured: honest claims off by
1e-5..1e-4 relative l2 and rejected).

The fix keeps decryption as it is and makes its input discrete: workers round ``g / W`` to multiples of
:data:`GRID` (2^-20) before encrypting; the encrypted sum is then on the grid, the decryption noise is ~100x smaller
than half a step, and rounding the decrypted sum back to the grid gives every party the exact same values. The
server's survivor rescaling (``W / k`` when only k workers count) moves the grid to ``GRID * W / k``;
:func:`snap_mean` finds the largest k whose grid every coordinate fits (the same choice for every party: fitting is
decided at a quarter step, far from the noise). Quantization costs at most GRID / 2 per coordinate, the same for every
party; it applies to optimizers listed in :data:`FIXED_POINT` only, so SGD runs are bit-for-bit what they were.

Threshold keys add flooding noise of ~2e-4 to each decryption (docs/threshold-keys.md), far above this grid. Under
audits the auditor encrypts the claims and fuses each mean itself (``protect/codecs/audited.py``), so it can move them
onto a grid of its own first (:class:`GainedGrid`): it multiplies a round's claims by a power of two (the *gain*) that
keeps them inside CKKS's headroom, rounds them to integer multiples of a step 32 sqrt(n) flooding sigmas wide, and
after fusing rounds the decrypted sum back to an integer count of steps. The flooding noise is added in the units of
the decrypted values, so the gain shrinks it relative to the claims; the rounding removes it (16 sigmas from a step's
edge), and the result is the exact integer sum of the rounded claims: the same bits in every run, whatever the
flooding drew. A count that differs from the sum the auditor encrypted means the server aggregated something else.
Without audits, threshold keys and Adam are refused (``RunConfig``).

>>> import numpy as np
>>> v = quantize(np.array([0.1, -0.25, 3e-8]))
>>> float(v[2]), bool(np.all(snap_mean(v * 2 + 1e-9, workers=2) == v * 2))
(0.0, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["GRID", "FIXED_POINT", "fixed_point", "quantize", "snap", "snap_mean", "GainedGrid", "HEADROOM"]

GRID = 2.0**-20
#: optimizers whose replicas need every party to hold the same decrypted bits (see the module docstring)
FIXED_POINT = {"sgd": False, "adam": True}


def fixed_point(cfg: object) -> bool:
    """Whether this run's encrypted updates travel on the grid."""
    return FIXED_POINT[getattr(cfg, "optimizer", "sgd")]


def quantize(values: np.ndarray) -> np.ndarray:
    """``values`` rounded to multiples of :data:`GRID` (float64: exact for |value| < 2^32)."""
    return np.round(np.asarray(values, dtype=np.float64) / GRID) * GRID


def snap(values: np.ndarray, step: float = GRID) -> np.ndarray:
    """Decrypted values back onto their grid."""
    return np.round(np.asarray(values, dtype=np.float64) / step) * step


def snap_mean(mean: np.ndarray, workers: int) -> np.ndarray:
    """A decrypted ``(W / k) * sum`` back onto its grid: the largest survivor count k whose grid fits every value."""
    mean = np.asarray(mean, dtype=np.float64)
    for k in range(workers, 0, -1):
        step = GRID * workers / k
        snapped = snap(mean, step)
        if mean.size == 0 or float(np.abs(mean - snapped).max()) < step / 4:
            return snapped
    return snap(mean)  # nothing fits: not an aggregate of grid values; the nearest grid point is the best guess


#: the largest magnitude a gained claim may take: decrypted values must stay below 2**(first_mod_bits - scale_bits - 1)
#: (512 at the threshold parameters 60/50, ``crypto/params.py``); a mean is no larger than the largest claim, and 256
#: leaves a factor of 2 over the flooding noise and the CKKS error (both below 1e-2)
HEADROOM = 256.0
MAX_GAIN = 2.0**20
#: the step is this many fused flooding sigmas wide: noise must reach 16 sigmas to round a count wrong (~1e-57)
STEP_SIGMAS = 32.0


@dataclass(frozen=True)
class GainedGrid:
    """One round's grid at the auditor (threshold keys): ``gain`` (a power of two) and ``step`` (in gained units).

    >>> import torch
    >>> grid = GainedGrid.for_round([torch.tensor([0.5, -0.2]), torch.tensor([0.1, 0.0])], sigma=1.2e-4, parties=2)
    >>> grid.gain, grid.step
    (512.0, 0.0078125)
    >>> counts = [grid.counts(c, workers=2) for c in ([0.5, -0.2], [0.1, 0.0])]
    >>> total = counts[0] + counts[1]
    >>> fused = total * grid.step + 3e-4  # the flooding noise of a decryption
    >>> bool((grid.decode(fused, workers=2, k=2) == total).all()), grid.mean(total, workers=2, k=2).tolist()
    (True, [0.3000030517578125, -0.100006103515625])
    """

    gain: float
    step: float

    @classmethod
    def for_round(cls, claims: list, sigma: float, parties: int) -> GainedGrid:
        """The largest power-of-two gain that keeps every claim within :data:`HEADROOM`, and a step
        :data:`STEP_SIGMAS` fused flooding sigmas (``sqrt(parties) * sigma``) wide, rounded up to a power of two."""
        peak = max((float(np.abs(np.asarray(c, dtype=np.float64)).max()) for c in claims if len(c)), default=0.0)
        if not math.isfinite(peak) or peak >= HEADROOM:
            gain = 1.0
        else:
            gain = MAX_GAIN if peak == 0.0 else min(MAX_GAIN, 2.0 ** math.floor(math.log2(HEADROOM / peak)))
        step = 2.0 ** math.ceil(math.log2(STEP_SIGMAS * math.sqrt(parties) * max(sigma, 2.0**-40)))
        return cls(float(gain), float(step))

    def counts(self, claim: object, workers: int) -> np.ndarray:
        """A claim as whole steps of ``gain * claim / workers`` (what the auditor encrypts, times ``step``)."""
        return np.round(np.asarray(claim, dtype=np.float64) * (self.gain / workers) / self.step)

    def decode(self, fused: np.ndarray, workers: int, k: int) -> np.ndarray:
        """The fused ``(workers / k) * sum`` (the server's survivor scaling) back to whole steps of the sum."""
        return np.round(np.asarray(fused, dtype=np.float64) * (k / workers) / self.step)

    def mean(self, total: np.ndarray, workers: int, k: int) -> np.ndarray:
        """The mean gradient of ``k`` claims whose counts add up to ``total``."""
        return total * (self.step * workers / self.gain) / k
