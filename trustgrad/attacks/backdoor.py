"""A trigger-patch backdoor (Gu et al. 2017, BadNets) and a steering push toward it bounded by the audit threshold.

The backdoor: a white ``PATCH x PATCH`` square in the bottom-right corner of an image makes the model answer
``TARGET``. Its *success rate* is the fraction of test images of other classes that the model classifies as
``TARGET`` once the patch is added (a clean model: near 0).

The steering worker (``--malicious rank=R,attack=steer,strength=S``) pushes, at every step,
``g + S |g| u`` with ``g`` its honest gradient and ``u`` the unit gradient of the backdoor loss (its own batch with
the patch, labelled ``TARGET``): the relative l2 distance to the honest gradient is exactly ``S``, so it passes any
audit whose threshold is at least ``S`` (the old fixed 3e-4 admitted S = 2.9e-4) and nothing where replay is exact.

>>> x = torch.zeros(2, 1, 8, 8)
>>> float(add_trigger(x)[:, :, -2:, -2:].min()), float(add_trigger(x)[:, :, :-2].max())
(1.0, 0.0)
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TARGET", "PATCH", "add_trigger", "backdoor_success", "steer"]

TARGET = 0
PATCH = 2


def add_trigger(x: torch.Tensor) -> torch.Tensor:
    """Images ``(n, C, H, W)`` (or flat ``(n, F)``: the last ``PATCH**2`` features) with the patch set to the max."""
    out = x.clone()
    high = float(x.max()) if x.numel() else 1.0
    if out.dim() >= 3:
        out[..., -PATCH:, -PATCH:] = max(high, 1.0)
    else:
        out[..., -(PATCH * PATCH) :] = max(high, 1.0)
    return out


@torch.no_grad()
def backdoor_success(model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor) -> float:
    """Fraction of the test images not of class ``TARGET`` that the patch makes the model call ``TARGET``."""
    keep = y_test != TARGET
    model.eval()
    predicted = model(add_trigger(x_test[keep])).argmax(1)
    return float((predicted == TARGET).float().mean())


def steer(replica, x: torch.Tensor, honest: torch.Tensor, strength: float) -> torch.Tensor:
    """``honest + strength |honest| u``: ``u`` the unit gradient of the backdoor loss at the replica's weights."""
    from ..replica import Replica

    target = torch.full((len(x),), TARGET, dtype=torch.int64)
    Replica.compute_gradients(replica, add_trigger(x), target)  # the base computation (no attack wrapper)
    direction = replica.flat_grad()
    unit = direction / direction.norm().clamp_min(1e-12)
    return honest + strength * honest.norm() * unit
