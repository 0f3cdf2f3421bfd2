"""Run fuzz targets in sacrificial worker processes under a memory limit and a per-case timeout.

Each target (``tests/fuzz/targets/NAME.py``, interface in ``tests/fuzz/targets/__init__.py``) is driven by a worker
process of its own: the worker builds the target's state once, then raises its address-space limit to what it uses
plus ``budget_mb`` (RLIMIT_AS: a case may allocate at most that much more) and runs cases one at a time, reporting each
outcome before it starts the next. The parent watches: a case that does not report within ``case_timeout`` seconds is a
hang (the worker is killed and a new one started), a worker that dies is a crash (the signal is named), and every case
is classified into one of the outcomes below. Case ``i`` of target ``t`` under seed ``s`` draws its mutant from
``random.Random(f"{s}:{t}:{i}")`` alone, so ``python -m tests.fuzz --target t --seed s --replay i`` reproduces it.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import multiprocessing
import os
import pkgutil
import random
import resource
import signal
import tempfile
import time
import traceback
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import tests.fuzz.targets as _targets_pkg

BEHAVED = ("refused", "invalid-verdict", "accepted")
FINDINGS = ("crash", "hang", "memory", "traceback", "silent-accept")
OUTCOMES = BEHAVED + FINDINGS


class Finding(Exception):
    """Raised by a target when the parser misbehaved without raising (e.g. a changed payload accepted as valid)."""

    def __init__(self, kind: str, detail: str) -> None:
        if kind not in FINDINGS:
            raise ValueError(f"unknown finding kind {kind!r}; known: {', '.join(FINDINGS)}")
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class CaseResult:
    target: str
    index: int
    outcome: str
    detail: str = ""


@dataclasses.dataclass
class TargetReport:
    target: str
    seed: int
    counts: Counter = dataclasses.field(default_factory=Counter)
    findings: list[CaseResult] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def cases(self) -> int:
        return sum(self.counts.values())

    def add(self, result: CaseResult) -> None:
        self.counts[result.outcome] += 1
        if result.outcome in FINDINGS:
            self.findings.append(result)


def target_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(_targets_pkg.__path__) if not m.name.startswith("_"))


def load_target(name: str) -> Any:
    """A target module by name (names starting with ``_`` are the harness's own self-tests, never run by default)."""
    if importlib.util.find_spec(f"tests.fuzz.targets.{name}") is None:
        raise SystemExit(f"unknown fuzz target {name!r}; known: {', '.join(target_names())}")
    return importlib.import_module(f"tests.fuzz.targets.{name}")


def case_rng(seed: int, name: str, index: int) -> random.Random:
    return random.Random(f"{seed}:{name}:{index}")


def classify(module: Any, state: Any, seed: int, name: str, index: int) -> CaseResult:
    """Run one case in this process and name its outcome (no crash or hang protection here: see ``run_target``)."""
    from trustgrad.errors import TrustgradError

    try:
        label = module.case(state, case_rng(seed, name, index))
    except Finding as finding:
        return CaseResult(name, index, finding.kind, finding.detail)
    except MemoryError:
        return CaseResult(name, index, "memory", "MemoryError")
    except TrustgradError as exc:  # a target may let its parser's refusal escape: still a refusal if it is one line
        message = str(exc)
        if "\n" in message or not message.strip():
            return CaseResult(name, index, "traceback", f"{type(exc).__name__} with a multi-line message: {message!r}")
        return CaseResult(name, index, "refused", message)
    except BaseException as exc:  # noqa: BLE001 -- anything else escaping the parser is the bug we look for
        tail = traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:]
        return CaseResult(name, index, "traceback", f"{type(exc).__name__}: {str(exc)[:200]} | {''.join(tail)[-400:]}")
    if label not in BEHAVED:
        return CaseResult(name, index, "traceback", f"target returned unknown outcome {label!r}")
    return CaseResult(name, index, label)


def _address_space() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _worker(name: str, seed: int, budget_mb: int, conn: Connection) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    module = load_target(name)
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as workdir:
        state = module.setup(Path(workdir))
        limit = _address_space() + budget_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        conn.send(("ready", None))
        while True:
            index = conn.recv()
            if index is None:
                return
            conn.send(("done", classify(module, state, seed, name, index)))


class _Worker:
    def __init__(self, name: str, seed: int, budget_mb: int, setup_timeout: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(name, seed, budget_mb, child), name=f"fuzz-{name}", daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(setup_timeout):
            self.kill()
            raise RuntimeError(f"fuzz target {name}: setup did not finish in {setup_timeout:.0f} s")
        try:
            self.conn.recv()
        except EOFError:
            self.proc.join(5)
            raise RuntimeError(f"fuzz target {name}: setup died (exit code {self.proc.exitcode})") from None

    def run(self, index: int, timeout: float) -> CaseResult | str:
        """The case's result, or ``"hang"`` / ``"crash: SIGNAME"`` when the worker did not report."""
        self.conn.send(index)
        if self.conn.poll(timeout):
            try:
                return self.conn.recv()[1]
            except EOFError:
                pass
        else:
            self.kill()
            return "hang"
        self.proc.join(5)
        code = self.proc.exitcode
        if code is not None and code < 0:
            return f"crash: {signal.Signals(-code).name}"
        return f"crash: worker exited with code {code}"

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(10)
        self.kill()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)


def run_target(
    name: str,
    count: int,
    *,
    seed: int = 0,
    start: int = 0,
    budget_mb: int = 2048,
    case_timeout: float = 20.0,
    setup_timeout: float = 300.0,
) -> TargetReport:
    """Run cases ``start .. start+count-1`` of one target and count their outcomes."""
    report = TargetReport(name, seed)
    began = time.monotonic()
    worker = _Worker(name, seed, budget_mb, setup_timeout)
    try:
        for index in range(start, start + count):
            got = worker.run(index, case_timeout)
            if isinstance(got, str):
                kind = got.split(":", 1)[0]
                report.add(CaseResult(name, index, kind, got))
                worker.kill()
                worker = _Worker(name, seed, budget_mb, setup_timeout)
            else:
                report.add(got)
    finally:
        worker.close()
    report.seconds = time.monotonic() - began
    return report


def format_table(reports: list[TargetReport]) -> str:
    head = ["target", "cases", *OUTCOMES, "seconds"]
    rows = [[r.target, str(r.cases), *(str(r.counts.get(o, 0)) for o in OUTCOMES), f"{r.seconds:.0f}"] for r in reports]
    total = Counter()
    for r in reports:
        total.update(r.counts)
    rows.append(["all", str(sum(total.values())), *(str(total.get(o, 0)) for o in OUTCOMES), ""])
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [head, *rows]]
    return "\n".join(lines)
