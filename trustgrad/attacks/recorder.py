"""``--record-server-view``: store what an aggregator sees at the first step, for ``trustgrad attack``.

The coordinating worker taps its pattern's payloads: its own outgoing gradient (what a parameter server or a ring
neighbour receives from it: ``gradient``) and the aggregate every participant learns (``aggregate``). Parameter
servers record their own view (individual updates or ciphertext bytes) through :func:`save_view` directly. Files go
to ``OUT/server_view/KIND-step0.safetensors`` with the model state before the step and, for scoring only, the batch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import RunConfig, config_to_dict
from ..launch import RankContext
from ..seeding import batch_indices
from ..train import HOOKS, StepEvent, WorkerState
from .view import ServerView, save_view

log = logging.getLogger(__name__)


def unflatten(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    out, offset = [], 0
    for p in params:
        out.append(flat[offset : offset + p.numel()].detach().clone().view_as(p))
        offset += p.numel()
    return out


class ServerViewRecorder:
    def __init__(self) -> None:
        self.captured: dict[str, torch.Tensor] = {}
        self.state_before: dict[str, torch.Tensor] | None = None
        self.done = False

    def on_start(self, state: WorkerState) -> None:
        if state.ctx.rank == state.pattern.coordinator:
            self.state = state
            state.pattern.taps.append(self._observe)

    def _observe(self, kind: str, payload: Any) -> None:
        if self.done or kind not in ("gradient", "aggregate") or not isinstance(payload, torch.Tensor):
            return
        if self.state_before is None:  # taps fire before the update: this is the state the gradient was taken at
            self.state_before = {k: v.detach().clone() for k, v in self.state.replica.model.state_dict().items()}
        self.captured[kind] = payload.detach().clone()

    def on_step(self, state: WorkerState, event: StepEvent) -> None:
        if self.done or not self.captured:
            return
        self.done = True
        cfg, ds = state.cfg, state.dataset
        out = Path(cfg.out) / "server_view"  # type: ignore[arg-type]
        for kind, flat in self.captured.items():
            if kind == "gradient":
                idx, contributors = event.indices, 1
            else:  # every worker's batch of this step, recomputed from the PRF
                from ..data import shard_indices

                idx = np.concatenate(
                    [
                        batch_indices(
                            shard_indices(len(ds.x_train), w, state.pattern.num_workers, cfg.seed),
                            cfg.seed, w, event.epoch, event.epoch_step, cfg.batch_size,
                        )
                        for w in range(state.pattern.num_workers)
                    ]
                )  # fmt: skip
                contributors = state.pattern.num_workers
            tidx = torch.from_numpy(idx)
            view = ServerView(
                kind=kind,
                model=cfg.model.name,
                model_config=config_to_dict(cfg.model),
                input_shape=ds.input_shape,
                num_classes=ds.num_classes,
                state=self.state_before or {},
                batch_size=len(idx),
                contributors=contributors,
                gradients=unflatten(flat, state.replica.params),
                truth_x=ds.x_train[tidx],
                truth_y=ds.y_train[tidx],
                meta={"step": event.step, "worker": event.worker, "pattern": cfg.pattern.name, "dataset": cfg.dataset},
            )
            path = save_view(out / f"{kind}-step{event.step}.safetensors", view)
            log.info("server view written to %s", path)

    def on_end(self, state: WorkerState) -> dict[str, Any]:
        return {"server_view": str(Path(state.cfg.out) / "server_view")} if self.done else {}  # type: ignore[arg-type]


@HOOKS.register("server-view")
def _factory(cfg: RunConfig, ctx: RankContext) -> ServerViewRecorder | None:
    return ServerViewRecorder() if cfg.record_server_view else None
