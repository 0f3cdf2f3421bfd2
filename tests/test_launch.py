"""The launcher fails fast with the failing rank's traceback and never leaves a child behind."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from trustgrad.errors import LaunchError
from trustgrad.launch import spawn


def _rank1_raises(ctx):
    if ctx.rank == 1:
        raise RuntimeError("boom on purpose")
    t = torch.zeros(1)
    dist.all_reduce(t)  # rank 0 would wait here forever without the launcher's fail-fast
    return ctx.rank


def _rank1_dies(ctx):
    if ctx.rank == 1:
        os._exit(9)
    time.sleep(2)
    return ctx.rank


def _sum_ranks(ctx):
    t = torch.tensor([float(ctx.rank)])
    dist.all_reduce(t)
    return {"sum": t}


def test_results_come_back_per_rank_with_tensors_as_arrays():
    out = spawn(_sum_ranks, 3, timeout=30, job_timeout=120)
    assert [float(o["sum"][0]) for o in out] == [3.0, 3.0, 3.0]


def test_a_raising_rank_fails_the_job_fast_with_its_traceback():
    started = time.monotonic()
    with pytest.raises(LaunchError, match="rank 1 failed: RuntimeError: boom on purpose") as info:
        spawn(_rank1_raises, 2, timeout=60, job_timeout=120)
    assert "_rank1_raises" in info.value.remote_traceback
    assert time.monotonic() - started < 45  # not the 60 s collective timeout


def test_a_dead_rank_fails_the_job_unless_it_may_die():
    with pytest.raises(LaunchError, match="rank 1 died \\(exit code 9\\)"):
        spawn(_rank1_dies, 2, timeout=30, job_timeout=120)
    out = spawn(_rank1_dies, 2, timeout=30, job_timeout=120, may_die=lambda rank: rank == 1)
    assert out == [0, None]
