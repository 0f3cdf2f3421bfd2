"""Seeded data augmentation: random crops (zero padding 4) and horizontal flips that a verifier replays exactly.

Every decision is a PRF of the run's committed seed: worker ``w``'s batch at global step ``t`` draws one row
``(dy, dx, flip)`` per sample position from ``seeding.rng(seed, "augment", w, t)``, as batch order comes from
``seeding.rng(seed, "order", w, epoch)`` (DESIGN: nothing the prover may choose). A trainer, the proof verifier and
the per-claim auditor apply the same ``Augment`` to the same indices and get the same bytes: crops and flips only copy
pixels, so replay is bit-exact. Nothing needs storing: the decisions follow from the seed in the proof's manifest.

>>> aug = Augment("crop-flip", seed=0)
>>> x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
>>> torch.equal(aug.apply(x, worker=0, step=5), aug.apply(x, worker=0, step=5))
True
>>> aug.decisions(0, 5, 2).shape
(2, 3)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from .errors import ConfigError
from .registry import Registry
from .seeding import rng

__all__ = ["Augment", "AUGMENTATIONS", "PAD"]

#: the padding of CIFAR's standard augmentation (He et al. 2016, sec. 4.2): crops move by up to 4 pixels each way
PAD = 4

#: name -> ``decisions -> (dy, dx, flip) ranges``: what each augmentation draws per sample
AUGMENTATIONS: Registry[tuple[int, int, int]] = Registry("augmentation")
AUGMENTATIONS.register("none")((1, 1, 1))  # nothing drawn: crop offset PAD (the identity), no flip
AUGMENTATIONS.register("crop-flip")((2 * PAD + 1, 2 * PAD + 1, 2))
AUGMENTATIONS.register("flip")((1, 1, 2))


@dataclass(frozen=True)
class Augment:
    """The augmentation of a run: its name (``--augment``) and the seed its decisions derive from."""

    name: str
    seed: int

    def __post_init__(self) -> None:
        AUGMENTATIONS.get(self.name)  # ConfigError listing the known names

    @property
    def active(self) -> bool:
        return self.name != "none"

    def decisions(self, worker: int, step: int, size: int) -> np.ndarray:
        """``[size, 3]`` int64: (dy, dx, flip) of each sample position of ``worker``'s batch at ``step``."""
        highs = AUGMENTATIONS.get(self.name)
        if not self.active:
            return np.tile(np.array([PAD, PAD, 0], dtype=np.int64), (size, 1))
        return rng(self.seed, "augment", worker, step).integers(0, highs, size=(size, 3)).astype(np.int64)

    def apply(self, x: torch.Tensor, worker: int, step: int) -> torch.Tensor:
        """``x`` (a batch of (C, H, W) images) with this step's crops and flips; ``x`` itself when inactive."""
        if not self.active:
            return x
        return apply_decisions(x, self.decisions(worker, step, len(x)))


def apply_decisions(x: torch.Tensor, decisions: np.ndarray) -> torch.Tensor:
    """Crop each padded image at its (dy, dx) and flip it where asked: only copies, so bit-exact on replay."""
    if x.dim() != 4:
        raise ConfigError(f"augmentation needs image batches (N, C, H, W), got shape {tuple(x.shape)}")
    height, width = x.shape[2], x.shape[3]
    padded = F.pad(x, (PAD, PAD, PAD, PAD))
    rows = []
    for image, (dy, dx, flip) in zip(padded, decisions.tolist()):
        crop = image[:, dy : dy + height, dx : dx + width]
        rows.append(crop.flip(-1) if flip else crop)
    return torch.stack(rows)


def augmenter(cfg: object) -> Callable[[torch.Tensor, int, int], torch.Tensor]:
    """``(x, worker, step) -> x`` of a run's config (``cfg.augment``, ``cfg.seed``)."""
    return Augment(getattr(cfg, "augment", "none"), cfg.seed).apply  # type: ignore[attr-defined]
