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

Threshold keys add flooding noise of ~2e-4 to each decryption (docs/threshold-keys.md), far above any usable grid:
Adam is refused with them (``RunConfig``).

>>> import numpy as np
>>> v = quantize(np.array([0.1, -0.25, 3e-8]))
>>> float(v[2]), bool(np.all(snap_mean(v * 2 + 1e-9, workers=2) == v * 2))
(0.0, True)
"""

from __future__ import annotations

import numpy as np

__all__ = ["GRID", "FIXED_POINT", "fixed_point", "quantize", "snap", "snap_mean"]

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
