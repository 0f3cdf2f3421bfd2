"""``trustgrad bench pipeline``: per-step time of GPipe vs 1F1B and each stage's measured bubble vs (S-1)/(M+S-1).

Method: S ranks run an MLP cut into S balanced stages on one fixed mini-batch. Each stage's busy time is the wall
time spent inside its per-micro-batch forward and backward compute (``PipelineStage.forward_one_chunk`` and
``backward_one_chunk`` wrapped with timers; sends and receive-waits fall outside). A step is timed on every rank from
a barrier to the end of its schedule; the measured idle fraction of a stage is 1 - busy / step time, averaged over the
timed steps. The theory assumes equal stages and free communication: the last stage also computes the loss, and
messages cost time, so measured idle differs from theory by that much (the table shows both).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from ..config import ModelConfig
from ..errors import ConfigError
from ..launch import RankContext, spawn
from ..models import build_model
from ..options import OptionParser
from ..parallel.pipeline import SCHEDULES, Pipeline, StageTimer, theoretical_bubble
from ..parallel.split import balanced_split, split_model
from . import BENCHMARKS, BenchResult


def _parse(argv: list[str]) -> argparse.Namespace:
    p = OptionParser(prog="trustgrad bench pipeline", description=__doc__.split("\n")[0])
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512, help="mlp width (wide enough that compute is measurable)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="timed steps per schedule (after 2 warm-up steps)")
    p.add_argument("--schedules", default="gpipe,1f1b")
    args = p.parse_args(argv)
    if args.stages < 2 or args.microbatches < 1 or args.batch_size % args.microbatches or args.steps < 1:
        raise ConfigError("need --stages >= 2, --steps >= 1 and --microbatches dividing --batch-size")
    for name in args.schedules.split(","):
        SCHEDULES.get(name)
    return args


def _model(args: argparse.Namespace) -> torch.nn.Sequential:
    return build_model("mlp", (1, 8, 8), 10, seed=0, config=ModelConfig(hidden=args.hidden, depth=args.depth))


def _rank(ctx: RankContext, args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(args.batch_size, 1, 8, 8, generator=g), torch.randint(0, 10, (args.batch_size,), generator=g)
    out = {}
    for schedule in args.schedules.split(","):
        model = _model(args)
        stage = split_model(model, balanced_split(model, args.stages))[ctx.rank]
        timer = StageTimer()
        pipe = Pipeline(stage, ctx.rank, args.stages, args.microbatches, schedule, timer=timer)
        steps, idle, busy = [], [], []
        for i in range(2 + args.steps):
            stage.zero_grad(set_to_none=False)
            dist.barrier()
            busy0, start = timer.busy, time.perf_counter()
            pipe.step(x, y)
            took = time.perf_counter() - start
            if i >= 2:
                steps.append(took)
                busy.append(timer.busy - busy0)
                idle.append(1.0 - busy[-1] / took)
        n = len(steps)
        out[schedule] = {"step_s": sum(steps) / n, "idle": sum(idle) / n, "busy_s": sum(busy) / n}
    return out


@BENCHMARKS.register("pipeline")
def bench_pipeline(argv: list[str]) -> BenchResult:
    args = _parse(argv)
    model = _model(args)
    balanced_split(model, args.stages)  # more stages than layers: ConfigError before any process starts
    ranks = spawn(_rank, args.stages, (args,), timeout=120, job_timeout=600)
    theory = theoretical_bubble(args.stages, args.microbatches)
    schedules = args.schedules.split(",")
    base = max(r[schedules[0]]["step_s"] for r in ranks)
    lines = [
        f"pipeline: mlp hidden {args.hidden} depth {args.depth}, batch {args.batch_size}, "
        f"S={args.stages} stages, M={args.microbatches} micro-batches, {args.steps} timed steps",
        "",
        "| schedule | step ms | vs "
        + schedules[0]
        + " | "
        + " | ".join(f"idle stage {s}" for s in range(args.stages))
        + " | theory (S-1)/(M+S-1) |",
        "|---|---|---|" + "---|" * args.stages + "---|",
    ]
    data = {"stages": args.stages, "microbatches": args.microbatches, "theoretical_bubble": theory, "schedules": {}}
    for name in schedules:
        step = max(r[name]["step_s"] for r in ranks)  # a step ends when the slowest stage does
        idle = [r[name]["idle"] for r in ranks]
        busy = [r[name]["busy_s"] * 1e3 for r in ranks]
        data["schedules"][name] = {"step_ms": step * 1e3, "idle_per_stage": idle, "busy_ms_per_stage": busy}
        lines.append(
            f"| {name} | {step * 1e3:.2f} | {step / base:.2f}x | "
            + " | ".join(f"{v:.3f} ({b:.1f} ms busy)" for v, b in zip(idle, busy))
            + f" | {theory:.3f} |"
        )
    lines += [
        "",
        "idle = 1 - busy/step, busy = time inside the stage's forward_one_chunk + backward_one_chunk (timers wrapped "
        "around them); step = barrier to end of schedule.step on that rank. Theory assumes equal stages and free "
        "messages; the last stage also computes the loss.",
    ]
    return BenchResult("pipeline", "\n".join(lines), data)
