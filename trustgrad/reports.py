"""How the ranks of a ``torchrun`` job hand their results to the coordinator without a collective a dead rank blocks.

Locally the launcher is every rank's parent and reads each result from a queue; under ``torchrun`` the ranks may sit on
several machines and some may be dead or cut off by the end (asynchronous ``ps`` and ``gossip`` go on without them).
An ``all_gather_object`` at the end would wait for every rank and fail the job. Instead:

1. every rank but the coordinator writes its result, as JSON, under its own key of the job's rendezvous store (the
   store the agents host; a rank that cannot reach it logs that and ends normally);
2. the coordinator polls the store for each rank's key until that rank's deadline: ranks the pattern may lose get
   ``grace`` seconds, the others the job's ``--timeout`` (a rank that must live and never reports fails the run,
   named); ranks that never reported are named in the records, as dead ranks are in local launches.

Reports come from other machines: JSON only (never pickle), a size budget checked before parsing, the parser's
recursion caught, and a shape check (``decode_report``) before any value is merged into the run's summary.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from .errors import LaunchError

__all__ = ["publish", "collect", "encode_report", "decode_report", "MAX_REPORT_BYTES"]

log = logging.getLogger(__name__)

#: what one rank's report may weigh: a worker's counters and pattern statistics are a few KB; per-step traces of long
#: runs stay far below this
MAX_REPORT_BYTES = 8 << 20
_POLL = 0.2


def _key(rank: int) -> str:
    return f"trustgrad/report/{rank}"


def _jsonable(obj: Any) -> Any:
    """numpy and torch values -> plain JSON values (the coordinator's model state is never sent)."""
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return obj.tolist()
    raise TypeError(f"cannot report a value of type {type(obj).__name__}")


def encode_report(result: dict[str, Any]) -> bytes:
    """A non-coordinating rank's result as JSON bytes (its ``state``, if any, stays home)."""
    body = {k: v for k, v in result.items() if k != "state"}
    return json.dumps(body, default=_jsonable).encode()  # NaN stays NaN (a diverged loss), as in summary.json


def decode_report(raw: bytes, rank: int, limit: int = MAX_REPORT_BYTES) -> dict[str, Any]:
    """The report rank ``rank`` wrote, checked: ``LaunchError`` (one line, naming the rank) if it is not one."""
    if len(raw) > limit:
        raise LaunchError(f"rank {rank}'s report is {len(raw)} bytes (limit {limit})", rank=rank)
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = type(exc).__name__ if isinstance(exc, RecursionError) else str(exc).splitlines()[0][:120]
        raise LaunchError(f"rank {rank}'s report is not JSON ({reason})", rank=rank) from None
    if not isinstance(body, dict):
        raise LaunchError(f"rank {rank}'s report is a JSON {type(body).__name__}, not an object", rank=rank)
    if body.get("rank") != rank or isinstance(body.get("rank"), bool):
        raise LaunchError(f"rank {rank}'s report names rank {str(body.get('rank'))[:40]!r}", rank=rank)
    if body.get("coordinator"):
        raise LaunchError(f"rank {rank}'s report claims to be the coordinator's", rank=rank)
    for name in ("bytes_sent", "messages_sent", "steps"):
        value = body.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise LaunchError(f"rank {rank}'s report has {name} = {str(value)[:40]!r}", rank=rank)
    if not isinstance(body.get("stats", {}), dict):
        raise LaunchError(f"rank {rank}'s report has stats that are not an object", rank=rank)
    return body


def publish(store: Any, rank: int, result: dict[str, Any]) -> bool:
    """Write this rank's report; False (logged) when the store cannot be reached: the rank's work is done anyway."""
    try:
        store.set(_key(rank), encode_report(result))
    except (RuntimeError, TypeError, ValueError) as exc:  # DistStoreError is a RuntimeError
        log.warning("rank %d could not report to the coordinator: %s", rank, str(exc).splitlines()[0][:160])
        return False
    return True


def collect(
    store: Any, world: int, own: dict[str, Any], deadline_for: Callable[[int], float]
) -> tuple[list[dict[str, Any] | None], dict[int, str]]:
    """The coordinator's side: every rank's report (None where none came in time), and the refused ones' reasons.

    ``deadline_for(rank)`` is how many seconds from now that rank may take. Polls with ``check`` so that one missing
    rank never blocks the collection of the others.
    """
    started = time.monotonic()
    ranks: list[dict[str, Any] | None] = [None] * world
    ranks[own["rank"]] = own
    refused: dict[int, str] = {}
    waiting = {r: started + deadline_for(r) for r in range(world) if r != own["rank"]}
    while waiting:
        for r in sorted(waiting):
            if store.check([_key(r)]):
                del waiting[r]
                try:
                    ranks[r] = decode_report(store.get(_key(r)), r)
                except LaunchError as exc:
                    log.warning("%s; it counts as a rank that did not report", exc)
                    refused[r] = str(exc)
            elif time.monotonic() >= waiting[r]:
                del waiting[r]
        if waiting:
            time.sleep(_POLL)
    return ranks, refused
