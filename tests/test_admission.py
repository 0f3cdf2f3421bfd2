"""Machine-wide memory admission (issue 14: ``make test`` beside ``make demo``; docs/limits.md, "Admission").

A real second process holds a reservation in the ledger, as a running job's launcher does; the machine's memory is
fixed in the test so the figures are exact. No timing is asserted: waits are bounded by events and generous limits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from trustgrad.admission import ENV_DIR, ENV_WAIT, reserve
from trustgrad.errors import ConfigError
from trustgrad.machine import Machine

GB = 1 << 30
MACHINE = Machine(cores=2, memory_available=10 * GB, memory_source="fixed")  # a budget of 8 GB

HOLDER = """
import sys, time
from pathlib import Path
from trustgrad.admission import reserve
from trustgrad.machine import Machine
with reserve(int(sys.argv[1]), "holder", Machine(cores=2, memory_available=10 << 30)):
    Path(sys.argv[2]).write_text("in")
    while not Path(sys.argv[3]).exists():
        time.sleep(0.05)
"""


@pytest.fixture
def ledger(tmp_path, monkeypatch):
    folder = tmp_path / "ledger"
    monkeypatch.setenv(ENV_DIR, str(folder))
    return folder


@pytest.fixture
def holder(ledger, tmp_path):
    """Start a process that holds ``nbytes`` until the returned ``release()`` is called."""
    procs = []

    def start(nbytes):
        entered, release = tmp_path / f"in{len(procs)}", tmp_path / f"out{len(procs)}"
        env = {**os.environ, ENV_DIR: str(ledger)}
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(nbytes), str(entered), str(release)], env=env)
        procs.append(proc)
        deadline = time.monotonic() + 120
        while not entered.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the holder never got its reservation"
            time.sleep(0.05)
        return lambda: (release.write_text("go"), proc.wait(60))

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_a_job_waits_for_what_a_running_job_reserved_and_starts_when_it_ends(holder):
    release = holder(6 * GB)  # a running job that will still grow into 6 GB
    admitted = threading.Event()

    def launch():
        with reserve(4 * GB, "second job", MACHINE):  # 6 + 4 > 8: must wait
            admitted.set()

    t = threading.Thread(target=launch, daemon=True)
    t.start()
    assert not admitted.wait(3), "admitted beside a reservation it does not fit next to"
    release()
    assert admitted.wait(60), "not admitted after the running job ended"
    t.join(10)


def test_jobs_that_fit_side_by_side_both_run(holder):
    release = holder(3 * GB)
    with reserve(4 * GB, "fits", MACHINE):  # 3 + 4 <= 8: no wait
        pass
    release()


def test_a_job_that_cannot_fit_even_alone_is_refused_at_once(ledger):
    too_big = r"needs an estimated 9\.7 GB, above 80% of this machine's memory"
    with pytest.raises(ConfigError, match=too_big), reserve(9 * GB, "too big", MACHINE):
        pass


def test_a_bounded_wait_ends_in_one_line(holder, monkeypatch):
    holder(6 * GB)
    monkeypatch.setenv(ENV_WAIT, "1")
    with pytest.raises(ConfigError) as err, reserve(4 * GB, "second job", MACHINE):
        pass
    msg = str(err.value)
    assert "\n" not in msg and "waited 1 s for memory" in msg and "will still grow by" in msg


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "1e9", "soon"])
def test_the_wait_limit_is_validated(ledger, monkeypatch, value):
    monkeypatch.setenv(ENV_WAIT, value)
    with pytest.raises(ConfigError, match=ENV_WAIT), reserve(GB, "job", MACHINE):
        pass


def test_entries_of_ended_or_recycled_processes_are_ignored(ledger):
    ledger.mkdir(mode=0o700)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [
        {"pid": dead.pid, "start": 1, "bytes": 7 * GB, "base": 0, "what": "ended"},
        {"pid": os.getpid(), "start": 1, "bytes": 7 * GB, "base": 0, "what": "recycled pid"},  # wrong start time
    ]
    (ledger / "ledger.json").write_text(json.dumps(stale))
    with reserve(7 * GB, "job", MACHINE):
        held = json.loads((ledger / "ledger.json").read_text())
        assert [e["what"] for e in held] == ["job"]
    assert json.loads((ledger / "ledger.json").read_text()) == []


@pytest.mark.parametrize("content", [b"{not json", b"[" * 100_000, b"x" * (2 << 20), b'[{"pid": "x"}]'])
def test_an_unreadable_ledger_is_started_afresh(ledger, content):
    ledger.mkdir(mode=0o700)
    (ledger / "ledger.json").write_bytes(content)
    with reserve(GB, "job", MACHINE):
        pass


def test_a_ledger_folder_others_may_write_is_refused(ledger):
    ledger.mkdir(mode=0o777)
    ledger.chmod(0o777)
    with pytest.raises(ConfigError, match="not private to this user"), reserve(GB, "job", MACHINE):
        pass
