"""``trustgrad bench scale``: a real model at real size, every figure a ratio to an anchor measured in the same run.

The job: ``--model`` (default ResNet-18, CIFAR stem) on ``synthetic-cifar`` with crop-flip augmentation, ``--workers``
allreduce workers, ``--steps`` steps of ``--batch-size`` per worker. Measured, in this order:

1. the same job under PyTorch's DDP (gloo, ``forward_sync_buffers=False``: BatchNorm statistics are averaged by neither,
   trustgrad averages them after the step) on the same batches: the anchor of step time;
2. trustgrad's ``allreduce``: step time / DDP's;
3. trustgrad's ``allreduce --proof record``: (training + finalising the proof) / training without it - 1, the proof's
   size per epoch (bytes / steps x steps per epoch), and the time ``trustgrad verify`` takes / training time;
4. one audit replay (a claim's gradient recomputed, as ``audit.Auditor.replay`` does) / one training step; the cost
   of audits at rates 1, 0.1 and 0.01 follows as rate x that (derived, not measured separately);
5. peak resident memory per process (VmHWM) of every run.

Timings here are at the mercy of a shared machine: they are printed, never asserted (docs/models.md).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..options import OptionParser
from . import BENCHMARKS, BenchResult


def _parse(args: list[str]) -> argparse.Namespace:
    p = OptionParser(prog="trustgrad bench scale", description=__doc__)
    p.add_argument("--model", default="resnet18", help="zoo model (default resnet18; cnn-bn for a quick look)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--k", type=int, default=5, help="steps between proof checkpoints")
    opts = p.parse_args(args)
    for name in ("workers", "steps", "batch_size", "k"):
        if getattr(opts, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(opts, name)}")
    if opts.workers * opts.batch_size * opts.steps > 2048:  # synthetic-cifar's training set, one epoch
        p.error("--workers x --batch-size x --steps must fit one epoch of synthetic-cifar (2048 samples)")
    return opts


def _ddp_rank(ctx: Any, cfg: Any) -> dict[str, float]:
    """One rank of the anchor: the same model, batches and SGD under torch's DistributedDataParallel."""
    from torch.nn.parallel import DistributedDataParallel

    from ..augment import Augment
    from ..data import BatchPlan, load_dataset
    from ..models import build_model, loss_for
    from ..train import peak_rss_bytes

    torch.set_num_threads(cfg.threads)
    ds = load_dataset(cfg.dataset)
    model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, cfg.seed, cfg.model)
    loss_fn = loss_for(model)
    ddp = DistributedDataParallel(model, forward_sync_buffers=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    plan, augment = BatchPlan.for_run(cfg, ds, cfg.workers), Augment(cfg.augment, cfg.seed)
    ddp.train()
    started = time.perf_counter()
    for step in range(cfg.max_steps):
        idx = torch.from_numpy(plan.at(ctx.rank, step))
        opt.zero_grad()
        loss_fn(ddp(augment.apply(ds.x_train[idx], ctx.rank, step)), ds.y_train[idx]).backward()
        opt.step()
    return {"train_seconds": time.perf_counter() - started, "peak_rss_bytes": peak_rss_bytes()}


def _audit_replay_seconds(cfg: Any, repeats: int = 3) -> float:
    """Median seconds of one claim's replay: a replica at W0 recomputing worker 0's gradient of step 0."""
    from ..augment import Augment
    from ..data import BatchPlan, load_dataset
    from ..models import build_model
    from ..replica import Replica, make_optimizer

    ds = load_dataset(cfg.dataset)
    model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, cfg.seed, cfg.model)
    replica = Replica(model, make_optimizer(model, cfg.lr))
    idx = torch.from_numpy(BatchPlan.for_run(cfg, ds, cfg.workers).at(0, 0))
    x = Augment(cfg.augment, cfg.seed).apply(ds.x_train[idx], 0, 0)
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    times = []
    try:
        for _ in range(repeats):
            started = time.perf_counter()
            replica.compute_gradients(x, ds.y_train[idx])
            times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(before)
    return sorted(times)[len(times) // 2]


def _peak(ranks: list[Any]) -> int:
    return max((r.get("peak_rss_bytes", 0) for r in ranks if r), default=0)


@BENCHMARKS.register("scale")
def run_bench(args: list[str]) -> BenchResult:
    from ..config import RunConfig
    from ..launch import spawn
    from ..proof import VerifyOptions, verify
    from ..run import run

    opts = _parse(args)
    base = RunConfig().replace(
        workers=opts.workers,
        dataset="synthetic-cifar",
        augment="crop-flip",
        model={"name": opts.model},
        batch_size=opts.batch_size,
        max_steps=opts.steps,
        epochs=1,
        lr=0.05,
        progress=False,
        proof={"k": opts.k},
    )
    ddp = spawn(_ddp_rank, opts.workers, (base,), timeout=base.timeout)
    ddp_step = max(r["train_seconds"] for r in ddp) / opts.steps
    with tempfile.TemporaryDirectory(prefix="tg-bench-scale-") as tmp:
        plain = run(base.replace(out=str(Path(tmp) / "plain")))
        rec = run(base.replace(out=str(Path(tmp) / "rec"), proof={"mode": "record"}))
        proof_dir = Path(tmp) / "rec" / "proof"
        verdict = verify(proof_dir, VerifyOptions(threads=base.threads))
        proof_bytes = sum(f.stat().st_size for f in proof_dir.rglob("*") if f.is_file())
    steps = plain.summary["steps"]
    step = plain.summary["train_seconds"] / steps
    recorded = rec.summary["train_seconds"] + rec.summary.get("proof_finalize_seconds", 0.0)
    overhead = recorded / plain.summary["train_seconds"] - 1.0
    per_epoch = proof_bytes / steps * (2048 // (opts.workers * opts.batch_size))
    replay = _audit_replay_seconds(base)
    data = {
        "model": opts.model,
        "num_params": plain.summary["num_params"],
        "workers": opts.workers,
        "steps": steps,
        "ddp_step_seconds": ddp_step,
        "allreduce_step_seconds": step,
        "allreduce_vs_ddp": step / ddp_step,
        "proof_overhead": overhead,
        "proof_bytes": proof_bytes,
        "proof_bytes_per_epoch": per_epoch,
        "verify_seconds": verdict.seconds,
        "verify_vs_training": verdict.seconds / plain.summary["train_seconds"],
        "proof_valid": verdict.valid,
        "audit_replay_seconds": replay,
        "audit_replay_vs_step": replay / step,
        "peak_rss_bytes": {"ddp": _peak(ddp), "allreduce": _peak(plain.ranks), "proof": _peak(rec.ranks)},
    }
    table = "\n".join(
        [
            f"scale bench: {opts.model} ({data['num_params']:,} parameters) on synthetic-cifar, crop-flip, allreduce "
            f"x{opts.workers}, batch {opts.batch_size} per worker, {steps} steps",
            "| measure | value | anchor |",
            "|---|---|---|",
            f"| DDP step (s) | {ddp_step:.3f} | anchor |",
            f"| allreduce step (s) | {step:.3f} | {step / ddp_step:.2f}x DDP (target <= 1.0x) |",
            f"| proof recording overhead (k={opts.k}) | {overhead:+.1%} | training without (target <= 5%) |",
            f"| proof size per epoch (MB) | {per_epoch / 1e6:.1f} | {proof_bytes / 1e6:.1f} MB for {steps} steps |",
            f"| verify (s), verdict | {verdict.seconds:.1f}, {'valid' if verdict.valid else 'INVALID'} | "
            f"{data['verify_vs_training']:.2f}x training |",
            f"| audit replay of one claim (s) | {replay:.3f} | {replay / step:.2f}x a step |",
            "| audits at rate 1 / 0.1 / 0.01 (derived) | "
            + " / ".join(f"{r * replay / step:.3f}x" for r in (1, 0.1, 0.01))
            + " | a step, per claim |",
            "| peak memory per process (MB): DDP / allreduce / with proof | "
            + " / ".join(f"{v / 2**20:.0f}" for v in data["peak_rss_bytes"].values())
            + " | |",
        ]
    )
    passed = data["allreduce_vs_ddp"] <= 1.0 and overhead <= 0.05 and verdict.valid
    return BenchResult("scale", table, data, passed)
