"""Process launch: spawn N local ranks as one job, or join a job started by ``torchrun``.

Local jobs rendezvous through a file in a fresh temporary folder (never a fixed port) and every collective carries the
run's timeout. The parent watches every child: the first rank that raises makes the whole job fail fast with that
rank's traceback (``LaunchError``), the others are terminated, and no child outlives the call. A launch of more
processes than the machine's cap (``trustgrad.resources``) is refused before anything forks. Patterns that survive
worker loss (asynchronous parameter server, gossip) say which ranks may die silently.

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set by the agent) the same rank function runs in-process; the c10d store
is namespaced per restart attempt because after ``--max-restarts`` gloo would otherwise read the peer addresses left
by the failed attempt (a torch 2.13 pitfall). There is no parent to ship a traceback to: a rank that fails in the
engine raises ``LaunchError`` with one line naming the rank, the peer it was waiting on (read from the failing
call's arguments) and the timeout, so every machine's log says who failed waiting for whom. What happens after the
rank's work (reporting to the coordinator, ``trustgrad.reports``) is the caller's ``then``, run once the process
group is gone so no collective can block it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue as queue_module
import re
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any

from .errors import LaunchError, TrustgradError

__all__ = ["RankContext", "spawn", "under_torchrun", "run_torchrun_rank", "describe_failure", "engine_message"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankContext:
    """Who this process is in the job."""

    rank: int
    world_size: int
    local_rank: int
    launched_by: str  # "spawn" | "torchrun"


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def _init_process_group(backend: str, timeout: float, rank: int, world: int, init_file: str | None) -> Any:
    """Join the job's process group; under torchrun return the job's store (namespaced for this attempt)."""
    import torch.distributed as dist

    if init_file is not None:
        dist.init_process_group(
            backend, init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=timeout)
        )
        return None
    store, rank, world = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout)))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"trustgrad/attempt{attempt}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
    return store


def _child(
    rank: int,
    world: int,
    init_file: str,
    backend: str,
    timeout: float,
    fn: Callable[..., Any],
    args: tuple,
    results: mp.Queue,
    environ: dict[str, str],
) -> None:
    import torch.distributed as dist

    os.environ.clear()  # the fork server's environment is from its start; the job gets the caller's of now
    os.environ.update(environ)
    try:
        _init_process_group(backend, timeout, rank, world, init_file)
        out = fn(RankContext(rank, world, rank, "spawn"), *args)
        results.put(("ok", rank, _by_value(out)))
    except BaseException as exc:  # ship every failure, KeyboardInterrupt included, to the parent
        results.put(("error", rank, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        results.close()
        results.join_thread()
        os._exit(1)
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):  # teardown of a broken group must not mask the result
                dist.destroy_process_group()
    results.close()
    results.join_thread()


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    backend: str = "gloo",
    timeout: float = 120.0,
    job_timeout: float | None = None,
    may_die: Callable[[int], bool] = lambda rank: False,
) -> list[Any]:
    """Run ``fn(RankContext, *args)`` on ``world_size`` fresh processes; return each rank's value (``None`` if it died).

    Tensors in the returned values arrive as numpy arrays.

    ``timeout`` bounds every collective (it is the process group's timeout); ``job_timeout`` bounds the whole job.
    ``may_die(rank)`` says whether a rank that dies without raising (killed, stalled out) may be dropped while the
    job goes on; otherwise its death fails the job.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    from .machine import check_processes

    check_processes(world_size)  # before anything forks: a job of 1000 ranks is refused, not started (docs/limits.md)
    ctx = _context()
    results: mp.Queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="trustgrad-rdzv-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(
                target=_child,
                args=(rank, world_size, init_file, backend, timeout, fn, tuple(args), results, dict(os.environ)),
                name=f"trustgrad-rank{rank}",
                daemon=False,
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        try:
            return _supervise(procs, results, job_timeout, may_die)
        finally:
            _reap(procs)
            results.close()


def _context() -> Any:
    """Fresh processes from a fork server that has already imported torch and trustgrad's worker loop.

    Ranks start in a fraction of a second instead of re-importing torch each (seconds per rank on small machines).
    The server is forked once per parent process before any thread or OpenMP pool exists, so forking from it is as
    safe as spawning.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["trustgrad.train"])
    return ctx


def _by_value(obj: Any) -> Any:
    """Tensors become numpy arrays: torch would pass them through shared memory that dies with this process."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy()
    if isinstance(obj, dict):
        return {k: _by_value(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_by_value(v) for v in obj)
    return obj


def _supervise(
    procs: list[mp.Process], results: mp.Queue, job_timeout: float | None, may_die: Callable[[int], bool]
) -> list[Any]:
    out: list[Any] = [None] * len(procs)
    finished: set[int] = set()
    deadline = None if job_timeout is None else time.monotonic() + job_timeout
    while len(finished) < len(procs):
        if deadline is not None and time.monotonic() > deadline:
            missing = sorted(set(range(len(procs))) - finished)
            raise LaunchError(f"job timed out after {job_timeout:.0f} s; ranks {missing} did not finish")
        wait([p.sentinel for i, p in enumerate(procs) if i not in finished] + [results._reader], timeout=0.5)  # type: ignore[attr-defined]
        _drain(results, out, finished, may_die=may_die)
        for rank, p in enumerate(procs):
            if rank in finished or p.exitcode is None:
                continue
            _drain(results, out, finished, block_for=0.5, may_die=may_die)  # a result may still be in the pipe
            if rank in finished:
                continue
            how = f"signal {-p.exitcode}" if p.exitcode < 0 else f"exit code {p.exitcode}"
            if may_die(rank):
                log.warning("rank %d died (%s); the job continues without it", rank, how)
                finished.add(rank)
            else:
                raise LaunchError(f"rank {rank} died ({how}) without a result", rank=rank)
    return out


def _drain(
    results: mp.Queue,
    out: list[Any],
    finished: set[int],
    block_for: float = 0.0,
    may_die: Callable[[int], bool] = lambda rank: False,
) -> None:
    while True:
        try:
            msg = results.get(timeout=block_for) if block_for else results.get_nowait()
        except queue_module.Empty:
            return
        block_for = 0.0
        if msg[0] == "ok":
            out[msg[1]] = msg[2]
            finished.add(msg[1])
        else:
            _, rank, summary, tb = msg
            if not may_die(rank):
                raise LaunchError(f"rank {rank} failed: {summary}", rank=rank, remote_traceback=tb)
            # e.g. a worker an asynchronous server dropped wakes up to a closed connection: the job goes on
            log.warning("rank %d failed (%s); the job continues without it", rank, summary)
            finished.add(rank)


def _reap(procs: list[mp.Process]) -> None:
    """Terminate what is still running, then kill what ignores SIGTERM: no stray children."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(timeout=5.0)


def run_torchrun_rank(
    fn: Callable[..., Any],
    args: Sequence[Any] = (),
    *,
    backend: str = "gloo",
    timeout: float = 120.0,
    then: Callable[[RankContext, Any, Any], Any] | None = None,
) -> Any:
    """Run ``fn`` as this process's rank of a ``torchrun`` job (one process per rank, started by the agent).

    Returns ``then(ctx, store, fn's value)`` (``fn``'s value without ``then``), called after the process group is
    destroyed; ``store`` is the job's rendezvous store. An engine failure becomes a one-line ``LaunchError``.
    """
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "-1"))
    try:
        store = _init_process_group(backend, timeout, -1, -1, None)
        ctx = RankContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), "torchrun")
        out = fn(ctx, *args)
    except LaunchError as exc:
        named = str(exc) if str(exc).startswith("rank ") else f"rank {rank}: {exc}"
        raise LaunchError(named, rank=exc.rank, remote_traceback=exc.remote_traceback) from None
    except TrustgradError:
        raise
    except RuntimeError as exc:  # gloo and the store (DistBackendError, DistStoreError are RuntimeErrors)
        raise LaunchError(
            describe_failure(exc, rank, timeout), rank=rank, remote_traceback=traceback.format_exc()
        ) from None
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):  # a group whose peers are gone must not mask the result
                dist.destroy_process_group()
    return then(ctx, store, out) if then is not None else out


#: gloo prefixes messages with its source location and appends advice; the one line keeps what happened
_GLOO_NOISE = (re.compile(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*"), re.compile(r"\.?\s*This is typically caused.*$"))
#: argument names of the call that failed, innermost first: trustgrad's Comm (src, dst) and the ring's neighbours
_PEER_NAMES = {"recv": ("src", "prv", "peer", "dst", "nxt"), "send": ("dst", "nxt", "peer", "src", "prv")}


def describe_failure(exc: BaseException, rank: int, timeout: float) -> str:
    """One line for a rank whose engine call failed: the rank, the peer it was talking to, the timeout, the cause."""
    text = engine_message(exc)
    op = "send" if "send" in text.lower() else "recv"
    peer = _peer_in_traceback(exc, _PEER_NAMES[op])
    store_wait = re.search(r"wait timeout after \d+ms, keys: \S*?/(\d+)$", text)
    if store_wait:  # measured: ranks on a machine whose torchrun had no --local-addr never reach the store
        master = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        what = (
            f"rank {store_wait.group(1)} never joined the process group within --timeout {timeout:g} s (it could not "
            f"reach the job's store at {master}? across machines give each torchrun --local-addr ADDR)"
        )
    elif "connectfullmesh" in text.lower():  # measured: gloo advertises the hostname's address, here 127.0.0.1
        what = (
            f"joining the process group failed within --timeout {timeout:g} s (gloo could not connect to every rank; "
            "across machines set GLOO_SOCKET_IFNAME to the interface that reaches them)"
        )
    elif "timed out" in text.lower() or "timeout" in text.lower():
        what = f"{'sending to' if op == 'send' else 'waiting for'} {peer} timed out after --timeout {timeout:g} s"
    elif "closed" in text.lower() or "reset" in text.lower():
        what = (
            f"the connection with {peer} broke (that rank failed or its host is unreachable; --timeout {timeout:g} s)"
        )
    else:
        what = f"a call with {peer} failed (--timeout {timeout:g} s)"
    return f"rank {rank}: {what}: {text[:200]}"


def engine_message(exc: BaseException) -> str:
    """The first line of an engine error without gloo's source location and advice."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    for noise in _GLOO_NOISE:
        text = noise.sub("", text)
    return text[:240]


def _peer_in_traceback(exc: BaseException, names: tuple[str, ...]) -> str:
    """The peer rank of the innermost trustgrad frame that has one among ``names``, e.g. ``rank 3``."""
    tb, frames = exc.__traceback__, []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    here = os.path.dirname(os.path.abspath(__file__))
    for frame in reversed(frames):
        if not os.path.abspath(frame.f_code.co_filename).startswith(here):
            continue
        for name in names:
            value = frame.f_locals.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                return f"rank {value}"
    return "a peer"
