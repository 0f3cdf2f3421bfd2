"""Re-executing training segments and measuring how far a claimed checkpoint is from the re-execution.

These are the small public pieces the verifier (and later the parameter server's audit of each pushed update) is built
from: :func:`replay_segment` (state at step t + the batches + hyperparameters -> state at step t + k),
:func:`distances` (l1, l2, linf and cosine over the full state, in float64), :class:`Thresholds` and
:func:`gradient_step_norm` (the lower bound on an update that the claimed learning rate implies).

Data-parallel replay (Jia et al. 2021, Alg. 2, extended to synchronous data parallelism): a synchronous job's step
applies the mean of the workers' gradients, each the mean loss gradient of that worker's batch; with equal batch sizes
that is the gradient of the mean loss on the concatenation of the batches, so one process replays the global
trajectory by stepping on the concatenated batch. (It agrees with the distributed run to float32 rounding, see
``calibrate``.)

Two things break "one step on the concatenated batch", and both are replayed as the workers ran them
(docs/models.md): seeded augmentation (each worker's crops and flips are a PRF of (seed, worker, step, sample):
``trustgrad.augment``) and BatchNorm, whose training-mode forward normalises each worker's batch by that batch's own
statistics and whose running statistics the patterns average after every step. A model with BatchNorm is therefore
replayed worker by worker from the same running statistics, which are then averaged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..augment import Augment
from ..models import has_batch_stats
from ..optim import LOSSES, OPTIMIZERS, Hyper, Loss, loss_fn_of, loss_name
from .format import capture_state, restore_state

#: Hyper, LOSSES, OPTIMIZERS, loss_name and loss_fn_of live in ``trustgrad.optim`` (replicas build from them too);
#: named here as well because replay is where a proof's readers look for them
__all__ = [
    "Hyper",
    "Distances",
    "Thresholds",
    "replay_segment",
    "distances",
    "gradient_step_norm",
    "update_norm",
    "LOSSES",
    "OPTIMIZERS",
    "loss_name",
    "loss_fn_of",
    "STATE_PREFIXES",
    "optimizer_state_spec",
]


#: per optimizer: its per-parameter state entries and their checkpoint prefixes (``<prefix>/<param>``); SGD's buffer
#: keeps the ``momentum/`` prefix of schema 2. Adam's ``step`` is a count: checked for equality, not by distance.
STATE_PREFIXES: dict[str, dict[str, str]] = {
    "sgd": {"momentum_buffer": "momentum"},
    "adam": {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", "step": "step"},
}
#: checkpoint prefixes compared by distance (weights and moments), and those that must be equal (counts)
MOMENT_PREFIXES = ("momentum", "exp_avg", "exp_avg_sq")
COUNT_PREFIXES = ("step",)


def optimizer_state_spec(
    hyper: Hyper, params: dict[str, tuple[tuple[int, ...], torch.dtype]]
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The optimizer-state tensors a checkpoint after step 0 holds, from ``{param name: (shape, dtype)}``."""
    if hyper.optimizer == "sgd" and hyper.momentum == 0:  # plain SGD keeps no state
        return {}
    spec = {}
    for key, prefix in STATE_PREFIXES[hyper.optimizer].items():
        for name, (shape, dtype) in params.items():
            spec[f"{prefix}/{name}"] = ((), torch.float32) if key == "step" else (shape, dtype)
    return spec


def replay_segment(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    batches: Sequence[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    hyper: Hyper,
    *,
    workers: int = 1,
    augment: Augment | None = None,
    first_step: int = 0,
) -> dict[str, torch.Tensor]:
    """Load ``state`` into ``model`` and a fresh SGD, take one step per batch of global indices; return the new state.

    ``batches[i]`` holds step ``first_step + i``'s indices of every worker (``workers`` equal batches), concatenated in
    worker order. The caller's global RNG is left untouched; the segment runs from the RNG state recorded in
    ``state`` (if any).
    """
    optimizer = OPTIMIZERS.get(hyper.optimizer)(model, hyper)
    loss_fn = loss_fn_of(hyper)
    restore_state(model, optimizer, state)
    with torch.random.fork_rng(devices=[]):
        if "rng/torch" in state:
            torch.set_rng_state(state["rng/torch"].to(torch.uint8))
        model.train()
        for i, idx in enumerate(batches):
            optimizer.zero_grad(set_to_none=False)
            step_backward(model, loss_fn, x, y, idx, workers, augment, first_step + i)
            optimizer.step()
        out = capture_state(model, optimizer, rng=False)
        out["rng/torch"] = torch.get_rng_state()
    return out


def step_backward(
    model: nn.Module,
    loss_fn: Loss,
    x: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    workers: int = 1,
    augment: Augment | None = None,
    step: int = 0,
) -> None:
    """Accumulate a synchronous step's mean gradient into ``p.grad``: of the concatenated batch's loss, or, where the
    workers' inputs differ from it (augmentation) or their batches do not mix (BatchNorm), of the mean of each
    worker's mean loss on its own batch, with BatchNorm's running statistics updated as the patterns do (averaged)."""
    augmenting = augment is not None and augment.active
    coupled = workers > 1 and has_batch_stats(model)
    if not (augmenting or coupled):
        loss_fn(model(x[idx]), y[idx]).backward()  # the path of every model without BatchNorm: unchanged, bit for bit
        return
    chunks = idx.chunk(workers)
    inputs = [augment.apply(x[c], w, step) if augmenting else x[c] for w, c in enumerate(chunks)]  # type: ignore[union-attr]
    if not coupled:
        loss_fn(model(torch.cat(inputs)), y[idx]).backward()
        return
    buffers = list(model.buffers())  # running statistics, and the counters every worker advances alike
    start = [b.detach().clone() for b in buffers]
    ends = []
    for xb, c in zip(inputs, chunks):
        with torch.no_grad():
            for b, s0 in zip(buffers, start):
                b.copy_(s0)
        # backward before the next worker's forward: batch_norm's backward checks the running statistics it saw
        (loss_fn(model(xb), y[c]) / workers).backward()
        ends.append([b.detach().clone() for b in buffers])
    with torch.no_grad():
        for b, *mine in zip(buffers, *ends):
            # statistics summed in worker order, then divided, as the patterns do; counters as every worker has them
            b.copy_(torch.stack(mine).sum(0).div_(workers) if b.is_floating_point() else mine[-1])


def gradient_step_norm(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    idx: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    hyper: Hyper,
    *,
    workers: int = 1,
    augment: Augment | None = None,
    step: int = 0,
) -> float:
    """The size of one state-free step of the run's optimizer at the state's weights on one batch: SGD
    ``lr * ||g||_2``, Adam its first step ``lr * ||g / (|g| + eps)||_2`` (about ``lr * sqrt(parameters)``), with
    ``g = grad + weight_decay * w``.

    Optimizer state is left out on purpose: momentum and Adam's moments are written by the prover, the gradient is not
    (weights are committed, the batch comes from the PRF), so a forger cannot shrink this bound.
    """
    model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model/")}, strict=True)
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[]):
        step_backward(model, loss_fn_of(hyper), x, y, idx, workers, augment, step)
    total = 0.0
    for p in model.parameters():
        g = p.grad.detach().double() + hyper.weight_decay * p.detach().double()
        step = STEP_DIRECTIONS[hyper.optimizer](g, hyper)
        total += float((step * step).sum())
    return hyper.lr * math.sqrt(total)


#: per optimizer, its first (state-free) step's direction for a gradient (times lr: the step)
STEP_DIRECTIONS: dict[str, Callable[[torch.Tensor, Hyper], torch.Tensor]] = {
    "sgd": lambda g, h: g,
    "adam": lambda g, h: g / (g.abs() + h.eps),  # m_hat = g, sqrt(v_hat) = |g| after one step from zero moments
}
#: the share of ``Thresholds.min_update_ratio`` each optimizer is held to. Adam's steps shrink as its moments see
#: noisy gradients (|m| / sqrt(v) < 1): honest 10-step segments of a residual CNN on digits moved 0.45-4.7 first
#: steps (lr 0.01, 20 epochs: 0.45; lr 0.001: 1.4), SGD's >= 3.6 plain steps; 0.05 stays 9x under Adam's honest
#: worst while an interpolated or infinitesimal update is orders of magnitude smaller.
UPDATE_RATIO_SHARE: dict[str, float] = {"sgd": 1.0, "adam": 0.05}


def update_norm(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], params: Sequence[str]) -> float:
    """l2 norm (float64) of ``end - start`` over the named parameters (``model/<name>`` keys)."""
    return math.sqrt(sum(float(((end[k].double() - start[k].double()) ** 2).sum()) for k in params))


@dataclass(frozen=True)
class Distances:
    """Distances between a replayed state and a claimed one (float64, over model state and momentum buffers).

    ``l1``/``l2``/``linf``: norms of ``replayed - claimed``. ``cos``: 1 - cosine similarity of the two *updates*
    (``replayed - start`` and ``claimed - start``), which is scale-free; the cosine of the weights themselves (as in the
    reference code) is ~1 for any small update and says nothing. ``ref_*``: norms of the replayed update, the scale the
    relative thresholds are measured against.
    """

    l1: float
    l2: float
    linf: float
    cos: float
    ref_l1: float
    ref_l2: float
    ref_linf: float
    claimed_l2: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _flat(state: dict[str, torch.Tensor], keys: Sequence[str]) -> torch.Tensor:
    return torch.cat([state[k].detach().reshape(-1).double() for k in keys]) if keys else torch.zeros(0)


def distances(
    start: dict[str, torch.Tensor], replayed: dict[str, torch.Tensor], claimed: dict[str, torch.Tensor]
) -> Distances:
    """Distances over the floating-point entries that ``replayed`` and ``claimed`` share (model and momentum)."""
    prefixes = tuple(f"{p}/" for p in ("model", *MOMENT_PREFIXES))
    keys = sorted(k for k in claimed if k in replayed and k.startswith(prefixes))
    keys = [k for k in keys if claimed[k].is_floating_point()]
    r, c = _flat(replayed, keys), _flat(claimed, keys)
    s = (
        torch.cat(
            [
                start[k].detach().reshape(-1).double()
                if k in start
                else torch.zeros(claimed[k].numel(), dtype=torch.float64)
                for k in keys
            ]
        )
        if keys
        else torch.zeros(0)
    )
    diff, dr, dc = r - c, r - s, c - s
    nr, nc = float(dr.norm()), float(dc.norm())
    # the cosine of the updates; a zero update only matches a zero update
    cos = 1.0 - float(torch.dot(dr, dc)) / (nr * nc) if nr * nc > 0.0 else float(nr != nc)
    inf = lambda v: float(v.abs().max()) if v.numel() else 0.0  # noqa: E731
    return Distances(
        l1=float(diff.abs().sum()),
        l2=float(diff.norm()),
        linf=inf(diff),
        cos=max(0.0, cos),
        ref_l1=float(dr.abs().sum()),
        ref_l2=nr,
        ref_linf=inf(dr),
        claimed_l2=nc,
    )


@dataclass(frozen=True)
class Thresholds:
    """Acceptance thresholds: each norm relative to the replayed update's norm (plus an absolute floor), and cosine.

    Defaults come from measured honest reproduction error (``trustgrad.proof.calibrate``; docs/proof.md): re-executing
    every segment of allreduce/ring/logreg proofs at 1 and 2 threads gave at most 8.5e-7 (l2), 6.6e-7 (l1) and 1.4e-6
    (linf) of the update's norm and a cosine distance of 3.6e-13, while a wrong batch or a missing momentum buffer is
    off by >= 0.1 of it. The relative thresholds sit ~350x above the honest worst and ~300x below forgeries. Honest
    segments moved >= 3.6x one plain SGD step at their start; the bound asks for 1x.
    """

    rel_l1: float = 3e-4
    rel_l2: float = 3e-4
    rel_linf: float = 1e-3
    cos: float = 1e-7
    floor: float = 1e-9
    #: minimum ratio of a segment's parameter update to one plain SGD step at its start (Fang et al.'s tiny updates)
    min_update_ratio: float = 1.0

    def violations(self, d: Distances) -> list[str]:
        """Which metrics exceed their threshold, with the values (empty: the segment reproduces)."""
        # NaN compares false with everything: a diverged replay (or claimed NaN) must fail, not slip past ``>``
        if not all(math.isfinite(v) for v in asdict(d).values()):
            return ["distances are not finite (the replay or the claimed state diverged)"]
        bad = []
        for metric, ref in (("l1", d.ref_l1), ("l2", d.ref_l2), ("linf", d.ref_linf)):
            value, limit = getattr(d, metric), getattr(self, f"rel_{metric}") * ref + self.floor
            if value > limit:
                bad.append(f"{metric} {value:.3g} > {limit:.3g}")
        if d.cos > self.cos:
            bad.append(f"cos {d.cos:.3g} > {self.cos:.3g}")
        return bad

    def as_dict(self) -> dict[str, float]:
        return asdict(self)
