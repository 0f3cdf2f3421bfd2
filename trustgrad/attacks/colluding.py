"""Colluding omniscient attacks on robust aggregation, and a trigger backdoor.

f malicious workers of n collude: each sees the round's honest gradients (the papers' omniscient threat model) and
all push the same vector, built to slip under robust rules. Here the honest gradients are *recomputed* by the
attacker: shards and batch order are a PRF of the run's seed (``BatchPlan``) and the attacker is granted the honest
workers' data, as the papers assume, so every malicious process derives the same vector without a side channel.

Pushed vectors (mu, sigma: the coordinate-wise mean and std of the h honest gradients):

- ``alie``: ``mu - z sigma`` with ``z = Phi^-1((n - s) / n)``, ``s = floor(n/2 + 1) - f``; a strength > 0 sets z
  instead (Baruch et al., NeurIPS 2019, Alg. 1).
- ``ipm``: ``-eps mu``, eps = strength, 0.1 by default (Xie et al., UAI 2020, Sec. 3).
- ``min-max``: ``mu + gamma p`` with p = -sigma and the largest gamma such that ``max_i |m - h_i| <= max_ij
  |h_i - h_j|`` (Shejwalkar & Houmansadr, NDSS 2021, Alg. 1).
- ``min-sum``: the same with ``sum_i |m - h_i|^2 <= max_i sum_j |h_i - h_j|^2`` (ibid., Sec. IV-B).
- ``backdoor``: the gradient of its own batch with a 2x2 trigger patch on half of the images, relabelled to the
  target class, times strength (BadNets, Gu et al. 2017; Bagdasaryan et al., AISTATS 2020).

>>> import torch
>>> h = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
>>> ipm(h, eps=0.5).tolist()
[-1.0, -0.5]
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..replica import Replica

__all__ = [
    "COLLUDING",
    "alie_z",
    "alie",
    "ipm",
    "min_max",
    "min_sum",
    "Trigger",
    "apply_trigger",
    "backdoor_success",
    "ColludingReplica",
]

log = logging.getLogger(__name__)


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s z_max: the largest shift that still leaves s = floor(n/2 + 1) - f honest workers "behind" the
    attackers, so a majority-based rule takes the malicious value for a typical one.

    >>> round(alie_z(50, 12), 2)  # n = 50, 24% malicious: s = 14, Phi^-1(36 / 50)
    0.58
    >>> alie_z(4, 1)  # 1 of 4: s = 2, Phi^-1(1/2) = 0, the plain mean (override z with the attack's strength)
    0.0
    """
    s = math.floor(n / 2 + 1) - f
    q = (n - s) / n
    return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(q, dtype=torch.float64)))


def alie(h: torch.Tensor, n: int, f: int, z: float = 0.0) -> torch.Tensor:
    h = h.double()
    return h.mean(0) - (z if z > 0 else alie_z(n, f)) * h.std(0, unbiased=True)


def ipm(h: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    return -eps * h.double().mean(0)


def _largest_gamma(ok: Callable[[float], bool], start: float = 10.0, tol: float = 1e-5) -> float:
    """Shejwalkar & Houmansadr's search (Alg. 1): halve the step, move up while ``ok``, down while not."""
    gamma, step, best = start, start / 2, 0.0
    while step > tol:
        if ok(gamma):
            best = max(best, gamma)
            gamma += step
        else:
            gamma -= step
        step /= 2
    return best


def min_max(h: torch.Tensor, n: int = 0, f: int = 0, p: torch.Tensor | None = None) -> torch.Tensor:
    h = h.double()
    mu, p = h.mean(0), -h.std(0, unbiased=True) if p is None else p.double()
    bound = float(torch.cdist(h, h).max())
    gamma = _largest_gamma(lambda g: float((mu + g * p - h).norm(dim=1).max()) <= bound)
    return mu + gamma * p


def min_sum(h: torch.Tensor, n: int = 0, f: int = 0, p: torch.Tensor | None = None) -> torch.Tensor:
    h = h.double()
    mu, p = h.mean(0), -h.std(0, unbiased=True) if p is None else p.double()
    bound = float(torch.cdist(h, h).pow(2).sum(1).max())
    gamma = _largest_gamma(lambda g: float((mu + g * p - h).pow(2).sum()) <= bound)
    return mu + gamma * p


#: attack -> (honest [h, d], n, f, strength) -> the colluders' vector; default strengths next to them
COLLUDING: dict[str, Callable[[torch.Tensor, int, int, float], torch.Tensor]] = {
    "alie": lambda h, n, f, s: alie(h, n, f, z=s),
    "ipm": lambda h, n, f, s: ipm(h, eps=s),
    "min-max": lambda h, n, f, s: min_max(h),
    "min-sum": lambda h, n, f, s: min_sum(h),
}
DEFAULT_STRENGTH = {"alie": 0.0, "ipm": 0.1, "min-max": 1.0, "min-sum": 1.0, "backdoor": 1.0}


@dataclass(frozen=True)
class Trigger:
    """A square patch of value ``value`` in the bottom-right corner and the label it should force."""

    size: int = 2
    value: float = 1.0
    target: int = 0
    fraction: float = 0.5  # of the attacker's batch that carries the trigger


def apply_trigger(x: torch.Tensor, trigger: Trigger) -> torch.Tensor:
    """Images ``[b, c, h, w]`` with the patch stamped on (a copy)."""
    out = x.clone()
    out[..., -trigger.size :, -trigger.size :] = trigger.value
    return out


def backdoor_success(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, trigger: Trigger) -> float:
    """Fraction of test images not of the target class that the model labels as the target once triggered."""
    keep = y != trigger.target
    if not bool(keep.any()):
        return float("nan")
    model.eval()
    with torch.no_grad():
        pred = model(apply_trigger(x[keep], trigger)).argmax(1)
    return float((pred == trigger.target).double().mean())


class ColludingReplica(Replica):
    """A malicious worker of a sync round: recomputes the honest workers' gradients of this step at the model it
    holds (their batches from the run's ``BatchPlan``) and leaves the colluders' vector in ``p.grad``."""

    def __init__(self, honest: Replica, attack: str, strength: float, plan, x, y, honest_workers, n, f, from_step=0):  # noqa: ANN001, E501
        super().__init__(honest.model, honest.optimizer, honest.loss_fn)
        self.from_step = from_step  # honest before this step (``--malicious ...,from-step=N``)
        self.attack, self.strength = attack, strength
        self.plan, self.x, self.y = plan, x, y
        self.honest_workers, self.n, self.f = list(honest_workers), n, f
        self.trigger = Trigger()
        self.steps = 0

    def compute_gradients(self, x: torch.Tensor, y: torch.Tensor) -> float:
        step, self.steps = self.steps, self.steps + 1
        if step < self.from_step:
            return super().compute_gradients(x, y)
        if self.attack == "backdoor":
            return self._backdoor(x, y)
        grads = []
        for w in self.honest_workers:
            idx = torch.from_numpy(self.plan.at(w, step))
            super().compute_gradients(self.x[idx], self.y[idx])
            grads.append(self.flat_grad())
        loss = super().compute_gradients(x, y)  # the loss it reports is its own batch's, as an honest worker's
        self.set_flat_grad(COLLUDING[self.attack](torch.stack(grads), self.n, self.f, self.strength).float())
        return loss

    def _backdoor(self, x: torch.Tensor, y: torch.Tensor) -> float:
        k = max(1, int(round(self.trigger.fraction * len(x))))
        x, y = x.clone(), y.clone()
        x[:k] = apply_trigger(x[:k], self.trigger)
        y[:k] = self.trigger.target
        loss = super().compute_gradients(x, y)
        if self.strength != 1.0:
            self.set_flat_grad(self.strength * self.flat_grad())
        return loss


def colluding_replica(replica: Replica, spec, cfg, x: torch.Tensor, y: torch.Tensor) -> Replica:  # noqa: ANN001
    """The wrapper ``--malicious rank=R,attack=alie|ipm|min-max|min-sum|backdoor`` builds for a ps worker rank R
    (worker R - 1); the other ``--malicious`` ranks are its colluders, every other worker is honest."""
    from ..data import BatchPlan, load_dataset
    from ..errors import ConfigError
    from .specs import parse_malicious

    if cfg.pattern.name != "ps" or cfg.pattern.schedule != "sync" or cfg.resume:
        raise ConfigError(f"--malicious attack={spec.attack} colludes in ps --schedule sync rounds (without --resume)")
    bad = {parse_malicious(t).rank - 1 for t in cfg.malicious}
    honest = [w for w in range(cfg.workers) if w not in bad]
    if len(honest) < 2:
        raise ConfigError(f"--malicious attack={spec.attack} needs at least 2 honest workers to estimate from")
    plan = BatchPlan.for_run(cfg, load_dataset(cfg.dataset, cfg.data_dir), cfg.workers)
    strength = spec.strength
    return ColludingReplica(replica, spec.attack, strength, plan, x, y, honest, cfg.workers, len(bad), spec.from_step)
