"""``trustgrad bench allreduce``: our ring all-reduce against the engine's, and the engine against memcpy.

Measured in one run on this machine: for each world size and message size, the median time of ``dist.all_reduce``
(the anchor) and of ``ring_all_reduce`` on the same float32 tensor, their ratio (target: ring <= 1.3x), and the
built-in's bus bandwidth as nccl-tests defines it (``size * 2 (W-1) / W / time``) over the memcpy bandwidth of a
numpy copy of the largest size, measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from ..comm import Comm
from ..launch import RankContext, spawn
from ..options import OptionParser
from ..patterns.ring import ring_all_reduce
from . import BENCHMARKS, BenchResult

TARGET_RATIO = 1.3


def _time(fn, reps: int) -> float:
    fn()  # warm-up: connections, allocations
    samples = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    # every rank's time counts: the collective is done when the slowest rank is
    worst = torch.tensor(samples, dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return statistics.median(worst.tolist())


def _measure(ctx: RankContext, sizes_mb: list[float], reps: int, segment_kb: int) -> list[dict]:
    torch.set_num_threads(1)
    comm = Comm(ctx, timeout=600)
    rows = []
    for mb in sizes_mb:
        n = int(mb * 1e6) // 4
        buf = torch.randn(n)  # values grow with every repetition; only the time matters here
        builtin = _time(partial(dist.all_reduce, buf), reps)
        ring = _time(partial(ring_all_reduce, comm, buf, segment_kb * 1024), reps)
        rows.append({"world": ctx.world_size, "mb": mb, "builtin_s": builtin, "ring_s": ring})
        del buf
    return rows


def memcpy_bandwidth(mb: float, reps: int = 5) -> float:
    """Bytes/s of a numpy copy of ``mb`` megabytes (best of ``reps``)."""
    src = np.ones(int(mb * 1e6) // 4, dtype=np.float32)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(reps))
    return src.nbytes / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@BENCHMARKS.register("allreduce")
def run(argv: list[str]) -> BenchResult:
    parser = OptionParser(prog="trustgrad bench allreduce")
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[4, 40, 400])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--segment-kb", type=int, default=1024)
    args = parser.parse_args(argv)

    memcpy = memcpy_bandwidth(max(args.sizes_mb))
    rows = []
    for world in args.worlds:
        per_rank = spawn(_measure, world, (args.sizes_mb, args.reps, args.segment_kb), timeout=600, job_timeout=3600)
        rows += per_rank[0]
    lines = [
        f"memcpy bandwidth (numpy copy of {max(args.sizes_mb):g} MB): {memcpy / 1e9:.2f} GB/s",
        "",
        "| world | size MB | built-in ms | ring ms | ring / built-in | built-in bus GB/s | bus / memcpy |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        w = r["world"]
        r["ratio"] = r["ring_s"] / r["builtin_s"]
        r["bus_bandwidth"] = r["mb"] * 1e6 * 2 * (w - 1) / w / r["builtin_s"]
        r["bus_over_memcpy"] = r["bus_bandwidth"] / memcpy
        lines.append(
            f"| {w} | {r['mb']:g} | {r['builtin_s'] * 1e3:.1f} | {r['ring_s'] * 1e3:.1f} | {r['ratio']:.2f}x"
            f" | {r['bus_bandwidth'] / 1e9:.2f} | {r['bus_over_memcpy']:.1%} |"
        )
    passed = all(r["ratio"] <= TARGET_RATIO for r in rows)
    worst = max(r["ratio"] for r in rows)
    lines += [
        "",
        f"target ring <= {TARGET_RATIO}x the built-in at every size: "
        f"{'met' if passed else 'NOT met'} (worst {worst:.2f}x)",
    ]
    return BenchResult("allreduce", "\n".join(lines), {"memcpy_bandwidth": memcpy, "rows": rows}, passed)
