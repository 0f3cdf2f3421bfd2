"""Labels from the last layer's gradient: iDLG's rule, the sign rule, and RLG's SVD + separability test.

With a Linear head ``z = W h + b`` and cross-entropy, the head's gradient over a batch of B samples is
``dW = P H^T / B`` and ``db = P 1 / B``, where column i of ``P`` (K x B) is ``softmax(z_i) - onehot(y_i)``. Every
entry of ``P`` is positive except the one at (y_i, i). Hence:

1. **iDLG** (Zhao et al. 2020, "iDLG: Improved Deep Leakage from Gradients", Sec. 3.1): for B = 1 the true class is
   the only negative entry of ``db``, and (features h >= 0 after a sigmoid/ReLU) the only row of ``dW`` with a
   negative sum. :func:`idlg_labels` takes the argmin (the B smallest for B > 1, which assumes distinct labels).
2. **Sign rule**: the classes whose bias gradient (or, without a bias, weight-row sum) is negative. Exact for B = 1;
   for larger batches a confident prediction can flip a sign.
3. **RLG** (Dang et al. 2021, "Revealing and Protecting Labels in Distributed Training", NeurIPS, Sec. 3-4):
   a. stack ``G = [dW | db]`` (K x (D+1)) in float64; ``G = P [H; 1]^T / B`` has rank B;
   b. take the SVD ``G = U S V^T`` and keep ``U_B`` (K x B), the left singular vectors of the B largest singular
      values (fewer if G's numerical rank is below B, e.g. a repeated sample); ``U_B = P Q`` for some invertible Q,
      so its rows are the rows of P in another basis;
   c. class c is in the batch iff its row ``u_c`` is separable from all other rows by a hyperplane through the
      origin: some r has ``u_c . r < 0`` and ``u_j . r >= 0`` for all j != c (r = Q^-1 e_i works for c = y_i;
      an absent class's row lies in the cone of the other positive rows once K >> B);
   d. each test is a linear program, ``min u_c . r`` s.t. ``U_{-c} r >= 0``, ``-1 <= r <= 1``: present iff the
      optimum is below ``-tolerance``.
   It needs many more classes than the batch size and float64: in float32 it breaks from B = 32 (field notes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.optimize import linprog
from torch import nn

from ...errors import AttackError
from .base import (
    GroundTruth,
    InputSpec,
    LeakageResult,
    last_linear_gradients,
    register_attack,
    score,
    validate_gradients,
)

__all__ = ["LabelRecoveryConfig", "idlg_labels", "sign_labels", "rlg_labels", "label_recovery"]

log = logging.getLogger(__name__)


def _head_scores(model: nn.Module, gradients: Sequence[torch.Tensor]) -> torch.Tensor:
    weight, bias = last_linear_gradients(model, gradients)
    return bias.detach() if bias is not None else weight.detach().sum(dim=1)


def idlg_labels(model: nn.Module, gradients: Sequence[torch.Tensor], batch_size: int = 1) -> list[int]:
    """iDLG's analytic labels: the ``batch_size`` classes with the most negative head bias gradient (weight-row sum
    without a bias)."""
    scores = _head_scores(model, gradients)
    if batch_size > scores.numel():
        raise AttackError(f"batch size {batch_size} exceeds the head's {scores.numel()} classes")
    return sorted(int(i) for i in torch.argsort(scores)[:batch_size])


def sign_labels(model: nn.Module, gradients: Sequence[torch.Tensor]) -> list[int]:
    """The classes whose head bias gradient (weight-row sum without a bias) is negative."""
    return [int(i) for i in torch.nonzero(_head_scores(model, gradients) < 0).flatten()]


def rlg_labels(
    model: nn.Module, gradients: Sequence[torch.Tensor], batch_size: int, *, tolerance: float = 1e-9
) -> list[int]:
    """RLG's label set (steps 3a-3d of the module docstring)."""
    weight, bias = last_linear_gradients(model, gradients)
    g = weight.detach().to(torch.float64).cpu()
    if bias is not None:
        g = torch.cat([g, bias.detach().to(torch.float64).cpu()[:, None]], dim=1)
    k = g.shape[0]
    if batch_size >= k:
        raise AttackError(f"RLG needs more classes ({k}) than the batch size ({batch_size})")
    u, s, _ = torch.linalg.svd(g, full_matrices=False)
    # rank below B when samples repeat (identical features merge columns of P): the numerical rank, with the
    # observed dtype's rounding (a float32 view stays float32-accurate after the cast)
    floor = s[0] * max(g.shape) * torch.finfo(weight.dtype).eps
    rank = max(1, min(batch_size, int((s > floor).sum())))
    ub = u[:, :rank].numpy()
    log.debug("RLG singular values %s (rank %d, batch %d)", s[: batch_size + 2].tolist(), rank, batch_size)
    # normalize rows: the LP's scale then does not depend on the gradient's magnitude
    ub = ub / np.maximum(np.linalg.norm(ub, axis=1, keepdims=True), 1e-300)
    present = []
    bounds = [(-1.0, 1.0)] * rank
    for c in range(k):
        others = np.delete(ub, c, axis=0)
        res = linprog(ub[c], A_ub=-others, b_ub=np.zeros(k - 1), bounds=bounds, method="highs")
        if res.status != 0:
            raise AttackError(f"RLG's linear program failed for class {c}: {res.message}")
        if res.fun < -tolerance:
            present.append(c)
    return present


@dataclass(frozen=True)
class LabelRecoveryConfig:
    """``method``: ``rlg`` (SVD + separability, Dang et al. 2021) or ``sign`` (negative head gradient)."""

    method: Literal["rlg", "sign"] = "rlg"
    tolerance: float = 1e-9


@register_attack("label-recovery", LabelRecoveryConfig, "the batch's label set from the last layer (RLG or signs)")
def label_recovery(
    model: nn.Module,
    gradients: Sequence[torch.Tensor],
    config: LabelRecoveryConfig = LabelRecoveryConfig(),
    *,
    spec: InputSpec,
    truth: GroundTruth | None = None,
) -> LeakageResult:
    """Recover the set of labels in the batch; ``labels`` of the result is that set, sorted.

    >>> from trustgrad.attacks.leakage import base, nets
    >>> m = nets.mlp_relu(1, 20, image_size=8, hidden=(32,)).double()
    >>> g = base.observe_gradients(m, torch.rand(3, 1, 8, 8, dtype=torch.float64), torch.tensor([4, 9, 4]))
    >>> label_recovery(m, g, spec=InputSpec((1, 8, 8), batch_size=3)).labels
    (4, 9)
    """
    grads = validate_gradients(model, gradients)
    start = time.perf_counter()
    if config.method == "rlg":
        labels = rlg_labels(model, grads, spec.batch_size, tolerance=config.tolerance)
    elif config.method == "sign":
        labels = sign_labels(model, grads)
    else:
        raise AttackError(f"unknown label-recovery method {config.method!r} (known: rlg, sign)")
    seconds = time.perf_counter() - start
    metrics, per = score(None, labels, truth, label_set=True) if truth is not None else ({}, ())
    return LeakageResult(
        attack="label-recovery",
        reconstruction=None,
        labels=tuple(sorted(labels)),
        grad_distance=float("nan"),
        iterations=1,
        seconds=seconds,
        restarts=1,
        metrics=metrics,
        per_image=per,
    )
