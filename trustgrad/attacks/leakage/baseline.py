"""The data-free baseline: what an attacker achieves without any gradient information.

It is the floor every other attack is compared with, and the ceiling for an attacker who sees only ciphertexts:

1. guess every image as a constant ``fill`` (mid-grey 0.5 by default: no prior on the data);
2. guess every label uniformly at random among the model's classes (seeded).

>>> import torch
>>> from trustgrad.attacks.leakage import nets
>>> r = data_free(nets.lenet_sigmoid(1, 10), [], spec=InputSpec((1, 4, 4), batch_size=2))
>>> r.reconstruction.unique().tolist(), len(r.labels)
([0.5], 2)
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import AttackError
from ...seeding import rng
from .base import GroundTruth, InputSpec, LeakageResult, register_attack, score

__all__ = ["DataFreeConfig", "data_free"]


@dataclass(frozen=True)
class DataFreeConfig:
    fill: float = 0.5
    seed: int = 0


@register_attack("data-free", DataFreeConfig, "baseline without gradients: a constant image and a random label")
def data_free(
    model: nn.Module,
    gradients: Sequence[torch.Tensor],
    config: DataFreeConfig = DataFreeConfig(),
    *,
    spec: InputSpec,
    truth: GroundTruth | None = None,
) -> LeakageResult:
    """Ignore ``gradients`` (an encrypted view has none to read) and guess; ``model`` only gives the class count."""
    start = time.perf_counter()
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise AttackError("the model has no nn.Linear head to count classes from")
    k = heads[-1].out_features
    if not spec.low <= config.fill <= spec.high:
        raise AttackError(f"fill {config.fill} is outside the box [{spec.low}, {spec.high}]")
    images = torch.full(spec.batch_shape, float(config.fill))
    labels = [int(v) for v in rng(config.seed, "data-free").integers(0, k, size=spec.batch_size)]
    metrics, per = score(images, labels, truth) if truth is not None else ({}, ())
    if truth is not None:
        metrics["label_accuracy_expected"] = 1.0 / k  # the guess's expectation; one draw is 0 or 1 per sample
    return LeakageResult(
        attack="data-free",
        reconstruction=images,
        labels=tuple(labels),
        grad_distance=math.nan,
        iterations=0,
        seconds=time.perf_counter() - start,
        restarts=0,
        metrics=metrics,
        per_image=per,
    )
