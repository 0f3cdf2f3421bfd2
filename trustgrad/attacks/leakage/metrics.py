"""Image and label metrics for reconstructions, in [0, 1] data range.

- MSE and PSNR with data range 1 (PSNR of identical images is ``inf``);
- SSIM of Wang et al. 2004 (IEEE TIP 13(4)): 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, "valid" filtering,
  the mean SSIM map averaged over channels (RGB is scored per channel, as in the reference implementation);
- order-free label accuracy: the multiset overlap of recovered and true labels over the batch size;
- order-free image matching: the Hungarian assignment minimizing the summed MSE.

>>> x = torch.rand(1, 32, 32)
>>> psnr(x, x), round(ssim(x, x), 6)
(inf, 1.0)
>>> label_accuracy([3, 3, 5], [5, 3, 1])
0.6666666666666666
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["mse", "psnr", "ssim", "label_accuracy", "match"]

_K1, _K2, _WIN, _SIGMA = 0.01, 0.03, 11, 1.5


def _pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(x).detach().to(torch.float64).cpu()
    y = torch.as_tensor(y).detach().to(torch.float64).cpu()
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    return x, y


def mse(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared error over all elements."""
    x, y = _pair(x, y)
    return float(((x - y) ** 2).mean())


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(range^2 / MSE)``; ``inf`` for identical images."""
    err = mse(x, y)
    return math.inf if err == 0.0 else 10.0 * math.log10(data_range**2 / err)


def _gaussian_window(size: int = _WIN, sigma: float = _SIGMA) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean structural similarity of two images (C, H, W) or (H, W); 1.0 iff identical, symmetric, in [-1, 1].

    Images smaller than the 11x11 window use a window of their own (odd) size.
    """
    x, y = _pair(x, y)
    if x.dim() == 2:
        x, y = x[None], y[None]
    if x.dim() != 3:
        raise ValueError(f"ssim expects (C, H, W) or (H, W) images, got shape {tuple(x.shape)}")
    c = x.shape[0]
    size = min(_WIN, x.shape[1], x.shape[2])
    size -= 1 - size % 2
    w = _gaussian_window(size, _SIGMA * size / _WIN).expand(c, 1, size, size)

    def filt(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t[None], w, groups=c)[0]

    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx * mx
    syy = filt(y * y) - my * my
    sxy = filt(x * y) - mx * my
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx * mx + my * my + c1) * (sxx + syy + c2)
    return float((num / den).mean())


def label_accuracy(true: Sequence[int], recovered: Sequence[int]) -> float:
    """Order-free accuracy: the size of the multiset intersection over the number of true labels."""
    if not true:
        return 1.0
    overlap = Counter(int(t) for t in true) & Counter(int(r) for r in recovered)
    return sum(overlap.values()) / len(true)


def match(truth: torch.Tensor, reconstruction: torch.Tensor) -> list[int]:
    """For each true image i, the index of the reconstruction assigned to it (Hungarian on pairwise MSE)."""
    x = truth.detach().to(torch.float64).cpu().flatten(1)
    y = reconstruction.detach().to(torch.float64).cpu().flatten(1)
    if x.shape != y.shape:
        raise ValueError(f"cannot match {x.shape[0]} true images to {y.shape[0]} reconstructions of other shape")
    cost = torch.cdist(x, y) ** 2 / x.shape[1]
    rows, cols = linear_sum_assignment(np.nan_to_num(cost.numpy(), nan=1e300, posinf=1e300))
    order = [0] * x.shape[0]
    for r, col in zip(rows, cols, strict=True):
        order[int(r)] = int(col)
    return order
