"""The parameter server's wire protocol over point-to-point tensors, and the server's inbox.

Messages (every one goes through ``Comm``, so bytes are counted):

- worker -> server, tag ``PUSH``: a float64 header ``[kind, step, version, nbytes, loss]``; for ``kind == GRADIENT``
  it is followed, tag ``PAYLOAD``, by ``nbytes`` of encoded gradient (a codec may make these ciphertext bytes).
  ``DONE`` says a worker has finished; ``ACK`` is a worker's last message, answering ``BYE`` or ``DROPPED``.
- server -> worker, tag ``REPLY``: an int64 header ``[status, version, clock]``; for ``OK`` followed by the model's
  parameters (float32). ``DROPPED`` tells a worker the run goes on without it; ``BYE`` ends the run. ``SERVICE``
  asks a key party for work before the answer (partial decryptions, re-keying; ``ps.blind``).

Every worker -> server message (``PUSH``, ``PAYLOAD``, and the codecs' answers) travels over that worker's bounded
link (``transport``), not gloo: gloo aborts a receiver sent more than it posted, and the server must survive any
worker. A message that breaks the link's framing fails that link ``refused``: the inbox reports ``REFUSED`` and the
server excludes the worker under every schedule; an ended or silent link is ``LOST`` as before.

Why one receive thread per worker: the server must take messages in arrival order yet notice a silent worker after
``--worker-timeout``, and one stalled sender must cost only itself. A gloo receive cannot be cancelled (measured here,
torch 2.13: a message landing in a receive whose wait had timed out killed the process), so the server never times out
a receive it still wants: each worker has a thread that blocks on that worker's next message (bounded by the job's
``--timeout``) and feeds one queue, and the scheduler waits on the queue with Python timeouts. A header and its payload
come from the same sender on the same thread, so a worker cut off between the two (a link down on another machine)
blocks its own thread only; the old single receive-from-any thread waited up to ``--timeout`` for the cut-off
worker's payload while the healthy workers' pushes sat unread and their deadlines passed.

Why separate process groups under ``async`` / ``ssp``: a gloo wait that times out closes every connection of its
process group (``UnboundBuffer::waitRecv`` signals the whole context), so on the job's group one cut-off worker would
take the healthy ones down with it. Each worker talks to the server over a two-rank group of its own (``open_links``);
a timeout there closes that worker's connection only (measured: the other pairs and the job's group kept working).
``sync`` (and everything encrypted, which runs sync) stays on the job's group: there a lost worker fails the run
anyway, and the blind server's service requests share the reply channel.

Every thread ends with its worker's last message (``ACK``: after ``BYE``, or after ``DROPPED``) or, for a worker that
cannot be reached, with ``LOST``; at the end the server closes the groups of dropped workers that never said goodbye
(``Server._close_dropped``), so no receive it posted is left waiting for a peer that may still speak. Headers are
untrusted: ``parse_push_header`` checks them before anything is allocated.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ...comm import Comm
from ...errors import LaunchError
from ...launch import RankContext, engine_message
from ...tags import BYE, DROPPED, OK, PS_CLOSE, PS_PAYLOAD, PS_PUSH, PS_REPLY, SERVICE
from .transport import LinkError

__all__ = [
    "Inbox", "Message", "PUSH", "PAYLOAD", "REPLY", "GRADIENT", "DONE", "ACK", "LOST", "REFUSED", "OK", "DROPPED",
    "BYE", "SERVICE", "open_links", "parse_push_header", "push_header",
]  # fmt: skip

log = logging.getLogger(__name__)

# tags, and the server's reply statuses (SERVICE: it asks a key party for work first), all in ``trustgrad.tags``
PUSH, PAYLOAD, REPLY, CLOSE = PS_PUSH, PS_PAYLOAD, PS_REPLY, PS_CLOSE
GRADIENT, DONE, ACK = 1, 2, 3  # worker message kinds
LOST = -1  # never on the wire: the inbox's note that a worker's connection failed (``Message.reason`` says how)
REFUSED = -2  # never on the wire: what the worker sent broke the bounded link's framing (``transport``)
HEADER = 5
_KINDS = (GRADIENT, DONE, ACK)


@dataclass(frozen=True)
class Message:
    src: int
    kind: int
    step: int
    version: int
    loss: float
    payload: bytes = b""
    reason: str = ""  # LOST: why the worker's connection failed


def push_header(kind: int, step: int = 0, version: int = 0, nbytes: int = 0, loss: float = 0.0) -> torch.Tensor:
    return torch.tensor([kind, step, version, nbytes, loss], dtype=torch.float64)


def parse_push_header(values: list[float], src: int, max_payload: int) -> tuple[int, int, int, int, float]:
    """``[kind, step, version, nbytes, loss]`` as a worker sent it -> checked ints (``LaunchError`` naming the worker).

    The fields are float64 on the wire: NaN, infinities, fractions and negatives are refused here rather than reaching
    ``int()`` or an allocation; a gradient must announce 1..``max_payload`` bytes; ``loss`` may be anything (a
    diverging worker reports inf or NaN honestly).
    """
    if len(values) != HEADER:
        raise LaunchError(f"ps: worker rank {src} sent a header of {len(values)} fields, expected {HEADER}", rank=src)
    kind, step, version, nbytes, loss = values
    for name, v in (("kind", kind), ("step", step), ("version", version), ("nbytes", nbytes)):
        if not (math.isfinite(v) and v == int(v) and 0 <= v < 2**53):
            raise LaunchError(f"ps: worker rank {src} sent a header whose {name} is {v!r}", rank=src)
    if int(kind) not in _KINDS:
        raise LaunchError(f"ps: worker rank {src} sent unknown message kind {int(kind)}", rank=src)
    if int(kind) == GRADIENT and not 0 < nbytes <= max_payload:
        raise LaunchError(
            f"ps: worker rank {src} announced a gradient of {int(nbytes)} bytes (1..{max_payload} allowed)", rank=src
        )
    return int(kind), int(step), int(version), int(nbytes), float(loss)


class _PairComm(Comm):
    """A ``Comm`` over a two-rank group; what it sends is counted on the rank's own ``Comm`` (one total per rank)."""

    def __init__(self, parent: Comm, group: dist.ProcessGroup):
        super().__init__(RankContext(parent.rank, parent.world_size, 0, "pair"), parent.timeout, group)
        self.parent = parent

    def _count(self, nbytes: int | float) -> None:
        self.parent._count(nbytes)


def open_links(comm: Comm, workers: int, separate: bool) -> dict[int, Comm]:
    """This rank's channel to each peer it exchanges ps messages with: the server gets one per worker rank, a worker
    one to rank 0. ``separate``: a two-rank process group per worker (every rank of the job must call this, in the same
    place, since creating a group is collective); otherwise the job's own ``comm`` everywhere."""
    peers = range(1, workers + 1) if comm.rank == 0 else [0] if 1 <= comm.rank <= workers else []
    if not separate:
        return {p: comm for p in peers}
    links: dict[int, Comm] = {}
    for w in range(1, workers + 1):
        group = dist.new_group([0, w])
        if comm.rank in (0, w):
            links[w if comm.rank == 0 else 0] = _PairComm(comm, group)
    return links


class Inbox:
    """One receive thread per worker (``links``: worker rank -> channel); ``get(timeout)`` hands messages out in
    arrival order. A worker whose channel fails is reported once as a ``LOST`` message, and its thread ends."""

    def __init__(self, links: dict[int, Comm], max_payload: int):
        self.max_payload = max_payload
        self._queue: queue.Queue[Message] = queue.Queue()
        self.threads = {
            src: threading.Thread(target=self._run, args=(src, link), name=f"ps-inbox-{src}", daemon=True)
            for src, link in sorted(links.items())
        }
        for t in self.threads.values():
            t.start()

    def get(self, timeout: float) -> Message | None:
        """The next message, or None after ``timeout`` seconds."""
        try:
            return self._queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def _receive(self, src: int, link: Comm) -> Message:
        header = torch.zeros(HEADER, dtype=torch.float64)
        link.recv(header, src, PUSH)
        kind, step, version, nbytes, loss = parse_push_header(header.tolist(), src, self.max_payload)
        payload = b""
        if kind == GRADIENT:  # the payload comes from this sender, on this thread: no one else waits for it
            buf = torch.empty(nbytes, dtype=torch.uint8)
            link.recv(buf, src, PAYLOAD)
            payload = buf.numpy().tobytes()
        return Message(src, kind, step, version, loss, payload)

    def _run(self, src: int, link: Comm) -> None:
        while True:
            try:
                message = self._receive(src, link)
            except (RuntimeError, LaunchError) as exc:  # the link: closed, timed out or refused; or a malformed header
                refused = isinstance(exc, LinkError) and exc.refused
                reason = str(exc) if refused else engine_message(exc)
                self._queue.put(Message(src, REFUSED if refused else LOST, 0, 0, math.nan, reason=reason))
                return
            self._queue.put(message)
            if message.kind == ACK:  # the worker's last message
                return
