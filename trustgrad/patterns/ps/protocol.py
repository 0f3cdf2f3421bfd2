"""The parameter server's wire protocol over point-to-point tensors, and the server's inbox.

Messages (every one goes through ``Comm``, so bytes are counted):

- worker -> server, tag ``PUSH``: a float64 header ``[kind, step, version, nbytes, loss]``; for ``kind == GRADIENT``
  it is followed, tag ``PAYLOAD``, by ``nbytes`` of encoded gradient (a codec may make these ciphertext bytes).
  ``DONE`` says a worker has finished; ``ACK`` answers the server's goodbye.
- server -> worker, tag ``REPLY``: an int64 header ``[status, version, clock]``; for ``OK`` followed by the model's
  parameters (float32). ``DROPPED`` tells a worker the run goes on without it; ``BYE`` ends the run. ``SERVICE``
  asks a key party for work before the answer (partial decryptions, re-keying; ``ps.blind``).

Why the inbox is a thread: the server must take messages in arrival order (receive from any source) yet notice a
silent worker after ``--worker-timeout``. A gloo receive cannot be cancelled: measured here (torch 2.13), a message
landing in a receive whose wait had timed out killed the process. So the server never times out a gloo receive: this
thread blocks on receive-from-any (bounded by the job's ``--timeout``) and feeds a queue, and the scheduler waits on
the queue with Python timeouts. The run ends with a goodbye (``BYE`` -> ``ACK``) so that the thread's last posted
receive is always matched, even when a dead worker will never send again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import torch

from ...comm import Comm

__all__ = [
    "Inbox", "Message", "PUSH", "PAYLOAD", "REPLY", "GRADIENT", "DONE", "ACK", "OK", "DROPPED", "BYE", "SERVICE"
]  # fmt: skip

log = logging.getLogger(__name__)

PUSH, PAYLOAD, REPLY = 11, 12, 13  # tags
GRADIENT, DONE, ACK = 1, 2, 3  # worker message kinds
OK, DROPPED, BYE = 0, 1, 2  # server reply statuses
SERVICE = 3  # before replying, the server asks a key party for work: [SERVICE, request, count] (see ps.blind)
HEADER = 5


@dataclass(frozen=True)
class Message:
    src: int
    kind: int
    step: int
    version: int
    loss: float
    payload: bytes = b""


def push_header(kind: int, step: int = 0, version: int = 0, nbytes: int = 0, loss: float = 0.0) -> torch.Tensor:
    return torch.tensor([kind, step, version, nbytes, loss], dtype=torch.float64)


class Inbox:
    """Receives every worker message on a background thread; ``get(timeout)`` hands them out in arrival order."""

    def __init__(self, comm: Comm, max_payload: int, survive_peer_loss: bool = False):
        self.comm = comm
        self.max_payload = max_payload
        #: asynchronous schedules: a connection reset by a dying worker is not fatal (its silence is noticed by the
        #: scheduler's deadlines); the receive is posted again, up to a bound on consecutive failures
        self.survive_peer_loss = survive_peer_loss
        self._queue: queue.Queue[Message | BaseException] = queue.Queue()
        self._acks_expected: int | None = None
        self._acks = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="ps-inbox", daemon=True)
        self._thread.start()

    def get(self, timeout: float) -> Message | None:
        """The next message, or None after ``timeout`` seconds; a receive failure is raised here."""
        try:
            item = self._queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def expect_acks(self, count: int) -> None:
        """Stop receiving after ``count`` more ACKs (set before the goodbyes are sent)."""
        with self._lock:
            self._acks_expected = self._acks + count

    def _done(self) -> bool:
        with self._lock:
            return self._acks_expected is not None and self._acks >= self._acks_expected

    def _receive(self) -> Message:
        header = torch.zeros(HEADER, dtype=torch.float64)
        src = self.comm.recv(header, None, PUSH)
        kind, step, version, nbytes, loss = header.tolist()
        payload = b""
        if int(kind) == GRADIENT:
            if not 0 < nbytes <= self.max_payload:
                raise ValueError(f"rank {src} announced a gradient of {int(nbytes)} bytes")
            buf = torch.empty(int(nbytes), dtype=torch.uint8)
            self.comm.recv(buf, src, PAYLOAD)
            payload = buf.numpy().tobytes()
        elif int(kind) == ACK:
            with self._lock:
                self._acks += 1
        return Message(src, int(kind), int(step), int(version), float(loss), payload)

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        failures = 0
        try:
            while not self._done():
                try:
                    message = self._receive()
                    failures = 0
                except RuntimeError as exc:
                    failures += 1
                    if not self.survive_peer_loss or failures > 20:
                        raise
                    reason = str(exc).splitlines()[0][:100]
                    log.warning("ps inbox: a receive failed (%s); a worker probably died", reason)
                    time.sleep(0.05)
                    continue
                self._queue.put(message)
        except BaseException as exc:  # handed to the scheduler thread, which raises it
            self._queue.put(exc)
