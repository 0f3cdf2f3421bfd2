"""Fuzz the ps server's bounded link (``trustgrad.patterns.ps.transport``): the byte stream a worker sends its server.

A worker controls every byte of its stream: the length words of ``multiprocessing.connection``'s frames (4 bytes, or
-1 then 8), the tags, where the stream ends. Each case writes a mutant of an honest stream (a push header of 40 bytes
and a payload of 64, each a tag frame then a body frame) into a socket pair, closes it, and receives the two messages
as the server's inbox does. A broken stream must fail the link with a one-line reason (refused, or lost when it ends
early); an accepted stream must deliver exactly the honest bodies (only the framing is mutated, and framing that
still parses to the same messages is harmless).
"""

from __future__ import annotations

import socket
import struct
from multiprocessing.connection import Connection

from tests.fuzz.harness import Finding
from trustgrad.patterns.ps.transport import LinkError, _Inlet
from trustgrad.tags import PS_PAYLOAD, PS_PUSH

NAME = "ps_frame"
HEADER, PAYLOAD = bytes(range(40)), bytes(range(100, 164))
_TAG = struct.Struct("<q")
_ODD = [0, 1, 7, 8, 9, 39, 40, 41, 63, 64, 65, 1 << 20, (1 << 31) - 1, -1, -2, -(1 << 31)]


def _frame(body: bytes, length: int | None = None, long: bool = False) -> list[bytes]:
    n = len(body) if length is None else length
    word = struct.pack("!i", -1) + struct.pack("!Q", n % (1 << 64)) if long else struct.pack("!I", n % (1 << 32))
    return [word, body]


def setup(workdir):
    return [(PS_PUSH, HEADER), (PS_PAYLOAD, PAYLOAD)]


def case(state, rng):
    frames: list[list[bytes]] = []
    for tag, body in state:
        frames += [_frame(_TAG.pack(tag)), _frame(body)]
    choice = rng.randrange(5)
    i = rng.randrange(len(frames))
    if choice == 0:  # a length word: any value, short or long form
        frames[i] = _frame(frames[i][1], rng.choice(_ODD + [rng.randrange(1 << 32)]), long=rng.random() < 0.3)
    elif choice == 1:  # a tag: another valid one, an unknown one, the wrong width
        tags = [PS_PUSH, PS_PAYLOAD, 0, -1, 1 << 40, rng.randrange(1 << 62)]
        body = _TAG.pack(rng.choice(tags))
        frames[i & ~1] = _frame(body[: rng.choice([8, 8, 4, 0])] if rng.random() < 0.3 else body)
    elif choice == 2:  # the same messages, a length word in the long form (still valid)
        frames[i] = _frame(frames[i][1], long=True)
    elif choice == 3:  # a frame dropped or repeated
        frames = frames[:i] + frames[i + 1 :] if rng.random() < 0.5 else frames[: i + 1] + frames[i:]
    stream = b"".join(b"".join(f) for f in frames)
    if choice == 4:  # the stream cut anywhere, or garbage after it
        cut = rng.randrange(len(stream) + 1)
        stream = stream[:cut] if rng.random() < 0.7 else stream + bytes(rng.randrange(256) for _ in range(12))
    a, b = socket.socketpair()
    inlet = _Inlet(3, timeout=0.5, stall=0.2, conn=Connection(a.detach()))
    try:
        b.sendall(stream)
        b.shutdown(socket.SHUT_WR)
        got = [inlet.recv(PS_PUSH, len(HEADER)), inlet.recv(PS_PAYLOAD, len(PAYLOAD))]
    except LinkError as exc:
        if "\n" in str(exc) or "worker rank 3" not in str(exc):
            raise Finding("traceback", f"unnamed or multi-line link error: {exc!r}") from None
        return "refused"
    finally:
        inlet.fail("case over")
        b.close()
    if got != [HEADER, PAYLOAD]:
        raise Finding("silent-accept", f"stream {stream[:80]!r}... delivered {got!r}")
    return "accepted"
