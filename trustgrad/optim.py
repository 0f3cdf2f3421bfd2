"""How a run trains, as every party rebuilds it: the optimizer registry, the loss registry and :class:`Hyper`.

Workers' replicas (``replica.optimizer_for``), the parameter server, audits, repairs, the prover and the verifier's
replay all build their optimizer here, from the same hyper-parameters, so that a replay takes the trainer's exact
steps. The names a config may choose are declared in ``config.OPTIMIZER_NAMES``; this module registers how each is
built. It sits above ``config`` and ``models`` and below ``replica`` and ``proof`` (docs/architecture.md §2).

>>> from torch import nn
>>> hyper = Hyper(lr=0.1, momentum=0.9)
>>> OPTIMIZERS.get(hyper.optimizer)(nn.Linear(2, 2), hyper).defaults["momentum"]
0.9
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError, ProofError
from .factories import is_factory, parse
from .models import LOSSES as MODEL_LOSSES
from .models import loss_named
from .registry import Registry

if TYPE_CHECKING:
    from .config import RunConfig

__all__ = ["Hyper", "Loss", "LOSSES", "OPTIMIZERS", "MAX_HYPER", "loss_fn_of", "loss_name"]

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: every training loss a proof may name; a model's own loss is ``loss_name(model)`` (the zoo's registry plus CE)
LOSSES: Registry[Loss] = Registry("loss")
LOSSES.register("cross-entropy")(F.cross_entropy)
for _name, _fn in MODEL_LOSSES.items():
    LOSSES.register(_name)(_fn)

#: optimizers a trajectory can be replayed with: name -> factory(model, Hyper)
OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")


@OPTIMIZERS.register("sgd")
def _sgd(model: nn.Module, h: Hyper) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        model.parameters(),
        lr=h.lr,
        momentum=h.momentum,
        dampening=h.dampening,
        weight_decay=h.weight_decay,
        nesterov=h.nesterov,
    )


@OPTIMIZERS.register("adam")
def _adam(model: nn.Module, h: Hyper) -> torch.optim.Optimizer:
    # foreach=False: the single-tensor loop on every device and build, so a replay takes the trainer's exact steps
    return torch.optim.Adam(
        model.parameters(), lr=h.lr, betas=h.betas, eps=h.eps, weight_decay=h.weight_decay, foreach=False
    )


def loss_fn_of(hyper: Hyper) -> Loss:
    """The loss a trajectory was trained with: a registered one, or a user's factory (through the import gate)."""
    return LOSSES.get(hyper.loss) if hyper.loss in LOSSES else loss_named(hyper.loss)


def loss_name(model: nn.Module) -> str:
    """The registered name of the loss ``model`` trains with (``models.loss_for``: cross-entropy unless named)."""
    return getattr(model, "trustgrad_loss", None) or "cross-entropy"


#: hyper-parameters beyond this make a float32 replay overflow (torch refuses an alpha it cannot convert) or are
#: not training at all; a proof that declares them is invalid rather than a crash of the verifier
MAX_HYPER = 1e6


@dataclass(frozen=True)
class Hyper:
    """Every training choice that is part of the trajectory: optimizer kind and its hyper-parameters, and the loss.

    Recorded in the manifest (``training``) by the prover and read back by the verifier, which also checks them
    against what the run's config and model imply (a model's loss is its own, see ``models.loss_for``).
    """

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    loss: str = "cross-entropy"
    optimizer: str = "sgd"
    dampening: float = 0.0
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)  # adam only
    eps: float = 1e-8  # adam only

    @classmethod
    def from_config(cls, cfg: RunConfig, loss: str = "cross-entropy", lr: float | None = None) -> Hyper:
        """The run's optimizer (``lr``: a server's scaled rate). Adam has no SGD momentum: it is 0 in its Hyper."""
        lr = cfg.lr if lr is None else lr
        if cfg.optimizer == "adam":
            return cls(lr, 0.0, cfg.weight_decay, loss, "adam", betas=tuple(cfg.betas), eps=cfg.eps)  # type: ignore[arg-type]
        return cls(lr, cfg.momentum, cfg.weight_decay, loss)

    def as_manifest(self) -> dict[str, object]:
        """The manifest's ``training.optimizer`` and ``training.loss`` entries (read by :meth:`from_manifest`)."""
        opt: dict[str, object] = {"name": self.optimizer, "lr": self.lr}
        if self.optimizer == "adam":
            opt.update(betas=list(self.betas), eps=self.eps, weight_decay=self.weight_decay)
        else:  # schema 2's SGD entry, unchanged
            opt.update(
                momentum=self.momentum, dampening=self.dampening, nesterov=self.nesterov, weight_decay=self.weight_decay
            )
        return {"optimizer": opt, "loss": self.loss}

    @classmethod
    def from_manifest(cls, training: object) -> Hyper:
        """The hyper-parameters a manifest's ``training`` section declares; ``ProofError`` naming what is wrong."""
        if not isinstance(training, dict) or not isinstance(training.get("optimizer"), dict):
            raise ProofError("training: the manifest declares no optimizer")
        opt, loss = training["optimizer"], training.get("loss")
        if not isinstance(loss, str) or not (loss in LOSSES or _factory_syntax(loss)):
            raise ProofError(f"training: unknown loss {str(loss)[:40]!r} (known: {', '.join(LOSSES.names())})")
        name = opt.get("name")
        if not isinstance(name, str) or name not in OPTIMIZERS:
            raise ProofError(f"training: unknown optimizer {str(name)[:40]!r} (known: {', '.join(OPTIMIZERS.names())})")
        if name == "adam":
            return cls._adam_from_manifest(opt, loss)
        values = {}
        for key, lo, hi in (("lr", 0.0, MAX_HYPER), ("momentum", 0.0, 1.0), ("dampening", 0.0, 1.0)):
            values[key] = _number(opt.get(key), key, lo, hi)
        values["weight_decay"] = _number(opt.get("weight_decay"), "weight_decay", 0.0, MAX_HYPER)
        if not isinstance(opt.get("nesterov"), bool):
            raise ProofError("training: nesterov must be true or false")
        if values["lr"] <= 0.0 or values["momentum"] >= 1.0:
            raise ProofError("training: lr must be > 0 and momentum < 1")
        return cls(loss=loss, optimizer=name, nesterov=opt["nesterov"], **values)

    @classmethod
    def _adam_from_manifest(cls, opt: dict[str, object], loss: str) -> Hyper:
        if set(opt) != {"name", "lr", "betas", "eps", "weight_decay"}:
            raise ProofError("training: adam takes exactly lr, betas, eps and weight_decay")
        betas = opt["betas"]
        if not isinstance(betas, list) or len(betas) != 2:
            raise ProofError("training: betas must be a list of two numbers")
        b1, b2 = (_number(b, "betas", 0.0, 1.0) for b in betas)
        lr = _number(opt["lr"], "lr", 0.0, MAX_HYPER)
        eps = _number(opt["eps"], "eps", 0.0, 1.0)
        wd = _number(opt["weight_decay"], "weight_decay", 0.0, MAX_HYPER)
        if lr <= 0.0 or eps <= 0.0 or b1 >= 1.0 or b2 >= 1.0:
            raise ProofError("training: adam needs lr > 0, eps > 0 and betas < 1")
        return cls(lr, 0.0, wd, loss, "adam", betas=(b1, b2), eps=eps)


def _factory_syntax(name: str) -> bool:
    """A user's loss (``module:name``): syntax only here; the verifier imports it only if its user named it."""
    if not is_factory(name):
        return False
    try:
        parse(name)
    except ConfigError:
        return False
    return True


def _number(value: object, name: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ProofError(f"training: {name} {str(value)[:30]} is not a number in [{lo:g}, {hi:g}]")
    return float(value)
