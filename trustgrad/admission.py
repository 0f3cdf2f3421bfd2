"""Machine-wide memory admission: a local job starts only when its estimate fits beside the jobs already running.

Why: the budget check before launch (``resources.check_launch``) compares one job with the memory available *now*.
Two jobs started side by side (``make test`` beside ``make demo``) each see the machine idle, then both grow into
their set-up and the kernel kills one. Here every local launch holds a *reservation* of its estimated peak for as long
as it runs, in a ledger all of this user's trustgrad processes share (docs/limits.md, "Admission"):

- a job is admitted when its estimate fits the budget (80% of ``MemAvailable`` now) less what the running jobs have
  reserved and not yet grown into (their reservation minus the resident memory of their process trees);
- a job that cannot fit even once every other job has ended is refused at once (``ConfigError``, one line);
- otherwise it waits, polling, up to ``TRUSTGRAD_MEMORY_WAIT`` seconds (default 1800), then is refused with the figures.

The ledger is a JSON file beside a lock file (``fcntl.flock``) in a folder only this user may write; entries of
processes that no longer exist (checked by pid and start time, so a recycled pid is not mistaken for a live job) are
dropped. Processes of other users, and memory a process allocates outside a launch, are seen only through
``MemAvailable``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .machine import BUDGET_FRACTION, Machine, human_bytes

__all__ = ["Reservation", "reserve", "reclaimable", "wait_limit", "ledger_dir", "DEFAULT_WAIT_S"]

log = logging.getLogger(__name__)

DEFAULT_WAIT_S = 1800.0  # a test suite waiting behind `make demo`'s blind job (about 5 minutes) with margin
POLL_S = 1.0
MAX_LEDGER_BYTES = 1 << 20  # thousands of entries; anything larger is not ours and is ignored
ENV_WAIT = "TRUSTGRAD_MEMORY_WAIT"
ENV_DIR = "TRUSTGRAD_ADMISSION_DIR"


@dataclass(frozen=True)
class Reservation:
    pid: int
    start: int  # the process's start time in clock ticks since boot (/proc/PID/stat field 22)
    bytes: int
    base: int  # what the process tree held when admitted (a launcher's own memory, a fork server kept from before)
    what: str


def ledger_dir() -> Path:
    """This user's ledger folder (``TRUSTGRAD_ADMISSION_DIR`` overrides it: tests use a private one)."""
    return Path(os.environ.get(ENV_DIR) or Path(tempfile.gettempdir()) / f"trustgrad-admission-{os.getuid()}")


def wait_limit() -> float:
    """Seconds a job waits for memory: ``TRUSTGRAD_MEMORY_WAIT`` (0 to 1 day), else :data:`DEFAULT_WAIT_S`."""
    text = os.environ.get(ENV_WAIT)
    if text is None:
        return DEFAULT_WAIT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 86400:  # also refuses nan and inf
        raise ConfigError(f"{ENV_WAIT}={text[:40]!r}: must be a number of seconds in [0, 86400]")
    return value


@contextlib.contextmanager
def reserve(nbytes: int, what: str, machine: Machine | None = None) -> Iterator[None]:
    """Hold a reservation of ``nbytes`` for the duration of the block, waiting until it fits (see the module doc).

    ``machine`` fixes what the machine offers (tests); by default it is read anew at every poll.
    """
    folder = ledger_dir()
    pid = os.getpid()
    limit = wait_limit()
    deadline = time.monotonic() + limit
    announced = False
    while True:
        with _locked(folder) as ledger:
            entries = _live(ledger.read())
            here = machine or Machine.detect()
            owed, reclaimable = _owed(entries)
            entry = Reservation(pid, _start_time(pid) or 0, int(nbytes), _tree_pss({pid})[pid], what[:200])
            budget = int(BUDGET_FRACTION * here.memory_available)
            ceiling = int(BUDGET_FRACTION * (here.memory_available + reclaimable))
            if entry.bytes > ceiling:
                raise ConfigError(
                    f"the job needs an estimated {human_bytes(entry.bytes)}, above {BUDGET_FRACTION:.0%} of this "
                    f"machine's memory even after the {len(entries)} running trustgrad job(s) end "
                    f"({human_bytes(ceiling)}); use a smaller model, batch or fewer --workers"
                )
            if entry.bytes + owed <= budget:
                ledger.write([*entries, entry])
                break
        if time.monotonic() >= deadline:
            raise ConfigError(
                f"waited {limit:.0f} s for memory: the job needs an estimated {human_bytes(entry.bytes)}, the "
                f"budget is {human_bytes(budget)} and running trustgrad jobs will still grow by {human_bytes(owed)} "
                f"(pids {sorted(e.pid for e in entries)}); raise {ENV_WAIT} or run it later"
            )
        if not announced:
            log.warning(
                "waiting for memory: %s needs %s; budget %s, running jobs (pids %s) will still grow by %s",
                what, human_bytes(entry.bytes), human_bytes(budget), sorted(e.pid for e in entries), human_bytes(owed),
            )  # fmt: skip
            announced = True
        time.sleep(POLL_S)
    try:
        yield
    finally:
        with _locked(folder) as ledger:
            entries = ledger.read()
            if entry in entries:
                entries.remove(entry)  # the first equal one: a process may hold several
            ledger.write(_live(entries))


def reclaimable() -> int:
    """Bytes the running trustgrad jobs of this user will give back when they end (what their trees gained)."""
    with _locked(ledger_dir()) as ledger:
        return _owed(_live(ledger.read()))[1]


def _owed(entries: list[Reservation]) -> tuple[int, int]:
    """What the running jobs will still grow by (reservation less what their trees gained since admission, at least 0),
    and what they will give back when they end (what their trees gained)."""
    pss = _tree_pss({e.pid for e in entries})
    owed = held = 0
    seen: set[int] = set()
    for e in entries:
        now = 0 if e.pid in seen else pss.get(e.pid, 0)  # a process tree counts once, against its first entry
        seen.add(e.pid)
        gained = max(0, now - e.base)
        owed += max(0, e.bytes - gained)
        held += gained
    return owed, held


# --------------------------------------------------------------------------------------------------------------------
# the ledger file


class _Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> list[Reservation]:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_LEDGER_BYTES + 1)
        except FileNotFoundError:
            return []
        if len(raw) > MAX_LEDGER_BYTES:
            log.warning("admission ledger %s is over %d bytes: ignored", self.path, MAX_LEDGER_BYTES)
            return []
        try:
            items = json.loads(raw or b"[]")
            return [
                Reservation(int(d["pid"]), int(d["start"]), int(d["bytes"]), int(d["base"]), str(d["what"]))
                for d in items
            ]
        except (ValueError, TypeError, KeyError, RecursionError):
            log.warning("admission ledger %s is unreadable: started afresh", self.path)
            return []

    def write(self, entries: list[Reservation]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps([e.__dict__ for e in entries]))
        os.replace(tmp, self.path)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[_Ledger]:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = folder.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:  # another user could forge reservations and stall our jobs
        raise ConfigError(f"admission ledger folder {str(folder)!r} is not private to this user; remove it")
    with open(folder / "lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield _Ledger(folder / "ledger.json")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------------------------
# processes, from /proc


def _live(entries: list[Reservation]) -> list[Reservation]:
    return [e for e in entries if e.pid > 0 and _start_time(e.pid) == e.start]


def _stat(pid: int | str) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may hold spaces and parentheses)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def _start_time(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None  # field 22 of the full line


def _tree_pss(roots: set[int]) -> dict[int, int]:
    """Proportional resident bytes (PSS) of each root's process tree: the launcher, its fork server, the ranks and
    their helpers. PSS, not RSS: forked ranks share torch's pages with their fork server, and RSS would count those
    pages once per rank (about 300 MB each), hiding how much a job has still to grow."""
    if not roots:
        return {}
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        fields = _stat(name) if name.isdigit() else None
        if fields and len(fields) > 1:
            parent[int(name)] = int(fields[1])
    totals = dict.fromkeys(roots, 0)
    for pid in parent:
        p, hops = pid, 0
        while p and hops < 64:  # walk up to a root (pids form a tree; the bound guards a racing /proc)
            if p in totals:
                totals[p] += _pss(pid)
                break
            p, hops = parent.get(p, 0), hops + 1
    return totals


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:")), 0)
    except (OSError, ValueError):
        return 0
