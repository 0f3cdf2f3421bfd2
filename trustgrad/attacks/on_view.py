"""Run a gradient-leakage attack on a recorded server view: ``attack_view(name, view) -> LeakageResult``."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..config import model_config_from_dict
from ..errors import AttackError, ConfigError
from ..models import build_model
from .leakage import ATTACKS, GroundTruth, InputSpec, LeakageResult, run_attack
from .view import ServerView, ciphertext_as_gradients

__all__ = ["attack_view", "attack_inputs", "victim_model"]


def victim_model(view: ServerView) -> torch.nn.Module:
    """The model at the step of the view, rebuilt from the registry and loaded strictly from the view's state."""
    try:
        cfg = model_config_from_dict(view.model_config)
        model = build_model(view.model, view.input_shape, view.num_classes, seed=0, config=cfg)
    except (TypeError, ValueError, ConfigError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]  # torch appends C++ frames
        raise AttackError(f"the view names a model trustgrad cannot build: {first}") from None
    try:
        model.load_state_dict(view.state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise AttackError(f"the view's state does not fit model {view.model!r}: {first}") from None
    return model.eval()


def attack_inputs(view: ServerView) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """The victim model and the update an attack inverts; a view they do not fit is an ``AttackError``.

    On a ciphertext view the attacker has bytes only; they are fed to the attack as if they were the update
    (:func:`~trustgrad.attacks.view.ciphertext_as_gradients`).
    """
    model = victim_model(view)
    params = [p for p in model.parameters() if p.requires_grad]
    if view.kind == "ciphertext":
        return model, ciphertext_as_gradients(view.ciphertext or b"", [p.shape for p in params])
    gradients = list(view.gradients or [])
    if len(gradients) != len(params) or any(g.shape != p.shape for g, p in zip(gradients, params)):
        raise AttackError(f"the view's gradients do not match the parameters of model {view.model!r}")
    return model, gradients


def attack_view(name: str, view: ServerView, **overrides: Any) -> LeakageResult:
    """Attack ``view`` with attack ``name``; ``overrides`` set fields of the attack's config where it has them.

    On a ciphertext view the attacker has bytes only; they are fed to the attack as if they were the update
    (:func:`~trustgrad.attacks.view.ciphertext_as_gradients`).
    """
    entry = ATTACKS.get(name)
    model, gradients = attack_inputs(view)
    known = {f.name for f in dataclasses.fields(entry.config_type)}
    config = entry.config_type(**{k: v for k, v in overrides.items() if k in known and v is not None})
    truth = None
    if view.truth_x is not None and view.truth_y is not None and view.truth_x.dim() == 4:
        truth = GroundTruth(view.truth_x.float(), view.truth_y.long())
    spec = InputSpec(shape=tuple(view.input_shape), batch_size=view.batch_size)
    return run_attack(name, model, gradients, spec=spec, config=config, truth=truth)
