"""The same entry point joins a torchrun job (two agents on this machine = two 'nodes') and matches a local spawn."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

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
