"""DLG and iDLG: reconstruct the batch by matching gradients in L2 with L-BFGS.

DLG (Zhu et al. 2019, "Deep Leakage from Gradients", NeurIPS, Alg. 1):

1. draw a dummy input x' ~ N(0, 1) of the batch's shape and dummy label logits y' ~ N(0, 1) (B x K);
2. compute the dummy gradient ``g' = d/dW CE(F(x'; W), softmax(y'))`` with the soft-label cross entropy
   ``mean_i sum_k -softmax(y'_i)_k log softmax(F(x'_i))_k``;
3. minimize ``D = ||g' - g||^2`` (summed over all parameters) over x' and y' jointly with L-BFGS (lr 1, 20 inner
   iterations, 300 steps);
4. return x' and argmax y'.

iDLG (Zhao et al. 2020, "iDLG: Improved Deep Leakage from Gradients", Sec. 3):

1. read the label off the head's gradient (:func:`~trustgrad.attacks.leakage.labels.idlg_labels`);
2. run DLG's steps 1-3 on x' only, with the hard label fixed.

trustgrad adds restarts (L-BFGS diverges on some draws: keep the restart with the smallest D, skip any that turn
NaN/inf) and clips the returned images to the spec's box (the objective itself is unconstrained, as in the papers).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...models import loss_for
from ._optim import Trial, best_of_restarts, result_from_trial
from .base import (
    GroundTruth,
    InputSpec,
    LeakageResult,
    gradient_l2_distance,
    register_attack,
    trainable,
    validate_gradients,
)
from .labels import idlg_labels

__all__ = ["DLGConfig", "dlg", "idlg"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DLGConfig:
    """L-BFGS gradient matching: ``steps`` outer L-BFGS steps of at most ``inner_iterations`` evaluations each
    (a restart ends early once L-BFGS stops moving); up to ``restarts`` random restarts, stopping early once
    ``D <= target_distance * ||g||^2`` (relative to the observed gradient's squared norm; measured on digits with
    the sigmoid LeNet: 1e-7..2e-5 for reconstructions of 41-80 dB, about 1 for a stalled run, 1e3 for a diverged one).
    """

    steps: int = 300
    lr: float = 1.0
    inner_iterations: int = 20
    history_size: int = 100
    restarts: int = 1
    target_distance: float = 1e-4
    seed: int = 0


def _soft_ce(logits: torch.Tensor, label_logits: torch.Tensor) -> torch.Tensor:
    return torch.mean(torch.sum(-torch.softmax(label_logits, -1) * torch.log_softmax(logits, -1), dim=-1))


def _lbfgs_match(
    model: nn.Module,
    target: list[torch.Tensor],
    spec: InputSpec,
    config: DLGConfig,
    gen: torch.Generator,
    fixed_labels: torch.Tensor | None,
    num_classes: int,
) -> Trial:
    params = trainable(model)
    like = params[0]
    custom = getattr(model, "trustgrad_loss", None)  # the attacker knows the training loss the model was built for
    train_loss = loss_for(model)
    x = torch.randn(spec.batch_shape, generator=gen).to(like).requires_grad_(True)
    variables = [x]
    if fixed_labels is None:
        y = torch.randn(spec.batch_size, num_classes, generator=gen).to(like).requires_grad_(True)
        variables.append(y)
    opt = torch.optim.LBFGS(variables, lr=config.lr, max_iter=config.inner_iterations, history_size=config.history_size)

    def objective(create_graph: bool) -> torch.Tensor:
        logits = model(x)
        if fixed_labels is not None:
            loss = train_loss(logits, fixed_labels)
        else:  # soft labels; a model built for another loss gets the softmax as its (one-hot-like) target
            loss = _soft_ce(logits, y) if custom is None else train_loss(logits, torch.softmax(y, -1))
        dummy = torch.autograd.grad(loss, params, create_graph=create_graph)
        return gradient_l2_distance(dummy, target)

    def closure() -> torch.Tensor:
        d = objective(create_graph=True)
        # autograd.grad, not backward: the victim model's .grad must stay untouched
        for v, g in zip(variables, torch.autograd.grad(d, variables), strict=True):
            v.grad = g
        return d.detach()

    steps = 0
    for steps in range(1, config.steps + 1):
        before = x.detach().clone()
        value = float(opt.step(closure))
        if not math.isfinite(value) or not torch.isfinite(x).all():
            return Trial(x.detach().nan_to_num(0.5).clamp(spec.low, spec.high), [], math.inf, steps)
        if torch.equal(before, x):  # L-BFGS has converged (or stalled): further steps are no-ops
            break
    with torch.no_grad():
        x.clamp_(spec.low, spec.high)
    distance = float(objective(create_graph=False).detach())
    labels = y.detach().argmax(-1).tolist() if fixed_labels is None else fixed_labels.tolist()
    return Trial(x.detach(), [int(v) for v in labels], distance if math.isfinite(distance) else math.inf, steps)


def _squared_norm(grads: Sequence[torch.Tensor]) -> float:
    return float(sum(g.double().pow(2).sum() for g in grads))


def _num_classes(model: nn.Module, grads: Sequence[torch.Tensor]) -> int:
    from .base import last_linear_gradients

    return int(last_linear_gradients(model, grads)[0].shape[0])


@register_attack("dlg", DLGConfig, "Deep Leakage from Gradients: L2 matching, label optimized jointly, L-BFGS")
def dlg(
    model: nn.Module,
    gradients: Sequence[torch.Tensor],
    config: DLGConfig = DLGConfig(),
    *,
    spec: InputSpec,
    truth: GroundTruth | None = None,
) -> LeakageResult:
    """DLG (Zhu et al. 2019): images and soft labels from L2 gradient matching."""
    grads = validate_gradients(model, gradients)
    k = _num_classes(model, grads)
    best, used, seconds = best_of_restarts(
        "dlg",
        lambda gen: _lbfgs_match(model, grads, spec, config, gen, None, k),
        restarts=config.restarts,
        seed=config.seed,
        target_distance=config.target_distance * _squared_norm(grads),
    )
    return result_from_trial("dlg", best, used, seconds, truth)


@register_attack("idlg", DLGConfig, "improved DLG: label read off the head's gradient, then L2 matching on the image")
def idlg(
    model: nn.Module,
    gradients: Sequence[torch.Tensor],
    config: DLGConfig = DLGConfig(),
    *,
    spec: InputSpec,
    truth: GroundTruth | None = None,
) -> LeakageResult:
    """iDLG (Zhao et al. 2020): analytic label, then DLG on the image only.

    >>> from trustgrad.attacks.leakage import base, images, nets
    >>> torch.set_num_threads(1)
    >>> m = nets.lenet_sigmoid(1, 10)
    >>> x, y = images.digits([0])
    >>> r = idlg(m, base.observe_gradients(m, x, y), spec=InputSpec((1, 32, 32)), truth=GroundTruth(x, y))
    >>> r.labels, r.metrics["psnr"] > 30
    ((0,), True)
    """
    grads = validate_gradients(model, gradients)
    labels = torch.tensor(idlg_labels(model, grads, spec.batch_size), device=grads[0].device)
    best, used, seconds = best_of_restarts(
        "idlg",
        lambda gen: _lbfgs_match(model, grads, spec, config, gen, labels, 0),
        restarts=config.restarts,
        seed=config.seed,
        target_distance=config.target_distance * _squared_norm(grads),
    )
    return result_from_trial("idlg", best, used, seconds, truth)
