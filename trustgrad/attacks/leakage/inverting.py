"""Inverting Gradients: cosine gradient matching with a total-variation prior, signed Adam and a box.

Geiping et al. 2020, "Inverting Gradients - How easy is it to break privacy in federated learning?", NeurIPS, Sec. 4:

1. labels: given (``config.labels``) or read off the head's gradient as in iDLG (Zhao et al. 2020);
2. draw x' ~ N(0, 1) of the batch's shape, clipped into the box [low, high];
3. minimize ``1 - <g', g> / (||g'|| ||g||) + tv_weight * TV(x')``, where g' and g are all parameters' gradients
   concatenated (Eq. 4: the cosine is invariant to the gradient's scale, so only its direction must match) and TV is
   the mean absolute difference of neighbouring pixels;
4. with Adam on the *sign* of the gradient (``signed``), lr 0.1, divided by 10 at 3/8, 5/8 and 7/8 of the iterations;
5. after every step project x' back into the box ("boxed");
6. over restarts keep the trial with the smallest cosine distance.

This is the attack that still works on ReLU networks, where DLG's L2 objective with L-BFGS fails (field notes:
PSNR 5-9 for L2, 12-20 for this).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import AttackError
from ._optim import Trial, best_of_restarts, result_from_trial
from .base import GroundTruth, InputSpec, LeakageResult, register_attack, trainable, validate_gradients
from .labels import idlg_labels

__all__ = ["InvertingConfig", "inverting_gradients", "cosine_distance", "total_variation"]


@dataclass(frozen=True)
class InvertingConfig:
    """Geiping et al.'s hyperparameters, with fewer iterations (1000, not 4800-24000) and a TV weight tuned for
    [0, 1] images on the LeNets here (0.1 beat 0.01 on digits and photo crops). Restarts stop early once the
    cosine distance is <= ``target_distance`` (0: run them all)."""

    iterations: int = 1000
    lr: float = 0.1
    tv_weight: float = 1e-1
    signed: bool = True
    boxed: bool = True
    restarts: int = 1
    target_distance: float = 0.0
    labels: tuple[int, ...] | None = None
    seed: int = 0


def cosine_distance(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """``1 - cos(a, b)`` of the concatenated tensors, in [0, 2]."""
    dot = sum((x * y).sum() for x, y in zip(a, b, strict=True))
    na = sum((x * x).sum() for x in a).sqrt()
    nb = sum((y * y).sum() for y in b).sqrt()
    return 1 - dot / (na * nb).clamp_min(1e-30)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of horizontally plus vertically neighbouring pixels."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


def _invert(
    model: nn.Module,
    target: list[torch.Tensor],
    labels: torch.Tensor,
    spec: InputSpec,
    cfg: InvertingConfig,
    gen: torch.Generator,
) -> Trial:
    params = trainable(model)
    x = torch.randn(spec.batch_shape, generator=gen).to(params[0])
    x = x.clamp(spec.low, spec.high).requires_grad_(True) if cfg.boxed else x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    milestones = [int(cfg.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)

    def objective(create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
        loss = nn.functional.cross_entropy(model(x), labels)
        dummy = torch.autograd.grad(loss, params, create_graph=create_graph)
        dist = cosine_distance(dummy, target)
        return dist, dist + cfg.tv_weight * total_variation(x)

    it = 0
    for it in range(1, cfg.iterations + 1):
        _, total = objective(create_graph=True)
        (g,) = torch.autograd.grad(total, [x])
        if not torch.isfinite(g).all():
            return Trial(x.detach().nan_to_num(0.5).clamp(spec.low, spec.high), labels.tolist(), math.inf, it)
        x.grad = g.sign() if cfg.signed else g
        opt.step()
        sched.step()
        if cfg.boxed:
            with torch.no_grad():
                x.clamp_(spec.low, spec.high)
    with torch.no_grad():
        x.clamp_(spec.low, spec.high)
    dist, _ = objective(create_graph=False)
    d = float(dist.detach())
    return Trial(x.detach(), [int(v) for v in labels.tolist()], d if math.isfinite(d) else math.inf, it)


@register_attack("inverting-gradients", InvertingConfig, "Geiping et al.: cosine matching + TV, signed Adam, boxed")
def inverting_gradients(
    model: nn.Module,
    gradients: Sequence[torch.Tensor],
    config: InvertingConfig = InvertingConfig(),
    *,
    spec: InputSpec,
    truth: GroundTruth | None = None,
) -> LeakageResult:
    """Inverting Gradients (Geiping et al. 2020); ``grad_distance`` is the cosine distance of the result."""
    grads = validate_gradients(model, gradients)
    if config.labels is not None:
        if len(config.labels) != spec.batch_size:
            raise AttackError(f"config.labels has {len(config.labels)} labels for a batch of {spec.batch_size}")
        label_list = list(config.labels)
    else:
        label_list = idlg_labels(model, grads, spec.batch_size)
    labels = torch.tensor(label_list, dtype=torch.long, device=grads[0].device)
    best, used, seconds = best_of_restarts(
        "inverting-gradients",
        lambda gen: _invert(model, grads, labels, spec, config, gen),
        restarts=config.restarts,
        seed=config.seed,
        target_distance=config.target_distance,
    )
    return result_from_trial("inverting-gradients", best, used, seconds, truth)
