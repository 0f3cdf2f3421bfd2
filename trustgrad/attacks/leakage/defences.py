"""Defences as pure functions on a view (a list of gradient tensors), and the aggregated view of W workers.

- :func:`no_defence`: the view as sent.
- :func:`gaussian_noise`: add N(0, sigma^2) to every tensor, with ``sigma = relative_std * RMS(tensor)`` (the
  root-mean-square of that tensor's entries), so every layer gets the same signal-to-noise ratio whatever its scale.
  ``relative_to="norm"`` uses the tensor's L2 norm instead of its RMS (sigma larger by sqrt(numel)).
- :func:`prune`: per tensor, zero the ``fraction`` of entries with the smallest magnitude (DLG's "gradient
  pruning", Zhu et al. 2019 Sec. 5); ``fraction=0.9`` keeps the top 10%.
- :func:`aggregate` / :func:`aggregated_view`: the server of a synchronous data-parallel step sees the mean of W
  workers' gradients, each computed on a different batch.

>>> g = [torch.tensor([3.0, -0.1, 0.2, -4.0])]
>>> prune(g, 0.5)[0].tolist()
[3.0, 0.0, 0.0, -4.0]
>>> aggregate([[torch.ones(2)], [torch.zeros(2)]])[0].tolist()
[0.5, 0.5]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from ...errors import AttackError
from ...registry import Registry
from .base import observe_gradients

__all__ = ["DEFENCES", "no_defence", "gaussian_noise", "prune", "aggregate", "aggregated_view"]

Gradients = list[torch.Tensor]
DEFENCES: Registry[Callable[..., Gradients]] = Registry("defence")


@DEFENCES.register("none")
def no_defence(gradients: Sequence[torch.Tensor]) -> Gradients:
    """The view unchanged (copied)."""
    return [g.detach().clone() for g in gradients]


@DEFENCES.register("noise")
def gaussian_noise(
    gradients: Sequence[torch.Tensor],
    relative_std: float,
    *,
    seed: int = 0,
    relative_to: Literal["rms", "norm"] = "rms",
) -> Gradients:
    """Each tensor plus Gaussian noise of std ``relative_std`` times the tensor's RMS (or L2 norm)."""
    if relative_std < 0 or not math.isfinite(relative_std):
        raise AttackError(f"relative_std must be a finite value >= 0, got {relative_std}")
    if relative_to not in ("rms", "norm"):
        raise AttackError(f"relative_to must be 'rms' or 'norm', got {relative_to!r}")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for g in gradients:
        g = g.detach()
        scale = g.norm() if relative_to == "norm" else g.pow(2).mean().sqrt()
        noise = torch.randn(g.shape, generator=gen, dtype=torch.float64).to(g)
        out.append(g + noise * (relative_std * scale))
    return out


@DEFENCES.register("prune")
def prune(gradients: Sequence[torch.Tensor], fraction: float) -> Gradients:
    """Per tensor, zero the ``fraction`` of entries smallest in magnitude (ties broken by position)."""
    if not 0.0 <= fraction <= 1.0:
        raise AttackError(f"prune fraction must be in [0, 1], got {fraction}")
    out = []
    for g in gradients:
        flat = g.detach().flatten().clone()
        drop = int(math.floor(fraction * flat.numel()))
        if drop:
            idx = torch.argsort(flat.abs(), stable=True)[:drop]
            flat[idx] = 0
        out.append(flat.view_as(g))
    return out


def aggregate(views: Sequence[Sequence[torch.Tensor]]) -> Gradients:
    """The element-wise mean of W workers' gradient lists."""
    if not views:
        raise AttackError("aggregate needs at least one worker's gradients")
    shapes = [tuple(g.shape) for g in views[0]]
    for w, v in enumerate(views):
        if [tuple(g.shape) for g in v] != shapes:
            raise AttackError(f"worker {w}'s gradients do not have the shapes of worker 0's")
    return [torch.stack([v[i].detach() for v in views]).mean(0) for i in range(len(shapes))]


def aggregated_view(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Gradients:
    """What the server sees when W workers each compute a gradient on their own (images, labels) and it averages."""
    return aggregate([observe_gradients(model, x, y) for x, y in batches])
