"""The worker loop: independent of the communication pattern, the codec and the prover.

``train_rank`` is what every rank of a job runs. It owns the data (shard, PRF batch order), the epochs, progress and
evaluation; the pattern owns communication and the update; hooks (the prover, the server-view recorder, ...) observe
every step. Data flows one way (docs/architecture.md §2): config -> launch -> this loop -> pattern -> optimizer step
-> hooks.
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from . import factories
from .augment import augmenter
from .comm import Comm
from .config import RunConfig
from .data import BatchPlan, Dataset, load_dataset
from .errors import ConfigError
from .launch import RankContext
from .models import build_model, has_batch_stats
from .patterns import PATTERNS, Pattern
from .registry import Registry
from .replica import Replica, optimizer_for

__all__ = ["train_rank", "evaluate", "model_report", "StepEvent", "Hook", "HOOKS", "WorkerState"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepEvent:
    """What hooks see after each step of a worker."""

    epoch: int
    step: int  # global step index of this worker, 0-based
    epoch_step: int
    worker: int
    indices: np.ndarray
    loss: float


@dataclass
class WorkerState:
    """Everything about one training rank that hooks may need."""

    cfg: RunConfig
    ctx: RankContext
    comm: Comm
    pattern: Pattern
    dataset: Dataset
    replica: Replica
    worker: int
    shard: np.ndarray
    steps_per_epoch: int
    total_steps: int
    extra: dict[str, Any] = field(default_factory=dict)


class Hook(Protocol):
    def on_start(self, state: WorkerState) -> None: ...
    def on_step(self, state: WorkerState, event: StepEvent) -> None: ...
    def on_end(self, state: WorkerState) -> dict[str, Any]: ...


#: Factories ``(cfg, ctx) -> Hook | None``; every registered factory is asked, and returns None when not enabled.
HOOKS: Registry[Callable[[RunConfig, RankContext], Hook | None]] = Registry("hook")
#: Modules that register hooks. They import this module, so they are imported when a worker starts, not above.
HOOK_MODULES = ["trustgrad.attacks.recorder", "trustgrad.proof.prover"]


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of ``model`` on ``(x, y)``: cross-entropy whatever loss trained the model,
    so test losses compare across runs and losses (the training loss is in the metrics)."""
    if has_batch_stats(model):
        # the 32x32 BatchNorm models: ResNet-18's activations at 1024 images made a rank's peak 2 GB (bench scale);
        # the small models keep 1024, so their figures stay bit for bit what they were
        batch = min(batch, 128)
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            logits = model(x[i : i + batch])
            loss_sum += float(nn.functional.cross_entropy(logits, y[i : i + batch], reduction="sum"))
            correct += int((logits.argmax(1) == y[i : i + batch]).sum())
    return loss_sum / max(1, len(x)), correct / max(1, len(x))


def _device(cfg: RunConfig, ctx: RankContext) -> torch.device:
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but no GPU is visible; use --device cpu")
        torch.cuda.set_device(ctx.local_rank % torch.cuda.device_count())
        return torch.device("cuda", ctx.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def train_rank(ctx: RankContext, cfg: RunConfig) -> dict[str, Any]:
    """Run this rank's part of the job; returns a plain dict the launcher merges into the run's summary."""
    factories.allow(cfg.model.name, cfg.model.loss, cfg.dataset)  # the launching user's config names them
    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    comm = Comm(ctx, cfg.timeout)
    pattern = PATTERNS.get(cfg.pattern.name)(cfg, comm)
    worker = pattern.worker_index
    if worker is None and cfg.server_threads is not None:
        # OpenFHE caps its OpenMP threads at what it sees when it loads: this must come before its first import here
        if "openfhe" in sys.modules:
            log.warning("OpenFHE loaded before --server-threads applied: it keeps %d thread(s)", cfg.threads)
        torch.set_num_threads(cfg.server_threads)
    result: dict[str, Any] = {"rank": ctx.rank, "role": "worker" if worker is not None else "server"}
    if worker is None:
        result.update(pattern.serve())
    else:
        result.update(_train_worker(ctx, cfg, comm, pattern, worker))
    result["stats"] = {**pattern.stats(), **result.get("stats", {})}
    result["bytes_sent"] = comm.bytes_sent
    result["messages_sent"] = comm.messages_sent
    result["seconds"] = time.perf_counter() - started
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM; 0 where /proc is missing): what ``bench scale`` reports."""
    try:
        with open("/proc/self/status") as fh:
            return next((int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM")), 0)
    except OSError:
        return 0


def _train_worker(ctx: RankContext, cfg: RunConfig, comm: Comm, pattern: Pattern, worker: int) -> dict[str, Any]:
    device = _device(cfg, ctx)
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    x_train, y_train = ds.x_train.to(device), ds.y_train.to(device)
    x_test, y_test = ds.x_test.to(device), ds.y_test.to(device)
    model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, cfg.seed, cfg.model).to(device)
    model = pattern.local_model(model)  # a pipeline stage or a sharded model under model parallelism
    replica = Replica(model, optimizer_for(model, cfg))
    if cfg.malicious:
        from .attacks.poisoning import wrap_replica

        replica = wrap_replica(replica, cfg.malicious, ctx.rank, x_train, y_train, cfg.seed, cfg)
    plan = BatchPlan.for_run(cfg, ds, pattern.num_workers)
    shard, steps_per_epoch = plan.shards[worker], plan.steps_per_epoch
    if steps_per_epoch == 0:
        raise ConfigError(
            f"batch_size {cfg.batch_size} is larger than a worker's shard ({len(shard)} samples of {ds.name}); "
            "use a smaller --batch-size or fewer --workers"
        )
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    state = WorkerState(cfg, ctx, comm, pattern, ds, replica, worker, shard, steps_per_epoch, total)
    for module in HOOK_MODULES:
        importlib.import_module(module)
    hooks = [h for name in HOOKS if (h := HOOKS.get(name)(cfg, ctx)) is not None]
    coordinator = ctx.rank == pattern.coordinator
    augment = augmenter(cfg)  # seeded crops and flips (PRF of seed, worker, step, sample); the identity by default
    pattern.attach(replica)
    for hook in hooks:
        hook.on_start(state)

    bar = _progress(total, enabled=coordinator and cfg.progress, desc=f"{cfg.pattern.name} x{cfg.workers}")
    metrics: list[dict[str, Any]] = []
    first = pattern.start_step  # > 0 when resuming from a checkpoint: those steps are done
    started, step, last_loss = time.perf_counter(), first, float("nan")
    stepping = 0.0  # seconds in the step loop alone (no evaluation): what ``bench scale`` compares with DDP's loop
    stepping_cpu = 0.0  # the process's CPU seconds (every thread: gloo's, a proof writer's) in that loop
    for epoch in range(cfg.epochs):
        losses = []
        for s in range(steps_per_epoch):
            if step >= total:
                break
            if epoch * steps_per_epoch + s < first:
                continue
            step_started, step_cpu = time.perf_counter(), time.process_time()
            idx = plan.batch(worker, epoch, s)
            tidx = torch.from_numpy(idx).to(device)
            last_loss = pattern.step(replica, augment(x_train[tidx], worker, step), y_train[tidx])
            losses.append(last_loss)
            event = StepEvent(epoch, step, s, worker, idx, last_loss)
            for hook in hooks:
                hook.on_step(state, event)
            stepping += time.perf_counter() - step_started
            stepping_cpu += time.process_time() - step_cpu
            step += 1
            bar.update(1)
        extra = pattern.epoch_end(replica, epoch) if losses else {}  # every rank: patterns may communicate
        full = pattern.full_model(replica) if losses else None  # every rank: model-parallel patterns gather
        if coordinator and losses:
            test_loss, test_acc = evaluate(full, x_test, y_test)
            metrics.append(
                {
                    "epoch": epoch,
                    "steps": step,
                    "loss": float(np.mean(losses)),
                    "test_loss": test_loss,
                    "test_accuracy": test_acc,
                    "elapsed": time.perf_counter() - started,
                    "bytes_sent": comm.bytes_sent,
                    **extra,
                }
            )
            bar.set_postfix(loss=f"{np.mean(losses):.3f}", acc=f"{test_acc:.3f}")
            log.info("epoch %d: loss %.4f, test accuracy %.4f", epoch, np.mean(losses), test_acc)
        if step >= total:
            break
    bar.close()
    pattern.finish(replica)
    out: dict[str, Any] = {
        "steps": step,
        "worker": worker,
        "train_seconds": time.perf_counter() - started,
        "step_seconds": stepping,
        "step_cpu_seconds": stepping_cpu,
    }
    for hook in hooks:
        out.setdefault("stats", {}).update(hook.on_end(state) or {})
    full = pattern.full_model(replica)
    if coordinator:
        out.update(model_report(full, x_train, y_train, x_test, y_test), metrics=metrics, last_batch_loss=last_loss)
    return out


def model_report(
    model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor
) -> dict[str, Any]:
    """What a coordinator returns about the final model (any rank holding it: a worker or a parameter server)."""
    test_loss, test_acc = evaluate(model, x_test, y_test)
    train_loss, _ = evaluate(model, x_train, y_train)
    return {
        "coordinator": True,
        "final_loss": train_loss,
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "num_params": sum(p.numel() for p in model.parameters()),
        "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool, desc: str):  # noqa: ANN202
    # A bar only where someone watches (a terminal); logs and CI get the per-epoch log lines instead. No tqdm object
    # at all otherwise: it would create a multiprocessing lock per process that outlives spawned ranks.
    if not (enabled and sys.stderr.isatty()):
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, mininterval=0.5)
