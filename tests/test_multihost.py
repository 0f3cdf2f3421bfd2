"""Across machines under torchrun: two network namespaces joined by a veth pair stand in for two machines.

Each host runs the README's command (``torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint
HOST:29500 --rdzv-id job1 -m trustgrad train ...``) plus what docs/multihost.md says to add where a machine's
hostname does not resolve to its address (here it resolves to 127.0.0.1): ``--rdzv-conf is_host=1`` on the first
machine, ``--local-addr ADDR`` on each, and ``GLOO_SOCKET_IFNAME``. Ranks 0-1 land on host A (node ranks follow the
sorted ``--local-addr``), so the ps server is on A and cutting B's link cuts off workers 1 and 2 (ranks 2 and 3).
Faults: ``ip link set DEV down`` on B for 20 s, then up (packets stop, no connection is reset). Skipped, with the
reason, only where network namespaces cannot be made.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import netns
import pytest
import torch

import trustgrad
from trustgrad.config import RunConfig
from trustgrad.run import run

CUT_SECONDS = 20.0
#: torchrun's start (rendezvous, importing torch in 4 ranks on 2 cores) plus a tiny job, with a loaded machine's margin
JOB_LIMIT = 240.0


@pytest.fixture
def hosts():
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(f"multi-host tests need network namespaces: {reason}")
    with netns.two_hosts() as pair:
        yield pair


@dataclass
class Job:
    procs: list
    logs: list[Path]
    dirs: list[Path]

    def log(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace")

    def wait(self, limit: float = JOB_LIMIT) -> list[int]:
        deadline = time.monotonic() + limit
        try:
            for p in self.procs:
                p.wait(max(1.0, deadline - time.monotonic()))
        except Exception:
            tails = "\n".join(f"--- host {i} ---\n{self.log(i)[-3000:]}" for i in range(2))
            raise AssertionError(f"the job did not end within {limit:.0f} s\n{tails}") from None
        return [p.returncode for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            netns.stop(p)


def launch(hosts, tmp_path: Path, args: list[str], verbose: bool = True) -> Job:
    """The README's torchrun command on both hosts (``-v``: the coordinator's progress lines time the cut; without
    it, as a user runs it, an error is one line and nothing else)."""
    job = Job([], [], [])
    first = hosts[0]
    for i, host in enumerate(hosts):
        folder = tmp_path / f"host{i}"
        folder.mkdir()
        extra = ["--rdzv-conf", "is_host=1"] if i == 0 else []
        argv = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{first.addr}:29500", "--rdzv-id", "job1", *extra,
            "--local-addr", host.addr, "-m", "trustgrad", *(["-v"] if verbose else []), "train", *args,
            "--out", "runs/job", "--no-progress",
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": host.dev}
        job.logs.append(folder / "log.txt")
        job.dirs.append(folder / "runs" / "job")
        job.procs.append(host.run(argv, env, str(folder), str(job.logs[-1])))
        if i == 0:  # B's agent gives up on a store that is not listening within 60 s: start A's first
            _wait_listening(first, 29500, job)
    return job


def _wait_listening(host, port: int, job: Job, limit: float = JOB_LIMIT) -> None:
    import subprocess

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and job.procs[0].poll() is None:
        ss = subprocess.run(["ip", "netns", "exec", host.ns, "ss", "-Hltn", f"sport = :{port}"], capture_output=True)
        if ss.stdout.strip():
            return
        time.sleep(0.2)
    raise AssertionError(f"host A's rendezvous store never listened on {port}:\n{job.log(0)[-3000:]}")


def wait_for(job: Job, host: int, needle: str, limit: float = JOB_LIMIT, ready=None) -> None:
    deadline = time.monotonic() + limit
    while not (ready() if ready else needle in job.log(host)):
        if time.monotonic() > deadline or any(p.poll() is not None for p in job.procs):
            tails = "\n".join(f"--- host {i} ---\n{job.log(i)[-2000:]}" for i in range(len(job.logs)))
            raise AssertionError(f"{needle!r} never appeared on host {host}:\n{tails}")
        time.sleep(0.1)


def cut(job: Job, host, watch: str | None = None) -> dict[int, float]:
    """Host B's link down for CUT_SECONDS, then up; returns, per host, the seconds after the cut at which ``watch``
    first appeared in its log (polled while the link is down)."""
    seen: dict[int, float] = {}
    host.link(up=False)
    started = time.monotonic()
    try:
        while time.monotonic() - started < CUT_SECONDS:
            for i in range(2):
                if watch and i not in seen and watch in job.log(i):
                    seen[i] = time.monotonic() - started
            time.sleep(0.1)
    finally:
        host.link(up=True)
    return seen


def _no_trustgrad_traceback(text: str) -> None:
    """No frame of trustgrad's own code in the output (torchrun's agent prints its own ChildFailedError report)."""
    package = os.path.dirname(trustgrad.__file__)
    frames = [line for line in text.splitlines() if f'File "{package}/' in line]
    assert not frames, frames[:5]


def test_readme_command_on_two_hosts_matches_a_local_run(hosts, tmp_path):
    args = ["--pattern", "ring", "--workers", "4", "--epochs", "2", "--max-steps", "15", "--seed", "5"]
    job = launch(hosts, tmp_path, args)
    try:
        assert job.wait() == [0, 0], job.log(0)[-3000:] + job.log(1)[-3000:]
    finally:
        job.stop()
    assert (job.dirs[0] / "summary.json").is_file() and not job.dirs[1].exists()  # the coordinator is on host A
    summary = json.loads((job.dirs[0] / "summary.json").read_text())
    local = run(RunConfig(workers=4, epochs=2, max_steps=15, seed=5, progress=False).replace(pattern={"name": "ring"}))
    from safetensors.torch import load_file

    remote = load_file(str(job.dirs[0] / "model.safetensors"))
    assert remote.keys() == local.state.keys()
    for name, tensor in remote.items():  # tolerance 0: the same sums in the same order, across hosts or not
        torch.testing.assert_close(tensor, local.state[name], atol=0, rtol=0)
    assert summary["final_loss"] == local.summary["final_loss"] and summary["steps"] == 15


@pytest.mark.parametrize("schedule", [["--schedule", "async"], ["--schedule", "ssp", "--staleness", "2"]])
def test_ps_survives_a_cut_of_the_other_hosts_link(hosts, tmp_path, schedule):
    # --hidden 256: a 336 KB model, larger than a socket buffer, so a reply to a cut-off worker is likely to be in
    # flight when the link goes down (a blocking send there once held the whole server for the cut)
    args = [
        "--pattern",
        "ps",
        *schedule,
        "--workers",
        "3",
        "--worker-timeout",
        "5",
        "--timeout",
        "60",
        "--hidden",
        "256",
    ]
    job = launch(hosts, tmp_path, [*args, "--epochs", "30"])
    try:
        wait_for(job, 0, "ps epoch 0")
        cut(job, hosts[1])
        codes = job.wait()
    finally:
        job.stop()
    a, b = job.log(0), job.log(1)
    assert codes == [0, 0], a[-3000:] + b[-3000:]
    summary = json.loads((job.dirs[0] / "summary.json").read_text())
    assert summary["dropped_workers"] == [1, 2], summary  # the cut-off ones, named ...
    assert summary["dropped_ranks"] == [2, 3] and set(summary["dropped_reasons"]) == {"1", "2"}
    assert "dropping worker 0" not in a  # ... and the healthy one on the server's host never
    assert summary["steps"] == 30 * 14  # it trained to the end
    assert summary["final_loss"] < 1.0, summary["final_loss"]  # and learned (2.30 at the start)
    assert all((job.dirs[0] / f).is_file() for f in ("config.json", "metrics.jsonl", "model.safetensors"))
    for worker in (1, 2):  # host B's workers learned they were on their own, and ended normally
        assert re.search(rf"(the server dropped|lost the server).* worker {worker}|worker {worker} lost the server", b)
    _no_trustgrad_traceback(a + b)


def test_ring_fails_fast_with_one_line_on_both_hosts(hosts, tmp_path):
    timeout = 10
    # no -v: what a user sees; the proof's first checkpoint on host A says training is under way
    args = ["--pattern", "ring", "--workers", "4", "--timeout", str(timeout), "--epochs", "300", "--proof", "record"]
    job = launch(hosts, tmp_path, args, verbose=False)
    proof = job.dirs[0] / "proof"
    try:
        wait_for(job, 0, "a proof checkpoint", ready=lambda: proof.is_dir() and any(proof.iterdir()))
        seen = cut(job, hosts[1], watch="trustgrad: error: rank ")
        codes = job.wait(limit=60)
    finally:
        job.stop()
    a, b = job.log(0), job.log(1)
    assert codes[0] != 0 and codes[1] != 0
    # every host's ranks fail within --timeout plus a few seconds of the cut, each with one line naming the rank,
    # the peer it waited on and the timeout
    assert set(seen) == {0, 1} and max(seen.values()) < timeout + 8, seen
    for text, ranks in ((a, (0, 1)), (b, (2, 3))):
        lines = [line for line in text.splitlines() if line.startswith("trustgrad: error: ")]
        assert lines, text[-3000:]
        for line in lines:
            m = re.match(rf"trustgrad: error: rank (\d): .*rank \d.*--timeout {timeout} s", line)
            assert m and int(m.group(1)) in ranks, line
    _no_trustgrad_traceback(a + b)


def test_gossip_reports_a_cut_of_the_other_hosts_link(hosts, tmp_path):
    """Ring topology 0-1-2-3-0, ranks 0-1 on A: the cut severs 1-2 and 3-0. Each side loses the other after --timeout
    and trains on as its own pair; the coordinator's records name the partition and count the replicas connected to
    it. --min-replicas 2 accepts the two of A (the default, a majority of 3, fails the run: docs/faults.md)."""
    timeout = 10  # a healthy neighbour waits at most --peer-timeout per round: far from being taken for lost
    args = ["--pattern", "gossip", "--workers", "4", "--peer-timeout", "2", "--timeout", str(timeout)]
    job = launch(hosts, tmp_path, [*args, "--min-replicas", "2", "--epochs", "150"])
    try:
        wait_for(job, 0, "epoch 0:")
        cut(job, hosts[1])
        codes = job.wait()
    finally:
        job.stop()
    a, b = job.log(0), job.log(1)
    assert codes == [0, 0], a[-3000:] + b[-3000:]
    summary = json.loads((job.dirs[0] / "summary.json").read_text())
    assert summary["replicas_final"] == 2 and summary["replica_ranks_final"] == [0, 1], summary
    assert summary["dropped_ranks"] == [2, 3] and summary["peers_lost"] == [2, 3], summary
    lost = {e["rank"]: e for e in summary["replicas_lost"]}
    assert sorted(lost) == [2, 3] and not any(e["died"] for e in lost.values()), lost  # alive, cut off
    assert all(e["reason"] == f"silent for {timeout} s (--timeout)" for e in lost.values()), lost
    assert re.search(r"replicas: 2 of 4 trained to the end \(lost: rank 2 at step \d+, rank 3 at step \d+\)", a)
    assert not re.search(r"rank [01]: peer [01] lost", a)  # the healthy neighbour on the same host: never lost
    for rank, peer in ((0, 3), (1, 2)):  # each side names the partition, the cut-off host too
        assert f"rank {rank}: peer {peer} lost" in a
    for rank, peer in ((2, 1), (3, 0)):
        assert f"rank {rank}: peer {peer} lost" in b
    assert summary["steps"] == 150 * 11 and summary["test_accuracy"] > 0.8, summary  # A's pair trained to the end
    assert all((job.dirs[0] / f).is_file() for f in ("config.json", "metrics.jsonl", "model.safetensors"))
    _no_trustgrad_traceback(a + b)
