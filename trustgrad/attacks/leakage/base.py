"""What every gradient-leakage attack shares: the view it attacks, the result it returns, the registry it lives in.

An attack is a pure function ``attack(model, gradients, config, *, spec, truth=None) -> LeakageResult``:

- ``model`` holds the parameters the gradients were computed at (the server knows them: it sent them);
- ``gradients`` is the observed update, one tensor per parameter of ``model`` that requires grad, in
  ``model.parameters()`` order (what the server saw, possibly after a defence);
- ``config`` is the attack's frozen hyperparameter dataclass (``ATTACKS.get(name).config_type``);
- ``spec`` states what the attacker must know of the victim's batch: its size, the input shape and value box;
- ``truth``, when given, is used only after the attack, to score it (:func:`score`).

>>> from trustgrad.attacks.leakage import ATTACKS
>>> ATTACKS.names()
['data-free', 'dlg', 'idlg', 'inverting-gradients', 'label-recovery']
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ...errors import AttackError
from ...registry import Registry
from . import metrics as _metrics

__all__ = [
    "InputSpec",
    "GroundTruth",
    "LeakageResult",
    "Attack",
    "ATTACKS",
    "register_attack",
    "run_attack",
    "observe_gradients",
    "validate_gradients",
    "last_linear_gradients",
    "gradient_l2_distance",
    "score",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputSpec:
    """What the attacker knows of the victim's batch: ``batch_size`` inputs of ``shape`` (C, H, W) in [low, high]."""

    shape: tuple[int, ...] = (1, 32, 32)
    batch_size: int = 1
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise AttackError(f"spec.batch_size must be >= 1, got {self.batch_size}")
        if not self.shape or any(int(s) < 1 for s in self.shape):
            raise AttackError(f"spec.shape must be positive sizes such as (1, 32, 32), got {self.shape}")
        if not self.low < self.high:
            raise AttackError(f"spec.low must be below spec.high, got [{self.low}, {self.high}]")

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return (self.batch_size, *self.shape)


@dataclass(frozen=True)
class GroundTruth:
    """The victim's batch, for scoring only: ``images`` (B, C, H, W) in [0, 1] and integer ``labels`` (B,)."""

    images: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class LeakageResult:
    """What an attack recovered, and (with ground truth) how well.

    ``reconstruction`` is (B, C, H, W), clipped to the spec's box, in the attack's own order (``per_image`` and the
    image metrics use the order-free Hungarian matching of :func:`score`). ``labels`` are the recovered labels: one per
    sample for image attacks, the recovered label *set* (sorted) for ``label-recovery``. ``grad_distance`` is the
    attack's own gradient-matching objective at the returned reconstruction (inf when every restart diverged).
    ``metrics`` holds mse, psnr, psnr_min, ssim, label_accuracy (only those that apply); ``per_image`` one dict per
    ground-truth image. Treat both as read-only.
    """

    attack: str
    reconstruction: torch.Tensor | None
    labels: tuple[int, ...]
    grad_distance: float
    iterations: int
    seconds: float
    restarts: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    per_image: tuple[Mapping[str, float], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (no tensors)."""
        return {
            "attack": self.attack,
            "labels": list(self.labels),
            "grad_distance": self.grad_distance,
            "iterations": self.iterations,
            "seconds": self.seconds,
            "restarts": self.restarts,
            "metrics": dict(self.metrics),
            "per_image": [dict(m) for m in self.per_image],
        }


class AttackFn(Protocol):
    def __call__(
        self,
        model: nn.Module,
        gradients: Sequence[torch.Tensor],
        config: Any,
        *,
        spec: InputSpec,
        truth: GroundTruth | None = None,
    ) -> LeakageResult: ...


@dataclass(frozen=True)
class Attack:
    """A registry entry: the attack function, its config dataclass and a one-line description for ``--help``."""

    name: str
    run: AttackFn
    config_type: type
    summary: str


ATTACKS: Registry[Attack] = Registry("attack")


def register_attack(name: str, config_type: type, summary: str) -> Callable[[AttackFn], AttackFn]:
    def decorator(fn: AttackFn) -> AttackFn:
        ATTACKS.register(name)(Attack(name=name, run=fn, config_type=config_type, summary=summary))
        return fn

    return decorator


def run_attack(
    name: str,
    model: nn.Module,
    gradients: Sequence[torch.Tensor],
    *,
    spec: InputSpec,
    config: Any | None = None,
    truth: GroundTruth | None = None,
    **overrides: Any,
) -> LeakageResult:
    """Look ``name`` up in :data:`ATTACKS` and run it; ``overrides`` replace fields of ``config`` (default config)."""
    entry = ATTACKS.get(name)
    cfg = config if config is not None else entry.config_type()
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    return entry.run(model, gradients, cfg, spec=spec, truth=truth)


# --- the observed view -------------------------------------------------------------------------------------------


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def observe_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """The honest worker's update: gradients of the model's training loss (mean cross-entropy unless the model was
    built for another, e.g. ``logreg-poly``) on (images, labels), detached."""
    from ...models import loss_for

    params = trainable(model)
    loss = loss_for(model)(model(images), labels)
    return [g.detach() for g in torch.autograd.grad(loss, params)]


def validate_gradients(model: nn.Module, gradients: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Check the view against the model; return the gradients on the model's device and dtype.

    Raises :class:`AttackError` (one line) when the count, a shape, or the values do not fit.
    """
    params = trainable(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not isinstance(gradients, (list, tuple)):
        raise AttackError(f"gradients must be a list of tensors, got {type(gradients).__name__}")
    if len(gradients) != len(params):
        raise AttackError(
            f"the view has {len(gradients)} gradient tensors but the model has {len(params)} trainable parameters;"
            " record the view with the same model"
        )
    out = []
    for i, (g, p, n) in enumerate(zip(gradients, params, names, strict=True)):
        if not isinstance(g, torch.Tensor):
            raise AttackError(f"gradient {i} ({n}) is a {type(g).__name__}, not a tensor")
        if tuple(g.shape) != tuple(p.shape):
            raise AttackError(
                f"gradient {i} has shape {tuple(g.shape)} but parameter {n!r} has shape {tuple(p.shape)};"
                " the view does not match the model"
            )
        if not torch.isfinite(g).all():
            raise AttackError(f"gradient {i} ({n}) holds NaN or inf values")
        out.append(g.detach().to(device=p.device, dtype=p.dtype))
    return out


def last_linear_gradients(
    model: nn.Module, gradients: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The observed gradients (weight (K, D), bias (K,) or None) of the model's last ``nn.Linear`` (its head)."""
    head = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            head = m
    if head is None or not head.weight.requires_grad:
        raise AttackError("the model has no trainable nn.Linear head; label recovery needs one")
    index = {id(p): i for i, p in enumerate(trainable(model))}
    weight = gradients[index[id(head.weight)]]
    bias = gradients[index[id(head.bias)]] if head.bias is not None and id(head.bias) in index else None
    return weight, bias


def gradient_l2_distance(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """DLG's objective: the squared L2 distance summed over all parameters."""
    return sum(((x - y) ** 2).sum() for x, y in zip(a, b, strict=True))


# --- scoring ------------------------------------------------------------------------------------------------------


def score(
    reconstruction: torch.Tensor | None, labels: Sequence[int], truth: GroundTruth, *, label_set: bool = False
) -> tuple[dict[str, float], tuple[dict[str, float], ...]]:
    """Order-free scores: images matched to the truth by Hungarian assignment on MSE; labels by multiset overlap.

    With ``label_set`` the recovered labels are compared as a set to the set of true labels: ``label_set_exact`` is
    1.0 when they are equal and ``label_accuracy`` is then their Jaccard index (|both| / |either|), so guessing
    every class scores low.
    """
    true_labels = [int(v) for v in truth.labels.reshape(-1).tolist()]
    out: dict[str, float] = {}
    per: list[dict[str, float]] = []
    if reconstruction is not None:
        x = truth.images.detach().to(torch.float64).cpu()
        y = reconstruction.detach().to(torch.float64).cpu()
        order = _metrics.match(x, y)
        for i, j in enumerate(order):
            per.append(
                {
                    "mse": _metrics.mse(x[i], y[j]),
                    "psnr": _metrics.psnr(x[i], y[j]),
                    "ssim": _metrics.ssim(x[i], y[j]),
                    "matched_to": float(j),
                }
            )
        out["mse"] = sum(p["mse"] for p in per) / len(per)
        out["psnr"] = sum(p["psnr"] for p in per) / len(per)
        out["psnr_min"] = min(p["psnr"] for p in per)
        out["ssim"] = sum(p["ssim"] for p in per) / len(per)
    if label_set:
        got, want = set(labels), set(true_labels)
        out["label_set_exact"] = float(got == want)
        out["label_accuracy"] = len(got & want) / len(want | got) if want | got else 1.0
    else:
        out["label_accuracy"] = _metrics.label_accuracy(true_labels, list(labels))
    for k, v in out.items():
        if isinstance(v, float) and math.isnan(v):
            log.warning("metric %s is NaN", k)
    return out, tuple(per)
