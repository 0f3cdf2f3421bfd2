"""What this machine offers a job now (cores, memory, GPUs) and the process cap of a local launch (docs/limits.md).

Apart from ``resources`` (the memory estimate, which builds models) so that the launcher can check a job's process
count before it forks without importing models, patterns or protections.

>>> process_cap(Machine(cores=2, memory_available=8 << 30))
8
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import resource
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

__all__ = [
    "Machine", "process_cap", "memory_budget", "budget_text", "human_bytes", "oversubscription", "check_processes",
    "PROCESSES_PER_CORE", "MIN_PROCESS_CAP", "BUDGET_FRACTION",
]  # fmt: skip

PROCESSES_PER_CORE = 4  # beyond this each rank gets under a quarter of a core and default deadlines start to fail
MIN_PROCESS_CAP = 8  # small machines still run the documented 4-worker jobs (5-6 processes with servers/auditors)
BUDGET_FRACTION = 0.8  # leave a fifth of what is available to the OS and to other users of the machine

_oversubscribe: contextvars.ContextVar[bool] = contextvars.ContextVar("trustgrad_oversubscribe", default=False)


@dataclass(frozen=True)
class Machine:
    """What this machine offers a job now."""

    cores: int
    memory_available: int  # bytes
    memory_source: str = "given"
    cuda_devices: int = 0

    @classmethod
    def detect(cls) -> Machine:
        memory, source = _available_memory()
        return cls(cores=_cores(), memory_available=memory, memory_source=source, cuda_devices=_cuda_devices())


def _cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _read("/sys/fs/cgroup/cpu.max")  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"
    if quota and not quota.startswith("max"):
        with contextlib.suppress(ValueError, ZeroDivisionError):
            q, period = (int(t) for t in quota.split()[:2])
            cores = min(cores, max(1, math.ceil(q / period)))
    return max(1, cores)


def _available_memory() -> tuple[int, str]:
    """The least of: MemAvailable, the cgroup's limit minus its use, and this process's address-space limit."""
    candidates: list[tuple[int, str]] = []
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemAvailable:"):
            candidates.append((int(line.split()[1]) * 1024, "MemAvailable"))
    limit, used = _read("/sys/fs/cgroup/memory.max"), _read("/sys/fs/cgroup/memory.current")
    if limit and used and limit.strip().isdigit() and used.strip().isdigit():
        candidates.append((int(limit) - int(used), "the cgroup's memory.max"))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:  # what this process may still map (torch alone maps over 3 GB)
        candidates.append((soft - _mapped_bytes(), "RLIMIT_AS less what is mapped"))
    if not candidates:  # no /proc (not Linux): physical memory is the best we know
        pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
        candidates.append((pages * os.sysconf("SC_PAGE_SIZE") if pages else 8 << 30, "physical memory"))
    memory, source = min(candidates)
    return max(0, memory), source


def _mapped_bytes() -> int:
    for line in (_read("/proc/self/status") or "").splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def _cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken driver is "no GPU" here; --device cuda then says so  # noqa: BLE001
        return 0


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def process_cap(machine: Machine) -> int:
    """Processes a local job may start without ``--oversubscribe``."""
    return max(MIN_PROCESS_CAP, PROCESSES_PER_CORE * machine.cores)


def memory_budget(machine: Machine) -> int:
    """Bytes a job (or one verifier or attack process) may plan to use."""
    return int(BUDGET_FRACTION * machine.memory_available)


def budget_text(machine: Machine) -> str:
    return (
        f"the memory budget of {human_bytes(memory_budget(machine))} ({BUDGET_FRACTION:.0%} of the "
        f"{human_bytes(machine.memory_available)} available: {machine.memory_source})"
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover


@contextlib.contextmanager
def oversubscription(allowed: bool = True) -> Iterator[None]:
    """Within this block local launches may exceed :func:`process_cap` (``trustgrad train --oversubscribe``)."""
    token = _oversubscribe.set(allowed)
    try:
        yield
    finally:
        _oversubscribe.reset(token)


def check_processes(world_size: int, machine: Machine | None = None, oversubscribe: bool = False) -> None:
    """Refuse a local launch of more processes than the cap, unless oversubscription was asked for."""
    if oversubscribe or _oversubscribe.get():
        return
    machine = machine or Machine(cores=_cores(), memory_available=0, memory_source="not read")
    cap = process_cap(machine)
    if world_size > cap:
        raise ConfigError(
            f"the job needs {world_size} processes but this machine has {machine.cores} cores: at most {cap} "
            f"({PROCESSES_PER_CORE} per core, at least {MIN_PROCESS_CAP}) start without --oversubscribe"
        )
