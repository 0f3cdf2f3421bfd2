"""trustgrad's ``allreduce`` step against PyTorch DDP's, each in its own pair of processes, nothing else around them.

``bench scale`` times allreduce through the whole runner (``trustgrad.run``); this isolates the step: the same
ResNet-18, batches, crop-flip augmentation and SGD, ``STEPS`` steps per run, rounds alternating which goes first.
Prints each kind's wall seconds per run (the slower rank) and CPU seconds (every thread of both ranks).

    OMP_NUM_THREADS=1 python tools/ddp_step_ab.py [ROUNDS]
"""

from __future__ import annotations

import sys
import time

import torch

from trustgrad.launch import spawn

STEPS = 20


def _rank(ctx, steps: int, kind: str) -> tuple[float, float]:  # noqa: ANN001
    from torch.nn.parallel import DistributedDataParallel

    from trustgrad.augment import Augment
    from trustgrad.comm import Comm
    from trustgrad.config import RunConfig
    from trustgrad.data import BatchPlan, load_dataset
    from trustgrad.models import build_model, loss_for
    from trustgrad.patterns.allreduce import AllReduce
    from trustgrad.replica import Replica, optimizer_for

    torch.set_num_threads(1)
    cfg = RunConfig().replace(
        workers=2, dataset="synthetic-cifar", augment="crop-flip", model={"name": "resnet18"}, batch_size=8, lr=0.05
    )
    ds = load_dataset(cfg.dataset)
    model = build_model("resnet18", ds.input_shape, ds.num_classes, 0, cfg.model)
    if kind == "ddp":
        ddp, loss_fn = DistributedDataParallel(model, forward_sync_buffers=False), loss_for(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    else:
        pattern, replica = AllReduce(cfg, Comm(ctx, cfg.timeout)), Replica(model, optimizer_for(model, cfg))
        pattern.attach(replica)
    plan, augment = BatchPlan.for_run(cfg, ds, 2), Augment(cfg.augment, cfg.seed)
    wall, cpu = time.perf_counter(), time.process_time()
    for step in range(steps):
        idx = torch.from_numpy(plan.at(ctx.rank, step))
        x, y = augment.apply(ds.x_train[idx], ctx.rank, step), ds.y_train[idx]
        if kind == "ddp":
            opt.zero_grad()
            loss_fn(ddp(x), y).backward()
            opt.step()
        else:
            pattern.step(replica, x, y)
    return time.perf_counter() - wall, time.process_time() - cpu


def main(rounds: int) -> None:
    runs: dict[str, list[tuple[float, float]]] = {"ddp": [], "allreduce": []}
    for r in range(rounds):
        for kind in ("ddp", "allreduce") if r % 2 == 0 else ("allreduce", "ddp"):
            ranks = spawn(_rank, 2, (STEPS, kind), timeout=600)
            runs[kind].append((max(w for w, _ in ranks), sum(c for _, c in ranks)))
    for kind, got in runs.items():
        print(kind, "wall", [round(w, 2) for w, _ in got], "cpu", [round(c, 2) for _, c in got])
    wall = sum(w for w, _ in runs["allreduce"]) / sum(w for w, _ in runs["ddp"])
    cpu = sum(c for _, c in runs["allreduce"]) / sum(c for _, c in runs["ddp"])
    print(f"allreduce / DDP over {rounds} rounds: {wall:.3f}x wall, {cpu:.3f}x CPU")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 6)
