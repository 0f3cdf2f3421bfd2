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
from ..data import BatchPlan, Dataset
from ..launch import RankContext
from ..train import HOOKS, StepEvent, WorkerState
from .view import ServerView, save_view

log = logging.getLogger(__name__)


def unflatten(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    out, offset = [], 0
    for p in params:
        out.append(flat[offset : offset + p.numel()].detach().clone().view_as(p))
        offset += p.numel()
    return out


def write_view(
    cfg: RunConfig,
    ds: Dataset,
    *,
    kind: str,
    state: dict[str, torch.Tensor],
    params: list[torch.Tensor],
    senders: list[int],
    num_workers: int,
    epoch: int,
    epoch_step: int,
    step: int,
    payload: torch.Tensor | bytes,
) -> Path:
    """Store one observed payload (a flat gradient, or ciphertext bytes) with the state it was computed at and, for
    scoring only, the batches of ``senders`` (recomputed from the PRF: what those workers trained on)."""
    plan = BatchPlan(len(ds.x_train), num_workers, cfg.seed, cfg.batch_size)
    idx = np.concatenate([plan.batch(w, epoch, epoch_step) for w in senders])
    tidx = torch.from_numpy(idx)
    ciphertext = payload if isinstance(payload, bytes) else None
    view = ServerView(
        kind=kind,
        model=cfg.model.name,
        model_config=config_to_dict(cfg.model),
        input_shape=ds.input_shape,
        num_classes=ds.num_classes,
        state=state,
        batch_size=len(idx),
        contributors=len(senders),
        gradients=None if ciphertext is not None else unflatten(payload, params),  # type: ignore[arg-type]
        ciphertext=ciphertext,
        truth_x=ds.x_train[tidx],
        truth_y=ds.y_train[tidx],
        meta={"step": step, "senders": senders, "pattern": cfg.pattern.name, "dataset": cfg.dataset,
              "encryption": cfg.crypto.encrypt, "keys": cfg.crypto.keys},
    )  # fmt: skip
    path = save_view(Path(cfg.out) / "server_view" / f"{kind}-step{step}.safetensors", view)  # type: ignore[arg-type]
    log.info("server view written to %s", path)
    return path


class ServerViewRecorder:
    """Taps the coordinating worker's pattern: ``gradient`` (its own update as a plaintext peer or server receives
    it), ``aggregate`` (what every participant learns) and ``ciphertext`` (``(bytes, sender)``: what an encrypted
    pattern's peers receive)."""

    def __init__(self) -> None:
        self.captured: dict[str, Any] = {}
        self.state_before: dict[str, torch.Tensor] | None = None
        self.done = False

    def on_start(self, state: WorkerState) -> None:
        if state.ctx.rank == state.pattern.coordinator:
            self.state = state
            state.pattern.taps.append(self._observe)

    def _observe(self, kind: str, payload: Any) -> None:
        if self.done or kind not in ("gradient", "aggregate", "ciphertext") or kind in self.captured:
            return
        if self.state_before is None:  # taps fire before the update: this is the state the gradient was taken at
            self.state_before = {k: v.detach().clone() for k, v in self.state.replica.model.state_dict().items()}
        self.captured[kind] = payload.detach().clone() if isinstance(payload, torch.Tensor) else payload

    def on_step(self, state: WorkerState, event: StepEvent) -> None:
        if self.done or not self.captured:
            return
        self.done = True
        everyone = list(range(state.pattern.num_workers))
        for kind, payload in self.captured.items():
            senders = {"gradient": [event.worker], "aggregate": everyone}.get(kind)
            if kind == "ciphertext":
                payload, sender = payload
                senders = [sender]
            write_view(
                state.cfg, state.dataset, kind=kind, state=self.state_before or {}, params=state.replica.params,
                senders=senders, num_workers=state.pattern.num_workers, epoch=event.epoch,
                epoch_step=event.epoch_step, step=event.step, payload=payload,
            )  # fmt: skip

    def on_end(self, state: WorkerState) -> dict[str, Any]:
        return {"server_view": str(Path(state.cfg.out) / "server_view")} if self.done else {}  # type: ignore[arg-type]


class ReceivedViewRecorder:
    """A server's own view (an observer on its taps, ``kind == "received"``): the first push computed on the model
    the server holds, exactly as received (a plaintext gradient, or ciphertext bytes), with that model's state."""

    def __init__(self, cfg: RunConfig, ds: Dataset, steps_per_epoch: int):
        self.cfg, self.ds, self.steps_per_epoch = cfg, ds, steps_per_epoch
        self.recorded = False

    def __call__(self, kind: str, push: Any) -> None:
        if kind != "received" or self.recorded:
            return
        self.recorded = True
        replica = push.replica
        epoch, epoch_step = divmod(push.step, max(1, self.steps_per_epoch))
        write_view(
            self.cfg, self.ds, kind="ciphertext" if push.encrypted else "gradient",
            state={k: v.detach().clone() for k, v in replica.model.state_dict().items()},
            params=replica.params, senders=[push.sender], num_workers=self.cfg.workers, epoch=epoch,
            epoch_step=epoch_step, step=push.step, payload=push.payload if push.encrypted else push.value,
        )  # fmt: skip


@HOOKS.register("server-view")
def _factory(cfg: RunConfig, ctx: RankContext) -> ServerViewRecorder | None:
    return ServerViewRecorder() if cfg.record_server_view else None
