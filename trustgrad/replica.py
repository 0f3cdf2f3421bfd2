"""A worker's replica: model, optimizer and loss, with flat views of parameters and gradients for patterns."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from .models import loss_for
from .optim import OPTIMIZERS, Hyper

__all__ = ["Replica", "make_optimizer", "optimizer_for"]


def make_optimizer(model: nn.Module, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def optimizer_for(model: nn.Module, cfg: object, lr: float | None = None) -> torch.optim.Optimizer:
    """The run's optimizer (``cfg.optimizer``: sgd or adam), built exactly as proofs and audits replay it
    (``optim.OPTIMIZERS``); ``lr``: a rate other than ``cfg.lr`` (a server's scaled one)."""
    hyper = Hyper.from_config(cfg, lr=lr)  # type: ignore[arg-type]
    return OPTIMIZERS.get(hyper.optimizer)(model, hyper)


#: the per-parameter state an optimizer carries from step to step, in the order of its flat copy; ``step`` (Adam's
#: bias-correction count) is one number: every parameter steps together
FLAT_STATE: dict[type, tuple[str, ...]] = {
    torch.optim.SGD: ("momentum_buffer",),
    torch.optim.Adam: ("exp_avg", "exp_avg_sq", "step"),
}


class Replica:
    """One copy of the model being trained; patterns read and write it through flat vectors."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable | None = None):
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn or loss_for(model)  # the loss the model was built for (cross-entropy by default)
        self.params = [p for p in model.parameters() if p.requires_grad]
        # state besides the parameters that training changes (BatchNorm running statistics): kept apart from the flat
        # parameter vector, whose length and layout patterns, codecs and checkpoints rely on; integer buffers (steps
        # counted) advance alike on every replica and are left out
        self.buffers = [b for b in model.buffers() if b.is_floating_point()]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def compute_gradients(self, x: torch.Tensor, y: torch.Tensor, set_to_none: bool = False) -> float:
        """Forward and backward on one batch (mean loss); leaves the gradients in ``p.grad``.

        ``set_to_none``: for a caller that reads each gradient in a hook and writes every ``p.grad`` itself afterwards
        (allreduce's buckets): backward then hands each parameter its new gradient instead of adding it to a zeroed
        one (a memset and a read-add-write of the whole gradient saved per step, as DDP's ``zero_grad()`` does); a
        parameter backward does not reach is left with ``p.grad`` None, which ``flat_grad`` and the buckets read as
        zeros. Other callers keep the zeroed gradients (an optimizer skips a parameter whose ``p.grad`` is None)."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=set_to_none)
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        return float(loss.detach())

    def flat_grad(self) -> torch.Tensor:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])

    def set_flat_grad(self, flat: torch.Tensor) -> None:
        offset = 0
        for p in self.params:
            n = p.numel()
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.copy_(flat[offset : offset + n].view_as(p))
            offset += n

    def flat_params(self) -> torch.Tensor:
        return parameters_to_vector(self.params).detach().clone()

    def set_flat_params(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            vector_to_parameters(flat.to(self.params[0].dtype), self.params)

    def step(self) -> None:
        self.optimizer.step()

    def _state_keys(self) -> tuple[str, ...]:
        kind = next((k for k in FLAT_STATE if isinstance(self.optimizer, k)), None)
        if kind is None:
            raise TypeError(f"no flat state layout for {type(self.optimizer).__name__}")
        return FLAT_STATE[kind]

    def flat_buffers(self) -> torch.Tensor:
        """The floating-point buffers (BatchNorm running statistics) as one flat copy; empty for models without."""
        if not self.buffers:
            return torch.zeros(0)
        return torch.cat([b.detach().reshape(-1) for b in self.buffers])  # cat copies: the result shares nothing

    def set_flat_buffers(self, flat: torch.Tensor) -> None:
        offset = 0
        with torch.no_grad():
            for b in self.buffers:
                n = b.numel()
                b.copy_(flat[offset : offset + n].view_as(b))
                offset += n

    def flat_momentum(self) -> torch.Tensor | None:
        """The optimizer's state as one flat copy (SGD: momentum buffers; Adam: both moments, then the step count),
        or None before the first step has made it. Server checkpoints and the audit's repair log keep this."""
        parts = []
        for key in self._state_keys():
            bufs = [self.optimizer.state.get(p, {}).get(key) for p in self.params]
            if any(b is None for b in bufs):
                return None
            parts += [bufs[0].detach().reshape(1).float()] if key == "step" else [b.detach().reshape(-1) for b in bufs]
        return torch.cat(parts).clone()

    def set_flat_momentum(self, flat: torch.Tensor) -> None:
        offset = 0
        for key in self._state_keys():
            if key == "step":
                for p in self.params:
                    self.optimizer.state[p][key] = flat[offset].detach().clone().float()
                offset += 1
                continue
            for p in self.params:
                n = p.numel()
                self.optimizer.state[p][key] = flat[offset : offset + n].view_as(p).clone()
                offset += n
