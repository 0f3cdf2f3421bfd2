"""Point-to-point messages with live peers that never close a pair on a slow peer.

Why this exists (measured, torch 2.13 gloo): sends are rendezvous (an ``isend`` completes only once the peer has
posted the matching receive), a wait that times out *closes the pair* for good ("Application timeout caused pair
closure": every later message with that peer fails), and a killed peer fails every pending operation at once
("Connection closed by peer"). So a short deadline on a gloo wait turns a slow peer into a lost one, and — because a
rank blocked on one peer is late for the others — the loss cascades: a gossip peer frozen for 8 s with
``--peer-timeout 3`` cut the coordinator off from every other rank.

``PeerLinks`` separates the two clocks. Every operation is posted at once, then waited on by one thread per peer (in
posting order) with the job's long ``--timeout``; the caller waits on the *outcome* with its own short deadline
(``wait``), and an operation that misses it stays posted: its message is used when it lands (``pop_finished``).
A peer is lost only when one of its operations fails (it died or closed the pair) or stays pending for the whole
``--timeout``; then every later operation with it fails fast. ``evict`` closes a pair on purpose (a peer that sent an
invalid message, or fell further behind than the memory budget allows), so that neither side waits for the other.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..comm import Comm

__all__ = ["Op", "PeerLinks"]

log = logging.getLogger(__name__)

PENDING, DONE, FAILED = "pending", "done", "failed"


@dataclass(eq=False)
class Op:
    """One posted send or receive; ``tensor`` is the message (kept alive until the engine is done with it)."""

    peer: int
    kind: str  # "send" | "recv"
    tag: int
    tensor: torch.Tensor
    work: Any = None
    state: str = PENDING
    posted: float = field(default_factory=time.monotonic)


class PeerLinks:
    """Posts point-to-point operations through ``comm`` and waits on them off the caller's thread, per peer."""

    def __init__(self, comm: Comm, timeout: float):
        self.comm, self.timeout = comm, timeout
        self.lost: dict[int, str] = {}  # peer -> why
        self._cond = threading.Condition()
        self._queues: dict[int, queue.SimpleQueue] = {}
        self._threads: list[threading.Thread] = []
        self._pending: dict[int, list[Op]] = {}  # per peer, in posting order

    # ------------------------------------------------------------------ posting
    def send(self, tensor: torch.Tensor, peer: int, tag: int) -> Op:
        return self._post(Op(peer, "send", tag, tensor), lambda: self.comm.isend(tensor, peer, tag))

    def recv(self, tensor: torch.Tensor, peer: int, tag: int) -> Op:
        return self._post(Op(peer, "recv", tag, tensor), lambda: self.comm.irecv(tensor, peer, tag))

    def _post(self, op: Op, start) -> Op:  # noqa: ANN001
        if op.peer in self.lost:
            op.state = FAILED
            return op
        try:
            op.work = start()
        except RuntimeError as exc:  # gloo refuses to post on a pair that is already closed
            self._fail(op, exc)
            return op
        with self._cond:
            self._pending.setdefault(op.peer, []).append(op)
        self._queue(op.peer).put(op)
        return op

    def backlog(self, peer: int) -> int:
        """Operations with ``peer`` still pending (a slow peer's backlog: what it costs us in memory)."""
        with self._cond:
            return len(self._pending.get(peer, ()))

    # ------------------------------------------------------------------ outcomes
    def wait(self, ops: list[Op], deadline: float) -> bool:
        """Block until every op in ``ops`` is done or failed, or ``deadline`` (monotonic) passes; True if all are."""
        with self._cond:
            while any(op.state == PENDING for op in ops):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def drain(self, deadline: float | None = None) -> bool:
        """Wait for every pending operation with every peer (at the end of a run); True if none is left."""
        with self._cond:
            ops = [op for ops in self._pending.values() for op in ops]
        return self.wait(ops, deadline if deadline is not None else time.monotonic() + self.timeout + 5.0)

    def evict(self, peer: int, reason: str) -> None:
        """Stop talking to ``peer`` and close the pair, so that its pending operations (and ours) fail fast."""
        if peer in self.lost:
            return
        self._mark_lost(peer, reason)
        with self._cond:
            tail = next((op for op in reversed(self._pending.get(peer, [])) if op.state == PENDING), None)
        if tail is not None:
            # gloo has no "close": a wait that times out closes the pair, and every other operation on it fails
            with contextlib.suppress(RuntimeError):
                self.comm.wait(tail.work, 0.001)

    def close(self) -> None:
        """Stop the waiting threads once their queues are empty (call after ``drain``)."""
        for q in self._queues.values():
            q.put(None)
        for thread in self._threads:
            thread.join(timeout=self.timeout + 5.0)

    # ------------------------------------------------------------------ the per-peer threads
    def _queue(self, peer: int) -> queue.SimpleQueue:
        if peer not in self._queues:
            self._queues[peer] = queue.SimpleQueue()
            thread = threading.Thread(target=self._run, args=(peer,), name=f"peer-link-{peer}", daemon=True)
            self._threads.append(thread)
            thread.start()
        return self._queues[peer]

    def _run(self, peer: int) -> None:
        q = self._queues[peer]
        while (op := q.get()) is not None:
            try:
                self.comm.wait(op.work, self.timeout)
            except RuntimeError as exc:
                self._fail(op, exc)
                continue
            with self._cond:
                op.state = DONE
                self._pending[peer].remove(op)
                self._cond.notify_all()

    def _fail(self, op: Op, exc: Exception) -> None:
        self._mark_lost(op.peer, _reason(exc))
        with self._cond:
            op.state = FAILED
            if op in self._pending.get(op.peer, []):
                self._pending[op.peer].remove(op)
            self._cond.notify_all()

    def _mark_lost(self, peer: int, reason: str) -> None:
        with self._cond:
            if peer in self.lost:
                return
            self.lost[peer] = reason
        log.warning("rank %d: peer %d lost: %s", self.comm.rank, peer, reason)


def _reason(exc: Exception) -> str:
    """gloo's message, one line, without its source location: "Connection closed by peer ...", "Timed out ..."."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip().splitlines()[0] if str(exc).strip() else "")
    return text.split(". This is typically")[0][:120] or type(exc).__name__
