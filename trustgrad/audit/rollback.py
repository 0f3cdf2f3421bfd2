"""Removing an excluded worker's contributions from a model trained with SGD + momentum, exactly.

With ``m_{t+1} = mu m_t + g_t`` and ``p_{t+1} = p_t - lr m_{t+1}``, a share ``s`` added to ``g_t`` at update t has, by
update T > t, moved the weights by ``-lr s (1 - mu^(T-t)) / (1 - mu)`` (``-lr s (T - t)`` when mu = 0) and left
``mu^(T-1-t) s`` in the momentum buffer. Both are linear in ``s``, so subtracting them restores exactly the state the
run would have had without the share (weight decay couples the share with the weights; its echo is not undone).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["undo_shares"]


def undo_shares(
    params: torch.Tensor,
    momentum: torch.Tensor | None,
    shares: Iterable[tuple[int, torch.Tensor]],
    lr: float,
    mu: float,
    now: int,
) -> int:
    """Undo ``(t, share)`` contributions in place, ``now`` being the number of updates applied so far."""
    count = 0
    for t, share in shares:
        gap = now - t
        if gap < 1:
            raise ValueError(f"share of update {t} was not applied yet (now {now})")
        params.add_(share, alpha=lr * (gap if mu == 0 else (1 - mu**gap) / (1 - mu)))
        if momentum is not None:
            momentum.sub_(share, alpha=mu ** (gap - 1))
        count += 1
    return count
