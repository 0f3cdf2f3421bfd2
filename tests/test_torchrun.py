"""The same entry point joins a torchrun job (two agents on this machine = two 'nodes') and matches a local spawn."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from trustgrad.config import RunConfig
from trustgrad.run import run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_torchrun_job_matches_local_spawn(tmp_path):
    port = _free_port()
    args = ["--workers", "2", "--epochs", "1", "--max-steps", "15", "--pattern", "ring", "--seed", "5", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
             "--rdzv-id", f"test{port}", "-m", "trustgrad", "train", *args, "--out", str(tmp_path / f"n{node}")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
        )
        for node in range(2)
    ]  # fmt: skip
    outputs = []
    try:
        for agent in agents:
            out, err = agent.communicate(timeout=180)
            assert agent.returncode == 0, err[-3000:]
            outputs.append(out)
    finally:
        for agent in agents:
            agent.kill()
    summaries = [json.loads(o.strip().splitlines()[-1]) for o in outputs if o.strip()]
    assert len(summaries) == 1  # only the coordinating rank reports
    local = run(RunConfig(workers=2, epochs=1, max_steps=15, seed=5, progress=False).replace(pattern={"name": "ring"}))
    assert summaries[0]["steps"] == 15
    assert abs(summaries[0]["final_loss"] - local.summary["final_loss"]) < 1e-6


def _store():
    from datetime import timedelta

    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False)


def test_coordinator_collects_reports_without_waiting_on_a_missing_rank():
    """Ranks 1 and 3 report, rank 2 never does and rank 4's key holds a forgery: the coordinator gets 1 and 3 at
    once, gives up on 2 at its deadline (not the job's timeout) and refuses 4's report with its reason."""
    import time

    from trustgrad.reports import collect, publish

    store = _store()
    for rank in (1, 3):
        assert publish(store, rank, {"rank": rank, "steps": 7, "bytes_sent": 10 * rank, "stats": {"x": rank}})
    store.set("trustgrad/report/4", b'{"rank": 4, "coordinator": true}')
    own = {"rank": 0, "coordinator": True, "steps": 7, "bytes_sent": 1}
    started = time.monotonic()
    ranks, refused = collect(store, 5, own, lambda r: 1.0)
    assert time.monotonic() - started < 5  # one missing rank costs its own deadline only
    assert ranks[0] is own and ranks[2] is None and ranks[4] is None
    assert ranks[1]["bytes_sent"] == 10 and ranks[3]["stats"] == {"x": 3}
    assert list(refused) == [4] and "claims to be the coordinator" in refused[4]


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b'{"rank": 3}', "names rank '3'"),
        (b'{"rank": true}', "names rank"),
        (b"[1, 2]", "not an object"),
        (b'{"rank": 2, "bytes_sent": -5}', "bytes_sent = '-5'"),
        (b'{"rank": 2, "steps": 1.5}', "steps"),
        (b'{"rank": 2, "stats": [1]}', "stats that are not an object"),
        (b"\x80\x04\x95pickle", "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON (RecursionError)"),
        (b" " * (8 << 20) + b"{}", "limit"),
    ],
)
def test_a_malformed_report_is_refused_in_one_line(raw, needle):
    from trustgrad.errors import LaunchError
    from trustgrad.reports import decode_report

    with pytest.raises(LaunchError, match=re.escape(needle)) as info:
        decode_report(raw, 2)
    assert "\n" not in str(info.value) and "rank 2" in str(info.value)


def test_report_round_trip_keeps_nan_and_numpy_values():
    import math

    import numpy as np

    from trustgrad.reports import decode_report, encode_report

    result = {"rank": 1, "steps": np.int64(3), "bytes_sent": 9, "stats": {"trace": np.arange(3.0), "loss": math.nan}}
    body = decode_report(encode_report({**result, "state": {"w": np.zeros(2)}}), 1)
    assert body["steps"] == 3 and body["stats"]["trace"] == [0.0, 1.0, 2.0] and math.isnan(body["stats"]["loss"])
    assert "state" not in body  # the model stays with its rank


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ([1, 0, 0, float("nan"), 0], "nbytes is nan"),
        ([1, float("inf"), 0, 8, 0], "step is inf"),
        ([1, 0.5, 0, 8, 0], "step is 0.5"),
        ([1, 0, -1, 8, 0], "version is -1"),
        ([9, 0, 0, 8, 0], "unknown message kind 9"),
        ([1, 0, 0, 0, 0], "gradient of 0 bytes"),
        ([1, 0, 0, 2**40, 0], "1..4096 allowed"),
        ([1, 0, 0, 8], "4 fields"),
    ],
)
def test_a_malformed_push_header_is_refused_before_any_allocation(values, needle):
    from trustgrad.errors import LaunchError
    from trustgrad.patterns.ps.protocol import GRADIENT, parse_push_header

    with pytest.raises(LaunchError, match=re.escape(needle)):
        parse_push_header([float(v) for v in values], 3, 4096)
    assert parse_push_header([GRADIENT, 4, 2, 8, float("nan")], 3, 4096)[:4] == (GRADIENT, 4, 2, 8)


def _fail_waiting(ctx, peer_lingers: bool):
    """Rank 0 waits on rank 1, which sends nothing: it lingers past the timeout, or leaves at once (closing)."""
    import time

    import torch

    from trustgrad.comm import Comm
    from trustgrad.launch import describe_failure

    if ctx.rank == 1:
        time.sleep(3.0 if peer_lingers else 0.0)
        return None
    try:
        Comm(ctx, timeout=1.0).recv(torch.zeros(1), 1)
    except RuntimeError as exc:
        return describe_failure(exc, 0, 1.0)
    return "no failure"


@pytest.mark.parametrize(
    ("peer_lingers", "expected"),
    [
        (True, "rank 0: waiting for rank 1 timed out after --timeout 1 s: Timed out waiting 1000ms for recv"),
        (False, "rank 0: the connection with rank 1 broke"),
    ],
)
def test_engine_failures_are_one_line_naming_rank_peer_and_timeout(peer_lingers, expected):
    """Real gloo failures (a silent peer; a peer that left): one line naming the rank, the peer and the timeout,
    without gloo's source location or advice."""
    from harness import run_ranks

    line = run_ranks(_fail_waiting, 2, peer_lingers, timeout=5.0)[0]
    assert line.startswith(expected) and "\n" not in line and ".cc:" not in line and "GLHF" not in line, line
