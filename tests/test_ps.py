"""Parameter server (``ps``): sync equals allreduce, SSP's staleness bound, lost workers, resume, bad input.

Every run here is a real multi-process job (server rank 0 + workers over gloo); no communication is mocked.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time

import pytest
import torch

from trustgrad.cli import main
from trustgrad.config import RunConfig
from trustgrad.errors import ConfigError, LaunchError
from trustgrad.patterns.ps import ParameterServer, Straggler
from trustgrad.patterns.ps.checkpoint import ServerCheckpoint, checkpoint_path
from trustgrad.patterns.ps.schedules import schedule_for
from trustgrad.run import run


def _cfg(workers: int = 2, steps: int = 24, **pattern) -> RunConfig:
    base = RunConfig(workers=workers, max_steps=steps, batch_size=16, lr=0.05, seed=3, progress=False, timeout=60)
    return base.replace(pattern={"name": "ps", **pattern})


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_sync_ps_equals_allreduce_and_resume_continues_exactly(tmp_path):
    """Sync PS for 12 steps, checkpointed, then resumed to 24: both halves run by the server, the whole trajectory
    must be allreduce's (every version the mean of W gradients on the previous one; momentum restored exactly)."""
    reference = run(_cfg().replace(pattern={"name": "allreduce"}))
    first = tmp_path / "first"
    half = run(_cfg(steps=12, schedule="sync", checkpoint_every=6).replace(out=str(first)))
    assert checkpoint_path(first).is_file()
    assert half.summary["steps"] == 12 and half.summary["gradients_applied"] == 24
    resumed = run(_cfg(schedule="sync").replace(resume=str(first), out=str(tmp_path / "second")))
    assert resumed.summary["resumed_at_version"] == 12
    assert resumed.summary["steps"] == 24 and resumed.summary["model_versions"] == 24
    assert resumed.summary["gradients_applied"] == 24  # only the 2 x 12 new ones
    for s in (half.summary, resumed.summary):
        assert s["max_staleness"] == 0 and s["max_update_lag"] == 0
    _assert_same_weights(resumed.state, reference.state)
    assert resumed.summary["test_accuracy"] == pytest.approx(reference.summary["test_accuracy"])
    # the same weights through the public records: model.safetensors of the resumed run
    from safetensors.torch import load_file

    _assert_same_weights(load_file(str(tmp_path / "second" / "model.safetensors")), reference.state)


def test_ssp_bounds_staleness_that_async_does_not():
    # worker rank 1 is a persistent straggler (4x slower): async lets the others run far ahead of it
    slow = "rank=1,prob=1,slowdown=4,step-ms=15"
    ssp = run(_cfg(steps=16, schedule="ssp", staleness=1, straggler=slow))
    asyn = run(_cfg(steps=16, schedule="async", straggler=slow))
    assert ssp.summary["max_staleness"] <= 1
    assert ssp.summary["max_staleness"] == 1  # the bound is reached: the fast workers did wait at it
    assert asyn.summary["max_staleness"] > 3, asyn.summary["max_staleness"]
    for s in (ssp.summary, asyn.summary):
        assert s["gradients_applied"] == 32 and s["model_versions"] == 32 and s["dropped_workers"] == []


def _kill_when(child_name: str, ready, stop: threading.Event, killed: list) -> None:
    """Test side of fault injection: SIGKILL the named rank process once ``ready()`` holds."""
    while not stop.is_set():
        procs = [p for p in multiprocessing.active_children() if p.name == child_name]
        if procs and ready():
            os.kill(procs[0].pid, signal.SIGKILL)
            killed.append(procs[0].pid)
            return
        time.sleep(0.01)


def _run_killing(cfg: RunConfig, child_name: str, ready):
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_when, args=(child_name, ready, stop, killed), daemon=True)
    killer.start()
    try:
        return run(cfg), killed
    finally:
        stop.set()
        killer.join(5)


def test_async_run_survives_a_killed_worker_and_names_it(tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(steps=40, schedule="async", straggler="rank=1,prob=0,step-ms=20")
    cfg = cfg.replace(out=str(out), pattern={"worker_timeout": 3.0, "checkpoint_every": 5})
    result, killed = _run_killing(cfg, "trustgrad-rank2", lambda: checkpoint_path(out).is_file())
    assert killed, "the worker was never killed"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dropped_workers"] == [1]  # rank 2 = worker 1
    assert 2 in summary["dropped_ranks"]
    assert summary["gradients_applied"] < 2 * 40  # the dead worker's remaining steps never arrived
    assert summary["steps"] == 40  # the survivor finished
    assert summary["final_loss"] < 2.25  # and it kept learning (2.30 at the start)


def test_sync_run_fails_fast_naming_a_killed_worker(tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(workers=2, steps=60, schedule="sync", straggler="rank=1,prob=0,step-ms=20")
    cfg = cfg.replace(out=str(out), pattern={"checkpoint_every": 5})
    started = time.perf_counter()
    with pytest.raises(LaunchError, match="rank 2"):
        _run_killing(cfg, "trustgrad-rank2", lambda: checkpoint_path(out).is_file())
    assert time.perf_counter() - started < 60


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--schedule", "sync", "--staleness", "2"], "--staleness applies to --schedule ssp only"),
        (["--schedule", "ssp", "--staleness", "-1"], "--staleness must be >= 0"),
        (["--schedule", "ssp"], "needs --staleness"),
        (["--schedule", "bogus"], "unknown ps schedule 'bogus' (known: async, ssp, sync)"),
        (["--workers", "1", "--servers", "0"], "at least 2 needed"),
        (["--straggler", "rank=9,prob=0.1"], "rank must be a worker rank"),
        (["--straggler", "rank=1,speed=3"], "expected key=value pairs"),
        (["--checkpoint-every", "5"], "needs --out"),
        (["--resume", "/nonexistent/run"], "no ps-checkpoint.safetensors"),
    ],
)
def test_bad_input_is_one_line_exit_code_2(flags, needle, capsys):
    code = main(["train", "--pattern", "ps", "--no-progress", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("trustgrad: error:"), err
    assert needle in err


def test_straggler_spec_and_ssp_rule():
    s = Straggler.parse("rank=2,prob=0.25,slowdown=6,step-ms=10", workers=3)
    assert (s.ranks, s.prob, s.slowdown, s.step_ms) == ((2,), 0.25, 6.0, 10.0)
    hits = sum(s.straggles(0, 2, step) for step in range(2000))
    assert 400 < hits < 600  # a PRF with the asked-for rate
    assert not any(s.straggles(0, 1, step) for step in range(200))  # other ranks never straggle
    ssp = schedule_for(RunConfig().replace(pattern={"name": "ps", "schedule": "ssp", "staleness": 2}))
    assert ssp.may_proceed(5, 3) and not ssp.may_proceed(6, 3)
    assert ssp.lr_scale(4) == 0.25
    sync = schedule_for(RunConfig().replace(pattern={"name": "ps"}))
    assert sync.may_proceed(3, 3) and not sync.may_proceed(4, 3) and sync.lr_scale(4) == 1.0
    assert ParameterServer.may_lose(RunConfig().replace(pattern={"name": "ps", "schedule": "async"}), 1)
    assert not ParameterServer.may_lose(RunConfig().replace(pattern={"name": "ps", "schedule": "async"}), 0)
    assert not ParameterServer.may_lose(RunConfig().replace(pattern={"name": "ps"}), 1)


def test_checkpoint_rejects_another_run_and_garbage(tmp_path):
    cfg = _cfg()
    ident = ParameterServer.identity(cfg)
    ServerCheckpoint(torch.zeros(10), None, [3, 4], 7, ident).save(tmp_path)
    back = ServerCheckpoint.load(tmp_path, ident, 10)
    assert back.clocks == [3, 4] and back.version == 7 and back.momentum is None
    with pytest.raises(ConfigError, match="another run: seed=3"):
        ServerCheckpoint.load(tmp_path, {**ident, "seed": 4}, 10)
    with pytest.raises(ConfigError, match="wrong dtype or shape"):
        ServerCheckpoint.load(tmp_path, ident, 11)
    other_loss = ParameterServer.identity(cfg.replace(model={"loss": "tests.userzoo:smooth_ce"}))
    with pytest.raises(ConfigError, match="another run: .*loss=tests.userzoo:smooth_ce"):
        ServerCheckpoint.load(tmp_path, other_loss, 10)
    checkpoint_path(tmp_path).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ConfigError, match="not a readable ps checkpoint"):
        ServerCheckpoint.load(tmp_path, ident, 10)


def test_staleness_experiment_writes_table_plot_and_json(tmp_path):
    from trustgrad.experiments import EXPERIMENTS

    out = tmp_path / "exp"
    argv = ["--out", str(out), "--workers", "2", "--epochs", "1", "--staleness", "3", "--step-ms", "5"]
    result = EXPERIMENTS.get("staleness")([*argv, "--target-loss", "2.25"])
    assert [r["schedule"] for r in result.data["rows"]] == ["sync", "ssp(S=3)", "async"]
    assert all(r["gradients_to_target"] is not None for r in result.data["rows"])
    assert {p.name for p in out.iterdir()} == {"results.json", "results.md", "staleness.png"}
    assert "| ssp(S=3) |" in (out / "results.md").read_text()
    with pytest.raises(ConfigError, match="experiment staleness"):
        EXPERIMENTS.get("staleness")(["--bogus"])
