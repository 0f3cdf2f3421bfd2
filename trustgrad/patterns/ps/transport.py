"""The bounded transport of everything a ps worker sends its server: each message is bounded by the receiver first.

Why: gloo aborts the receiving process when a peer sends a tensor larger than the receive posted for it (SIGABRT in
gloo's I/O thread, which no Python code can catch; docs/architecture.md §4), so over gloo one worker could stop the
server with a single frame. Here each worker's messages to the server travel over a TCP connection of its own, framed
by the standard library's ``multiprocessing.connection`` (a length word; ``recv_bytes(maxlength)`` refuses a longer
message before allocating it; its pickling ``send``/``recv`` are never used). A message is two frames: its tag (8
bytes) and its body, read only once a receive for that tag is posted and bounded by the size that receive expects.

A body longer or shorter than posted, a garbage length word, an unknown tag, a message no receive asks for within the
job's timeout, or a message that stops half-way for ``stall`` seconds (``SO_RCVTIMEO`` on the socket: each read that
gets no byte for that long fails) makes that worker's link fail *refused*, with a one-line reason naming it; the end
of the stream or a receive that waits out the job's timeout makes it fail *lost*. Either way only that worker's link
is closed (the server excludes or drops the worker, ``Inbox``), never the server.

Only worker -> server messages with a tag in ``BOUNDED`` travel here (``BoundedComm`` routes them; both sides route
by the same rule, so a sender and its receiver always agree). Server -> worker traffic, collectives and key set-up stay
on gloo: a malicious server is the privacy threat CKKS answers, and the hole closed here is workers stopping the
server. Bytes are counted as before (the tensors' bytes, not the 12-16 bytes of framing per message).

Set-up (``open_wire``; every rank of the job calls it in the same place): the server listens on an ephemeral port of
the address its workers reach it at (the loopback under a local launch; ``MASTER_ADDR`` under torchrun, the rank-0
host, which the ps server is) and sends each worker over gloo a 32-byte secret of its own with that address (server ->
worker: no receive of the server's is exposed). The worker connects and sends its rank and secret in one bounded
frame; the server accepts exactly one connection per worker rank, with that rank's secret, until the job's timeout. A
worker that never connects has a link that failed at set-up (the server then treats it as lost).
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import logging
import os
import secrets
import socket
import struct
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from ...comm import Comm
from ...launch import RankContext, under_torchrun
from ...tags import BLIND, DECRYPTION_STATUS, PS_PAYLOAD, PS_PUSH, PS_WIRE, REPUSH

__all__ = ["BOUNDED", "BoundedComm", "LinkError", "RefusedLink", "Wire", "open_wire"]

log = logging.getLogger(__name__)

#: the tags of worker -> server messages: pushes and their payloads, re-pushes, decryption reports, blind answers
BOUNDED = frozenset({PS_PUSH, PS_PAYLOAD, REPUSH, DECRYPTION_STATUS, BLIND})
_TAG = struct.Struct("<q")
_HELLO = struct.Struct("<q32s")  # rank, secret
_ADDRESS = 256  # bytes for "host port" in the set-up message
_SETUP = 32 + _ADDRESS


class LinkError(RuntimeError):
    """A worker's link failed (a ``RuntimeError``, as gloo's failures are, so callers handle both alike).
    ``refused``: what the worker sent broke the framing (its fault); otherwise it went silent or away."""

    def __init__(self, message: str, rank: int | None = None, refused: bool = False):
        super().__init__(message)
        self.rank, self.refused = rank, refused


def _timeouts(conn: Connection, receive: float | None = None, send: float | None = None) -> socket.socket:
    """Per-read / per-write timeouts on ``conn``'s socket; returns a duplicate of the socket (closing it leaves
    ``conn`` open) through which the connection can also be shut down from another thread."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    for option, seconds in ((socket.SO_RCVTIMEO, receive), (socket.SO_SNDTIMEO, send)):
        if seconds is not None:
            whole = int(seconds)
            sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("ll", whole, int((seconds - whole) * 1e6)))
    return sock


class RefusedLink(LinkError, ValueError):
    """What the worker sent broke the framing. Also a ``ValueError``, as ``Comm.recv_bytes``' refusal of an announced
    size past its limit is: codecs that exclude a worker for that (a decryption report, a shown partial) exclude it
    for this too."""


class _Inlet:
    """The server's end of one worker's link: a thread reads each message once a receive for its tag is posted."""

    def __init__(self, rank: int, timeout: float, stall: float, conn: Connection | None = None, failure: str = ""):
        self.rank, self.timeout, self.stall = rank, timeout, stall
        self._cv = threading.Condition()
        self._posted: dict[int, int] = {}  # tag -> bytes the posted receive expects
        self._arrived: dict[int, bytes] = {}
        self.failure: LinkError | None = LinkError(failure, rank) if failure else None
        self._conn, self._sock = conn, None
        if conn is not None:
            self._sock = _timeouts(conn, receive=stall)
            threading.Thread(target=self._read, name=f"ps-link-{rank}", daemon=True).start()

    def recv(self, tag: int, nbytes: int) -> bytes:
        """The body of this worker's next message with ``tag``, exactly ``nbytes`` long (else the link fails)."""
        with self._cv:
            if self.failure is None:
                self._posted[tag] = nbytes
                self._cv.notify_all()
                self._cv.wait_for(lambda: tag in self._arrived or self.failure is not None, self.timeout)
                self._posted.pop(tag, None)
            if tag in self._arrived:
                return self._arrived.pop(tag)
        if self.failure is None:  # as a timed-out gloo receive closes its connection: nothing may land later
            self.fail(f"worker rank {self.rank} sent nothing for {self.timeout:g} s")
        raise self.failure  # type: ignore[misc]

    def fail(self, reason: str, refused: bool = False) -> None:
        """Fail the link (first reason wins) and shut the connection, which also ends the reading thread."""
        with self._cv:
            if self.failure is None:
                self.failure = (RefusedLink if refused else LinkError)(reason, self.rank, refused)
                if refused:
                    log.warning("ps: refused worker rank %d's link: %s", self.rank, reason)
            self._cv.notify_all()
        if self._sock is not None:
            with contextlib.suppress(OSError):  # already closed (by the peer, or by the reading thread)
                self._sock.shutdown(socket.SHUT_RDWR)

    def _read(self) -> None:
        conn, rank = self._conn, self.rank
        assert conn is not None and self._sock is not None
        try:
            while self.failure is None:
                conn.poll(None)  # idle: no limit here; a posted receive has its own
                head = self._frame(_TAG.size, "a tag")
                if head is None:
                    return
                (tag,) = _TAG.unpack(head)
                if tag not in BOUNDED:
                    return self.fail(f"worker rank {rank} sent a message of unknown tag {tag}", refused=True)
                with self._cv:
                    if not self._cv.wait_for(functools.partial(self._expects, tag), self.timeout):
                        return self.fail(f"worker rank {rank} sent a message (tag {tag}) no receive asked for "
                                         f"within {self.timeout:g} s", refused=True)  # fmt: skip
                    if self.failure is not None:
                        return
                    nbytes = self._posted[tag]
                body = self._frame(nbytes, f"a message of tag {tag}")
                if body is None:
                    return
                with self._cv:
                    self._arrived[tag] = body
                    self._cv.notify_all()
        finally:
            self._sock.close()
            conn.close()

    def _expects(self, tag: int) -> bool:
        """A receive for ``tag`` is posted and free (or the link failed): the message's body may be read."""
        return (tag in self._posted and tag not in self._arrived) or self.failure is not None

    def _frame(self, nbytes: int, what: str) -> bytes | None:
        """One frame of exactly ``nbytes``; None (the link failed, with the reason) otherwise."""
        assert self._conn is not None
        try:
            data = self._conn.recv_bytes(nbytes)  # a longer length word raises before anything is allocated
        except EOFError:
            self.fail(f"worker rank {self.rank} closed its link")
            return None
        except BlockingIOError:  # SO_RCVTIMEO: no byte for ``stall`` seconds in the middle of a frame
            self.fail(f"worker rank {self.rank} stopped in the middle of {what} for {self.stall:g} s", refused=True)
            return None
        except OSError as exc:
            bad_length = "bad message length" in str(exc)  # CPython's refusal of a length word over the bound
            reason = "longer than expected or a garbage length" if bad_length else exc
            if self.failure is None:  # else our own shutdown
                self.fail(f"worker rank {self.rank} sent {what} of the wrong size ({reason}; {nbytes} bytes "
                          "expected)", refused=bad_length)  # fmt: skip
            return None
        if len(data) != nbytes:
            self.fail(f"worker rank {self.rank} sent {what} of {len(data)} bytes, {nbytes} expected", refused=True)
            return None
        return data


class _Outlet:
    """A worker's end of its link to the server."""

    def __init__(self, conn: Connection, timeout: float):
        self._conn, self._lock = conn, threading.Lock()
        self._sock = _timeouts(conn, send=timeout)  # a server that stops reading fails our send after the timeout

    def send(self, tag: int, body: bytes | memoryview) -> None:
        with self._lock:
            try:
                self._conn.send_bytes(_TAG.pack(tag))
                self._conn.send_bytes(body)
            except (OSError, ValueError) as exc:  # ValueError: already closed here
                raise LinkError(f"the link to the ps server failed ({exc})") from None

    def bad_frame(self, kind: str, tag: int) -> None:
        """Tests only (``faults``): what a worker running its own code could send instead of a message."""
        with self._lock, contextlib.suppress(OSError):  # the server may close the link before it is all sent
            if kind == "oversized":  # a tag, then a body far longer than the receive posted for it
                self._conn.send_bytes(_TAG.pack(tag))
                self._conn.send_bytes(bytes(1 << 20))
            elif kind == "truncated":  # a tag, then a body that announces 40 bytes and stops after 8
                self._conn.send_bytes(_TAG.pack(tag))
                os.write(self._conn.fileno(), struct.pack("!i", 40) + bytes(8))
            elif kind == "garbage":  # a length word of 2**64 - 1 where the tag's frame should start
                os.write(self._conn.fileno(), struct.pack("!i", -1) + b"\xff" * 8)
            else:
                raise ValueError(f"unknown bad frame {kind!r}")

    def close(self) -> None:
        self._sock.close()
        self._conn.close()


class Wire:
    """This rank's side of the bounded links: the server's inlets (worker rank -> inlet), or a worker's outlet."""

    def __init__(self, inlets: dict[int, _Inlet] | None = None, outlet: _Outlet | None = None):
        self.inlets, self.outlet = inlets or {}, outlet

    def wrap(self, comm: Comm) -> BoundedComm:
        return BoundedComm(comm, self)

    def close(self, rank: int | None = None) -> None:
        """Shut one worker's link (the server: a worker it dropped), or every link of this rank."""
        for r, inlet in self.inlets.items():
            if rank is None or r == rank:
                inlet.fail(f"worker rank {r}'s link was closed by the server")
        if self.outlet is not None and rank is None:
            self.outlet.close()


class BoundedComm(Comm):
    """``comm`` with the worker -> server messages of ``BOUNDED`` tags routed over the bounded links; everything else
    (and all counting) is ``comm``'s. ``send_bytes``/``recv_bytes`` are ``Comm``'s, built on these ``send``/``recv``."""

    def __init__(self, inner: Comm, wire: Wire):
        super().__init__(RankContext(inner.rank, inner.world_size, 0, "bounded"), inner.timeout, inner.group)
        self.inner, self.wire = inner, wire

    def __getattr__(self, name: str) -> Any:  # what a subclass of Comm adds (e.g. a pair's parent)
        inner = self.__dict__.get("inner")
        if inner is None:  # not built yet (copy, unpickling): no attribute to forward
            raise AttributeError(name)
        return getattr(inner, name)

    def _count(self, nbytes: int | float) -> None:
        self.inner._count(nbytes)

    def _routed(self, peer: int | None, tag: int) -> bool:
        if tag not in BOUNDED or peer is None:
            return False
        return peer in self.wire.inlets or (peer == 0 and self.wire.outlet is not None)

    def send(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> None:
        if not self._routed(dst, tag):
            return self.inner.send(tensor, dst, tag)
        assert self.wire.outlet is not None, "the server sends its workers nothing over the bounded links"
        flat = tensor.detach().contiguous().view(-1)
        self._count(flat.numel() * flat.element_size())
        self.wire.outlet.send(tag, flat.view(torch.uint8).numpy().tobytes())

    def recv(self, tensor: torch.Tensor, src: int | None = None, tag: int = 0) -> int:
        if not self._routed(src, tag):
            return self.inner.recv(tensor, src, tag)
        flat = tensor.view(-1).view(torch.uint8)
        data = self.wire.inlets[src].recv(tag, flat.numel())  # type: ignore[index]
        if data:  # straight into the tensor: a blind worker's samples are ~190 MB, held once more only while copied
            flat.numpy()[:] = np.frombuffer(data, dtype=np.uint8)
        return src  # type: ignore[return-value]

    def recv_bytes(
        self, src: int | None = None, tag: int = 0, max_bytes: int = 1 << 31, *, copy: bool = True
    ) -> tuple[bytes, int]:
        try:
            return super().recv_bytes(src, tag, max_bytes, copy=copy)
        except ValueError as exc:  # a size past the limit: its body is still on the link, which is no use any more
            if self._routed(src, tag) and not isinstance(exc, LinkError):
                self.wire.inlets[src].fail(f"worker {exc}", refused=True)  # type: ignore[index]
            raise

    def isend(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> Any:
        assert not self._routed(dst, tag), "bounded messages are sent with send"
        return self.inner.isend(tensor, dst, tag)

    def irecv(self, tensor: torch.Tensor, src: int, tag: int = 0) -> Any:
        assert not self._routed(src, tag), "bounded messages are received with recv"
        return self.inner.irecv(tensor, src, tag)

    def wait(self, work: Any, timeout: float | None = None) -> None:
        self.inner.wait(work, timeout)


def _host() -> tuple[str, str]:
    """(address to bind, address workers connect to)."""
    if under_torchrun() and os.environ.get("MASTER_ADDR"):
        host = os.environ["MASTER_ADDR"]
        try:  # the rank-0 host's own address: listen there only
            with socket.create_server((host, 0)):
                return host, host
        except OSError:  # a name of this host that binding refuses: every interface (workers need a secret)
            return "", host
    return "127.0.0.1", "127.0.0.1"


def open_wire(comm: Comm, workers: int, stall: float) -> Wire:
    """The bounded links between the server (rank 0) and workers 1..``workers``; ranks beyond (an auditor) get none.
    Every rank of the job calls this in the same place; ``stall``: seconds a half-read message may stop."""
    if comm.rank == 0:
        return _serve(comm, workers, stall)
    if not 1 <= comm.rank <= workers:
        return Wire()
    blob = torch.zeros(_SETUP, dtype=torch.uint8)
    comm.recv(blob, 0, PS_WIRE)
    data = blob.numpy().tobytes()
    host, port = data[32:].rstrip(b"\0").decode().rsplit(" ", 1)
    sock = socket.create_connection((host, int(port)), timeout=comm.timeout)
    sock.settimeout(None)
    conn = Connection(sock.detach())
    conn.send_bytes(_HELLO.pack(comm.rank, data[:32]))
    return Wire(outlet=_Outlet(conn, comm.timeout))


def _serve(comm: Comm, workers: int, stall: float) -> Wire:
    bind, host = _host()
    keys = {w: secrets.token_bytes(32) for w in range(1, workers + 1)}
    inlets: dict[int, _Inlet] = {}
    with socket.create_server((bind, 0), backlog=max(workers, 8)) as server:
        address = f"{host} {server.getsockname()[1]}".encode()
        sends = []
        for w, key in keys.items():
            blob = torch.frombuffer(bytearray(key + address.ljust(_ADDRESS, b"\0")), dtype=torch.uint8)
            sends.append((comm.isend(blob, w, PS_WIRE), blob))
        for work, _ in sends:
            comm.wait(work)
        deadline = time.monotonic() + comm.timeout
        while len(inlets) < workers and (left := deadline - time.monotonic()) > 0:
            server.settimeout(left)
            try:
                sock, peer = server.accept()
            except TimeoutError:
                break
            sock.settimeout(None)
            conn = Connection(sock.detach())
            rank = _hello(conn, keys, inlets, min(left, stall))
            if rank is None:
                log.warning("ps: refused a connection from %s: not a worker with its secret", peer)
                conn.close()
                continue
            inlets[rank] = _Inlet(rank, comm.timeout, stall, conn)
    for w in keys:
        if w not in inlets:
            inlets[w] = _Inlet(w, comm.timeout, stall, failure=f"worker rank {w} never connected its link")
    return Wire(inlets=inlets)


def _hello(conn: Connection, keys: dict[int, bytes], taken: dict[int, _Inlet], wait: float) -> int | None:
    """The worker rank a new connection proves it is (its first frame: rank and secret), or None."""
    probe = _timeouts(conn, receive=max(wait, 0.1))
    try:
        if not conn.poll(wait):
            return None
        rank, key = _HELLO.unpack(conn.recv_bytes(_HELLO.size))
    except (OSError, EOFError, struct.error):
        return None
    finally:
        probe.close()
    if rank in taken or rank not in keys or not hmac.compare_digest(key, keys[rank]):
        return None
    return rank
