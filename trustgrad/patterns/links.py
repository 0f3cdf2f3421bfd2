"""Point-to-point messages with peers that never time out a gloo wait, so a slow peer cannot cut a rank off.

Why this exists (measured here, torch 2.13 gloo): sends are rendezvous (an ``isend`` completes only once the peer has
posted the matching receive); a killed peer fails every pending operation with it at once ("Connection closed by
peer"); and a wait that times out closes *every* connection of the waiting rank ("Application timeout caused pair
closure" on the next message to any peer). That last one is how a gossip peer frozen for 8 s with
``--peer-timeout 3`` left the coordinator alone on main: its neighbours timed out on it and cut themselves off.

So no gloo wait here ever expires. Every operation is posted at once and waited on by one thread per peer (in posting
order) without a deadline that can pass; the caller waits on the *outcome* with its own deadline (``wait``), and an
operation that misses it stays posted: its message is used when it lands. A peer is lost when one of its operations
fails (it died or closed its side), when an operation with it stays pending for ``give_up`` seconds (the job's
``--timeout``), or when the caller evicts it (an invalid message, too far behind). Losing a peer is local and
logical: its pending operations count as failed at once, later ones are not posted, and whatever of it lands later
is ignored. Its threads stay blocked on operations that may never complete, until ``release``.

``release`` (the end of a run): nothing should be in flight when the process group is destroyed and the process ends.
Across two network-namespace hosts, gossip ranks whose neighbours on the other host were cut off for 20 s, left with
such operations, died with SIGABRT after their last step ("terminate called without an active exception"), and
torchrun then killed the coordinator before it wrote the records (docs/multihost.md). So when operations with lost
peers are still held, the rank closes its connections on purpose with one tiny wait that times out, as the parameter
server closes a dropped worker's group: the engine fails what it holds and the threads end. At the end
of the run nothing is left to say to live peers: every operation with them completed in the final ``drain``.
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
from ..tags import LINK_RELEASE

__all__ = ["Op", "PeerLinks", "release"]

log = logging.getLogger(__name__)

PENDING, DONE, FAILED = "pending", "done", "failed"
FOREVER = 7 * 24 * 3600.0  # seconds: a gloo wait that cannot expire within any run
#: tag of the receive that ``release`` times out on purpose (never sent by anyone)
RELEASE_TAG = LINK_RELEASE  # trustgrad.tags


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

    def __init__(self, comm: Comm, give_up: float):
        self.comm, self.give_up = comm, give_up
        self.lost: dict[int, str] = {}  # peer -> why
        self._cond = threading.Condition()
        self._queues: dict[int, queue.SimpleQueue] = {}
        self._threads: list[threading.Thread] = []
        self._pending: dict[int, list[Op]] = {}  # per peer, in posting order
        self._held = 0  # operations the engine still holds (posted, their thread's wait not returned)
        self._released = False  # after ``release``: the engine's failures are our own doing, not losses

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
            with self._cond:
                self._lose_locked(op.peer, _reason(exc))
            op.state = FAILED
            return op
        with self._cond:
            if op.peer in self.lost:
                op.state = FAILED
                return op
            self._pending.setdefault(op.peer, []).append(op)
            self._held += 1
        self._queue(op.peer).put(op)
        return op

    @property
    def held(self) -> int:
        """Operations the engine still holds (a lost peer's never complete)."""
        with self._cond:
            return self._held

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
                self._cond.wait(min(left, 0.5))
                self._expire_locked()
        return True

    def drain(self, deadline: float | None = None) -> bool:
        """Wait for every pending operation with every peer not lost (at the end of a run); True if none is left."""
        with self._cond:
            ops = [op for ops in self._pending.values() for op in ops]
        return self.wait(ops, deadline if deadline is not None else time.monotonic() + self.give_up + 1.0)

    def expire(self) -> None:
        """Lose every peer with an operation pending for longer than ``give_up`` seconds."""
        with self._cond:
            self._expire_locked()

    def evict(self, peer: int, reason: str) -> None:
        """Stop talking to ``peer``: its pending operations fail now, nothing more is posted, nothing of it is used."""
        with self._cond:
            self._lose_locked(peer, reason)

    def close(self) -> None:
        """Let the waiting threads end once their queues are empty (threads blocked on a lost peer stay, as daemons)."""
        for q in self._queues.values():
            q.put(None)

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
                self.comm.wait(op.work, FOREVER)  # never expires: an expired gloo wait closes every connection
            except RuntimeError as exc:
                with self._cond:
                    self._held -= 1
                    if not self._released:
                        self._lose_locked(peer, _reason(exc))
                    self._cond.notify_all()
                continue
            with self._cond:
                self._held -= 1
                if op.state == PENDING:  # not already failed by a loss: a lost peer's late message is ignored
                    op.state = DONE
                    self._pending[peer].remove(op)
                self._cond.notify_all()

    def _expire_locked(self) -> None:
        now = time.monotonic()
        for peer, ops in list(self._pending.items()):
            if ops and now - ops[0].posted > self.give_up:
                self._lose_locked(peer, f"silent for {self.give_up:g} s (--timeout)")

    def _lose_locked(self, peer: int, reason: str) -> None:
        if peer in self.lost:
            return
        self.lost[peer] = reason
        for op in self._pending.pop(peer, []):
            op.state = FAILED
        self._cond.notify_all()
        log.warning("rank %d: peer %d lost: %s", self.comm.rank, peer, reason)


def release(comm: Comm, links: list[PeerLinks], grace: float = 5.0) -> bool:
    """At the end of a run, after every ``links`` drained and closed: if the engine still holds operations (with lost
    peers), close this rank's connections with a receive that times out on purpose, and wait up to ``grace`` seconds
    for the engine to fail them; True if it did. See the module docstring for why."""
    if not any(link.held for link in links):
        return False
    lost = sorted({p for link in links for p in link.lost})
    for link in links:
        with link._cond:
            link._released = True
    log.info("rank %d: closing its connections (operations with lost peers %s still held)", comm.rank, lost)
    peer = lost[0] if lost else (comm.rank + 1) % comm.world_size  # any peer: the timeout closes every connection
    with contextlib.suppress(RuntimeError):  # the timeout is the point
        comm.wait(comm.irecv(torch.zeros(1), peer, RELEASE_TAG), 0.001)
    deadline = time.monotonic() + grace
    for link in links:
        with link._cond:
            while link._held and time.monotonic() < deadline:
                link._cond.wait(min(0.1, max(0.0, deadline - time.monotonic())))
    held = sum(link.held for link in links)
    if held:
        log.warning("rank %d: the engine still holds %d operations after closing its connections", comm.rank, held)
    return True


def _reason(exc: Exception) -> str:
    """gloo's message, one line, without its source location: "Connection closed by peer ...", "Timed out ..."."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip().splitlines()[0] if str(exc).strip() else "")
    return text.split(". This is typically")[0][:120] or type(exc).__name__
