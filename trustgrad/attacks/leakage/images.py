"""Offline victim images (no downloads): scikit-learn's handwritten digits and crops of its two bundled photos.

>>> x, y = digits([0, 1, 2])
>>> tuple(x.shape), y.tolist(), float(x.min()) >= 0.0, float(x.max()) <= 1.0
((3, 1, 32, 32), [0, 1, 2], True, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from ...errors import DataError

__all__ = ["digits", "photo_crops"]


@lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def digits(indices: Sequence[int], size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits ``indices`` of ``load_digits`` (1,797 8x8 images), bilinearly upsampled to ``size`` x ``size``.

    Returns float32 images (N, 1, size, size) with values in [0, 1] and int64 labels (N,).
    """
    images, labels = _digits_raw()
    idx = np.asarray(list(indices), dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= len(images)):
        raise DataError(f"digit indices must be in [0, {len(images)}), got {idx.min()}..{idx.max()}")
    x = torch.from_numpy(images[idx])[:, None]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(0.0, 1.0), torch.from_numpy(labels[idx])


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    try:
        from sklearn.datasets import load_sample_images

        return tuple(np.asarray(im, dtype=np.float32) / 255.0 for im in load_sample_images().images)
    except ImportError as e:  # load_sample_images needs Pillow
        raise DataError(f"scikit-learn's sample photos need Pillow: {e}") from None


def photo_crops(n: int, size: int = 32, *, seed: int = 0, zoom: int = 4) -> torch.Tensor:
    """``n`` RGB crops (n, 3, size, size) in [0, 1] of scikit-learn's two sample photos (china, flower).

    Each crop takes a random ``size * zoom`` square (photo and position drawn from ``seed``) and shrinks it to
    ``size`` by area averaging, so a 32x32 crop shows an object rather than a few pixels of texture.
    """
    photos = _photos()
    rng = np.random.default_rng(seed)
    side = size * zoom
    crops = []
    for _ in range(n):
        im = photos[int(rng.integers(len(photos)))]
        top = int(rng.integers(im.shape[0] - side + 1))
        left = int(rng.integers(im.shape[1] - side + 1))
        crops.append(torch.from_numpy(np.ascontiguousarray(im[top : top + side, left : left + side])))
    if not crops:
        return torch.zeros(0, 3, size, size)
    x = torch.stack(crops).permute(0, 3, 1, 2)
    return torch.nn.functional.adaptive_avg_pool2d(x, size).clamp(0.0, 1.0).contiguous()
