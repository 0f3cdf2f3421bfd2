"""Robust aggregation rules as pure functions over a stack of flattened updates ``g`` of shape ``[n, d]``.

Each returns ``(aggregate, selected)``: the aggregated vector and the row indices the rule kept whole (every row for
the coordinate-wise rules, which keep no row whole nor drop one). The definitions follow the papers:

- Krum, Multi-Krum: Blanchard et al., NeurIPS 2017, Sec. 4 (score = sum of the n - f - 2 smallest squared distances
  to the other rows; Krum returns the row of least score, Multi-Krum the mean of the m rows of least score).
- coordinate-wise median and trimmed mean: Yin et al., ICML 2018, Def. 1 and 2 (trim b of n values at each end of
  every coordinate).
- Bulyan: El Mhamdi et al., ICML 2018, Alg. 1 (theta = n - 2f rows chosen by Krum one at a time, then per coordinate
  the mean of the beta = theta - 2f values closest to the coordinate's median).
- centered clipping: Karimireddy et al., ICML 2021, Alg. 2 (v <- v + mean_i clip_tau(g_i - v), L times, from the
  previous round's aggregate).

All arithmetic is in float64 so that ties and sums do not depend on the order of float32 rounding.

>>> import torch
>>> g = torch.tensor([[0.0], [1.0], [2.0], [100.0]])
>>> float(median(g)[0])
1.5
"""

from __future__ import annotations

import torch

__all__ = ["krum_scores", "krum", "multi_krum", "median", "trimmed_mean", "bulyan", "centered_clipping", "clip"]


def krum_scores(g: torch.Tensor, f: int) -> torch.Tensor:
    """Krum's score of every row: the sum of its n - f - 2 smallest squared distances to the other rows."""
    n = len(g)
    d2 = torch.cdist(g.double(), g.double()).pow(2)
    d2.fill_diagonal_(float("inf"))  # a row is not its own neighbour
    k = n - f - 2
    return torch.topk(d2, k, dim=1, largest=False).values.sum(1)


def krum(g: torch.Tensor, f: int) -> tuple[torch.Tensor, list[int]]:
    """The row with the least Krum score (needs n >= 2f + 3); ties go to the lowest index."""
    i = int(torch.argmin(krum_scores(g, f)))
    return g[i].double().clone(), [i]


def multi_krum(g: torch.Tensor, f: int, m: int) -> tuple[torch.Tensor, list[int]]:
    """The mean of the m rows of least Krum score (scores computed once, as ByzFL and Flower do)."""
    order = torch.argsort(krum_scores(g, f), stable=True)[:m]
    chosen = sorted(int(i) for i in order)
    return g[chosen].double().mean(0), chosen


def median(g: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Coordinate-wise median; for an even n the mean of the two middle values (numpy's convention)."""
    s = torch.sort(g.double(), dim=0).values
    n = len(g)
    mid = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return mid, list(range(n))


def trimmed_mean(g: torch.Tensor, b: int) -> tuple[torch.Tensor, list[int]]:
    """Coordinate-wise mean after dropping the b largest and b smallest values (needs n > 2b)."""
    s = torch.sort(g.double(), dim=0).values
    return s[b : len(g) - b].mean(0), list(range(len(g)))


def bulyan(g: torch.Tensor, f: int) -> tuple[torch.Tensor, list[int]]:
    """Bulyan over Krum (needs n >= 4f + 3): select theta = n - 2f rows by repeated Krum, then per coordinate average
    the beta = theta - 2f selected values closest to their median."""
    n = len(g)
    remaining = list(range(n))
    chosen: list[int] = []
    for _ in range(n - 2 * f):
        # Krum over what is left; with fewer than 2f + 3 rows left the neighbourhood shrinks to what exists
        sub = g[remaining]
        k = max(1, len(remaining) - f - 2)
        d2 = torch.cdist(sub.double(), sub.double()).pow(2)
        d2.fill_diagonal_(float("inf"))
        scores = torch.topk(d2, min(k, len(remaining) - 1), dim=1, largest=False).values.sum(1)
        if len(remaining) == 1:
            scores = torch.zeros(1, dtype=torch.float64)
        chosen.append(remaining.pop(int(torch.argmin(scores))))
    chosen.sort()
    sel = g[chosen].double()
    beta = len(chosen) - 2 * f
    med, _ = median(sel)
    # per coordinate, the beta values nearest the median (stable: ties resolved by row order)
    nearest = torch.argsort((sel - med).abs(), dim=0, stable=True)[:beta]
    return torch.gather(sel, 0, nearest).mean(0), chosen


def clip(x: torch.Tensor, tau: float) -> torch.Tensor:
    """Rows of ``x`` scaled down to norm at most ``tau`` (``x * min(1, tau / |x|)``)."""
    norms = x.norm(dim=-1, keepdim=True)
    return x * torch.clamp(tau / norms.clamp_min(1e-300), max=1.0)


def centered_clipping(
    g: torch.Tensor, center: torch.Tensor, tau: float, iters: int = 1
) -> tuple[torch.Tensor, list[int]]:
    """Centered clipping from ``center``; the kept rows are those never clipped in the last iteration."""
    v = center.double().clone()
    x = g.double()
    for _ in range(iters):
        v = v + clip(x - v, tau).mean(0)
    whole = [i for i, r in enumerate((x - v).norm(dim=1)) if float(r) <= tau]
    return v, whole
