"""A PNG grid of true (top row) versus reconstructed (bottom row) images, each reconstruction captioned with PSNR.

Uses matplotlib's object API with the Agg canvas: no pyplot, no global backend switch, safe in worker processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from . import metrics

__all__ = ["save_grid"]


def _to_hwc(x: torch.Tensor):
    x = x.detach().to(torch.float32).cpu().clamp(0, 1)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def save_grid(
    path: str | Path,
    truth: torch.Tensor,
    reconstruction: torch.Tensor,
    *,
    title: str | None = None,
    order: Sequence[int] | None = None,
) -> Path:
    """Write ``path`` (PNG): row 1 the true images (B, C, H, W), row 2 the reconstructions matched to them
    (Hungarian on MSE unless ``order`` is given), each captioned with its PSNR. Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = truth.shape[0]
    order = list(order) if order is not None else metrics.match(truth, reconstruction)
    fig = Figure(figsize=(1.4 * n + 0.4, 3.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, n, squeeze=False)
    for i in range(n):
        rec = reconstruction[order[i]]
        for row, img in enumerate((truth[i], rec)):
            ax = axes[row][i]
            ax.imshow(_to_hwc(img), cmap="gray" if img.shape[0] == 1 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[1][i].set_xlabel(f"{metrics.psnr(truth[i], rec):.1f} dB", fontsize=8)
    axes[0][0].set_ylabel("true")
    axes[1][0].set_ylabel("reconstructed")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path
