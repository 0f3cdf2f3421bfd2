"""Gradient-leakage attacks: what an honest-but-curious server reads out of the updates it sees.

Each attack is a pure function ``(model, gradients, config, *, spec, truth=None) -> LeakageResult`` registered in
:data:`ATTACKS` under ``dlg``, ``idlg``, ``inverting-gradients``, ``label-recovery`` and ``data-free`` (the no-gradient
baseline). Defences that transform a view live in :mod:`.defences`; victim models in :mod:`.nets`; offline images in
:mod:`.images`; metrics in :mod:`.metrics`; a PNG grid in :mod:`.plots`.

>>> import torch
>>> from trustgrad.attacks.leakage import InputSpec, lenet_sigmoid, observe_gradients, run_attack, digits
>>> model = lenet_sigmoid(1, 10)
>>> x, y = digits([3])
>>> run_attack("label-recovery", model, observe_gradients(model, x, y), spec=InputSpec(), method="sign").labels
(3,)
"""

from . import baseline, dlg, inverting, labels  # noqa: F401  (registers the attacks)
from .base import (
    ATTACKS,
    GroundTruth,
    InputSpec,
    LeakageResult,
    observe_gradients,
    run_attack,
    score,
    validate_gradients,
)
from .baseline import DataFreeConfig, data_free
from .dlg import DLGConfig
from .dlg import dlg as dlg_attack
from .dlg import idlg as idlg_attack
from .images import digits, photo_crops
from .inverting import InvertingConfig, inverting_gradients
from .labels import LabelRecoveryConfig, label_recovery
from .nets import lenet_relu, lenet_sigmoid, mlp_relu

__all__ = [
    "ATTACKS",
    "InputSpec",
    "GroundTruth",
    "LeakageResult",
    "run_attack",
    "observe_gradients",
    "validate_gradients",
    "score",
    "DLGConfig",
    "dlg_attack",
    "idlg_attack",
    "InvertingConfig",
    "inverting_gradients",
    "LabelRecoveryConfig",
    "label_recovery",
    "DataFreeConfig",
    "data_free",
    "lenet_sigmoid",
    "lenet_relu",
    "mlp_relu",
    "digits",
    "photo_crops",
]
