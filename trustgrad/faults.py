"""Test-only fault injection: a worker kills or freezes *itself* at a chosen point, with real signals.

Fault tests need faults that are real (a SIGKILL the kernel delivers, a SIGSTOP that freezes every thread of the
process, gloo's included) yet land at a reproducible point of the run. Two environment variables, read by the patterns
that tolerate loss (gossip, ps async/ssp) at set-up and before every step:

- ``TRUSTGRAD_TEST_KILL_WORKER="RANK@STEP"``: that rank SIGKILLs itself before its step STEP; ``RANK@setup`` does it
  during set-up (after the process group is formed, before the initial model is exchanged).
- ``TRUSTGRAD_TEST_FREEZE_WORKER="RANK@STEP:SECONDS"``: that rank SIGSTOPs itself before step STEP; a helper process
  it started sends SIGCONT after SECONDS. ``RANK@setup:SECONDS`` freezes it during set-up.

- ``TRUSTGRAD_TEST_BAD_FRAME="RANK@STEP:KIND"`` (ps only): that worker sends, instead of its push at step STEP, a
  message that breaks the bounded link's framing (``patterns/ps/transport.py``): ``oversized`` (a body of 1 MiB where
  40 bytes are due), ``truncated`` (a body that stops after 8 of its 40 bytes, then silence) or ``garbage`` (a length
  word of 2**64 - 1).

Unset (always, outside tests), nothing happens. A malformed value is a ``ConfigError``.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["KILL_ENV", "FREEZE_ENV", "FRAME_ENV", "FRAMES", "SETUP", "Faults"]

KILL_ENV = "TRUSTGRAD_TEST_KILL_WORKER"
FREEZE_ENV = "TRUSTGRAD_TEST_FREEZE_WORKER"
FRAME_ENV = "TRUSTGRAD_TEST_BAD_FRAME"
FRAMES = ("oversized", "truncated", "garbage")
#: the point "during set-up", as a step index no step has
SETUP = -1


@dataclass(frozen=True)
class Faults:
    """The faults planned for one rank: where it dies, where it freezes and for how long."""

    kill_at: int | None = None
    freeze_at: int | None = None
    freeze_seconds: float = 0.0
    bad_frame_at: int | None = None
    bad_frame: str = ""

    @classmethod
    def for_rank(cls, rank: int) -> Faults:
        kill = _parse(os.environ.get(KILL_ENV, ""), KILL_ENV, with_seconds=False)
        freeze = _parse(os.environ.get(FREEZE_ENV, ""), FREEZE_ENV, with_seconds=True)
        frame = _parse_frame(os.environ.get(FRAME_ENV, ""))
        return cls(
            kill_at=kill[1] if kill and kill[0] == rank else None,
            freeze_at=freeze[1] if freeze and freeze[0] == rank else None,
            freeze_seconds=freeze[2] if freeze and freeze[0] == rank else 0.0,
            bad_frame_at=frame[1] if frame and frame[0] == rank else None,
            bad_frame=frame[2] if frame and frame[0] == rank else "",
        )

    def at(self, step: int) -> None:
        """Call before step ``step`` (``SETUP`` during set-up): die or freeze here if planned."""
        if step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.freeze_at:
            freeze(self.freeze_seconds)


def freeze(seconds: float) -> None:
    """SIGSTOP this process; a detached helper sends SIGCONT after ``seconds`` (the process cannot wake itself)."""
    pid = os.getpid()
    helper = subprocess.Popen(["/bin/sh", "-c", f"sleep {seconds:.3f}; kill -CONT {pid}"], start_new_session=True)
    os.kill(pid, signal.SIGSTOP)
    helper.wait()  # reap it: it has sent SIGCONT, or we would not be running


def _parse(spec: str, name: str, with_seconds: bool) -> tuple[int, int, float] | None:
    if not spec:
        return None
    form = "RANK@STEP:SECONDS" if with_seconds else "RANK@STEP"
    try:
        rank, rest = spec.split("@")
        where, seconds = rest.split(":") if with_seconds else (rest, "0")
        step = SETUP if where == "setup" else int(where)
        parsed = (int(rank), step, float(seconds))
    except ValueError:
        raise ConfigError(f"{name} must look like {form} (STEP may be 'setup'), got {spec!r}") from None
    if parsed[0] < 0 or (step < 0 and step != SETUP) or not 0 <= parsed[2] <= 600:
        raise ConfigError(f"{name}={spec!r} is out of range (rank >= 0, step >= 0, 0 <= seconds <= 600)")
    return parsed


def _parse_frame(spec: str) -> tuple[int, int, str] | None:
    if not spec:
        return None
    try:
        rank, rest = spec.split("@")
        step, kind = rest.split(":")
        parsed = (int(rank), int(step), kind)
    except ValueError:
        raise ConfigError(f"{FRAME_ENV} must look like RANK@STEP:KIND, got {spec!r}") from None
    if parsed[0] < 1 or parsed[1] < 0 or kind not in FRAMES:
        raise ConfigError(f"{FRAME_ENV}={spec!r} is out of range (rank >= 1, step >= 0, KIND one of {FRAMES})")
    return parsed
