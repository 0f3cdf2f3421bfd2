"""Cutting an ``nn.Sequential`` into pipeline stages: balanced by parameter count, or at explicit split points.

A *layer* is a child that holds parameters (Linear, Conv2d); parameterless children (ReLU, Flatten, pooling) ride
with the layer before them (leading ones with the first layer), so a stage never ends between a layer and its
activation. A split point is the index of the ``nn.Sequential`` child that starts a new stage.

The balanced split solves the linear-partition problem exactly (minimise the largest stage's parameter count over all
contiguous partitions): GPipe (Huang et al. 2019, sec. 2.2) balances stages by cost, and on these small dense models
parameter count is the cost of a stage's forward and backward up to a constant.

>>> from torch import nn
>>> m = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
>>> balanced_split(m, 2)
(3,)
>>> [len(stage) for stage in split_model(m, (3,))]
[3, 3]
"""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError

__all__ = ["layer_starts", "balanced_split", "check_split_points", "split_model", "stage_sizes"]


def _size(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def layer_starts(model: nn.Sequential) -> list[int]:
    """Child indices where a layer group may start (every child with parameters; the first group starts at 0)."""
    starts = [i for i, child in enumerate(model) if _size(child) > 0]
    if starts:
        starts[0] = 0
    return starts


def stage_sizes(model: nn.Sequential, cuts: tuple[int, ...]) -> list[int]:
    """Parameters held by each stage for the given split points."""
    bounds = [0, *cuts, len(model)]
    return [sum(_size(model[i]) for i in range(a, b)) for a, b in zip(bounds, bounds[1:])]


def balanced_split(model: nn.Sequential, stages: int) -> tuple[int, ...]:
    """Split points giving ``stages`` contiguous stages whose largest parameter count is as small as possible."""
    starts = layer_starts(model)
    if stages > len(starts):
        raise ConfigError(
            f"cannot cut a model of {len(starts)} layers into {stages} stages; use --stages <= {len(starts)} "
            "(or a deeper model, e.g. --depth)"
        )
    bounds = [*starts, len(model)]
    weights = [sum(_size(model[i]) for i in range(a, b)) for a, b in zip(bounds, bounds[1:])]
    n = len(weights)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[k][j]: smallest possible largest stage when the first j groups form k stages; cut[k][j]: where stage k starts
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                cost = max(best[k - 1][i], prefix[j] - prefix[i])
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    groups, j = [], n
    for k in range(stages, 0, -1):
        j = cut[k][j]
        groups.append(j)
    return tuple(starts[g] for g in sorted(groups)[1:])


def check_split_points(model: nn.Sequential, points: tuple[int, ...], stages: int) -> tuple[int, ...]:
    """Validate explicit split points (child indices); every stage must hold at least one layer."""
    if len(points) != stages - 1:
        raise ConfigError(f"--split-points needs {stages - 1} indices for {stages} stages, got {len(points)}")
    if list(points) != sorted(set(points)) or (points and not 0 < points[0] <= points[-1] < len(model)):
        raise ConfigError(
            f"--split-points must be strictly increasing child indices in 1..{len(model) - 1}, got {list(points)}"
        )
    empty = [s for s, size in enumerate(stage_sizes(model, points)) if size == 0]
    if empty:
        raise ConfigError(f"--split-points {list(points)} leave stage {empty[0]} without parameters; cut at a layer")
    return tuple(points)


def split_model(model: nn.Sequential, cuts: tuple[int, ...]) -> list[nn.Sequential]:
    """The stages: they share modules with ``model`` and keep its child names (full-model state dict keys)."""
    bounds = [0, *cuts, len(model)]
    return [model[a:b] for a, b in zip(bounds, bounds[1:])]
