"""A ps worker that breaks the framing of what it sends the server (an oversized message, one that stops half-way, a
garbage length word) is refused and named; the server survives and the honest workers finish (ps/transport.py).

Over gloo the first of these aborted the server (SIGABRT: docs/architecture.md §4). Real processes and sockets; the
malicious worker writes the broken bytes itself (``TRUSTGRAD_TEST_BAD_FRAME``, ``trustgrad.faults``).
"""

from __future__ import annotations

import socket
import struct
import threading
from multiprocessing.connection import Connection

import pytest

from trustgrad.comm import Comm
from trustgrad.config import RunConfig
from trustgrad.faults import FRAME_ENV
from trustgrad.launch import RankContext
from trustgrad.patterns.ps.transport import BoundedComm, LinkError, RefusedLink, Wire, _Inlet, _Outlet
from trustgrad.run import run
from trustgrad.tags import DECRYPTION_STATUS, PS_PAYLOAD, PS_PUSH

REASONS = {
    "oversized": "worker rank 2 sent a message of tag",
    "truncated": "worker rank 2 stopped in the middle of a message",
    "garbage": "worker rank 2 sent a tag of the wrong size (longer than expected or a garbage length",
}


def _ps(schedule: str = "sync", workers: int = 3, steps: int = 6, **extra) -> RunConfig:
    cfg = RunConfig(workers=workers, max_steps=steps, epochs=1, batch_size=16, seed=1, progress=False, timeout=60)
    return cfg.replace(pattern={"name": "ps", "schedule": schedule, "worker_timeout": 8.0}, **extra)


def _check(summary: dict, kind: str, steps: int) -> None:
    assert summary["dropped_workers"] == [1], summary  # rank 2 = worker 1
    reason = summary["dropped_reasons"]["1"]
    assert REASONS[kind] in reason and len(reason.splitlines()) == 1, reason
    assert summary["steps"] == steps  # the honest workers trained to the end


@pytest.mark.parametrize(
    "schedule, kind", [("sync", "oversized"), ("sync", "truncated"), ("sync", "garbage"), ("async", "oversized")]
)
def test_a_broken_frame_excludes_its_sender_and_the_server_survives(monkeypatch, schedule, kind):
    monkeypatch.setenv(FRAME_ENV, f"2@2:{kind}")
    s = run(_ps(schedule))
    _check(s.summary, kind, 6)
    if schedule == "sync":  # two honest gradients per round from step 2 on
        assert s.summary["gradients_applied"] == 3 * 2 + 2 * 4


def test_an_encrypted_run_with_threshold_keys_rekeys_without_the_sender(monkeypatch):
    """The survivors re-key (the sender held a share of the joint key) and the run goes on, as for a refused
    ciphertext (tests/test_wire_attacks.py)."""
    monkeypatch.setenv(FRAME_ENV, "2@2:oversized")
    s = run(_ps(steps=4).replace(crypto={"encrypt": "ckks", "keys": "threshold"}))
    _check(s.summary, "oversized", 4)
    assert s.summary["rekeys"]


# the link itself, over a socket pair: what the server's side makes of each broken message


def _pair(stall: float = 1.0) -> tuple[_Inlet, _Outlet, socket.socket]:
    a, b = socket.socketpair()
    raw = b.dup()
    return _Inlet(2, timeout=5.0, stall=stall, conn=Connection(a.detach())), _Outlet(Connection(b.detach()), 5.0), raw


def test_messages_arrive_by_tag_and_a_broken_one_fails_only_that_link():
    inlet, outlet, raw = _pair()
    outlet.send(PS_PUSH, b"h" * 40)
    outlet.send(PS_PAYLOAD, b"p" * 7)
    payload = []
    reader = threading.Thread(target=lambda: payload.append(inlet.recv(PS_PAYLOAD, 7)))
    reader.start()  # the payload's receive is posted first: the push waits for its own
    assert inlet.recv(PS_PUSH, 40) == b"h" * 40
    reader.join(5)
    assert payload == [b"p" * 7]
    outlet.send(PS_PUSH, b"x" * 41)  # one byte over: refused before it is read
    with pytest.raises(LinkError, match="wrong size") as err:
        inlet.recv(PS_PUSH, 40)
    assert err.value.refused and err.value.rank == 2
    with pytest.raises(LinkError):  # the link stays failed
        inlet.recv(PS_PAYLOAD, 7)
    raw.close()


@pytest.mark.parametrize(
    "wire, refused, needle",
    [
        (struct.pack("!i", 8) + struct.pack("<q", 12345), True, "unknown tag 12345"),
        (struct.pack("!i", 4) + b"abcd", True, "a tag of 4 bytes, 8 expected"),
        (struct.pack("!i", -1) + b"\xff" * 8, True, "garbage length"),
        (struct.pack("!i", 8) + struct.pack("<q", PS_PUSH) + struct.pack("!i", 40) + b"abc", True, "stopped"),
        (struct.pack("!i", -7), True, "a tag of 0 bytes"),
    ],
)
def test_every_broken_message_is_refused(wire, refused, needle):
    inlet, outlet, raw = _pair(stall=0.5)
    raw.sendall(wire)
    with pytest.raises(LinkError, match=needle) as err:
        inlet.recv(PS_PUSH, 40)
    assert err.value.refused is refused
    raw.close()
    outlet.close()


def test_a_worker_that_goes_away_is_lost_not_refused():
    inlet, outlet, raw = _pair()
    outlet.close()
    raw.close()
    with pytest.raises(LinkError, match="closed its link") as err:
        inlet.recv(PS_PUSH, 40)
    assert not err.value.refused


def test_a_refused_size_fails_the_link_and_reads_as_the_codecs_refusal():
    """``Comm.recv_bytes`` refuses an announced size past its limit (a ``ValueError``, which the ckks server turns
    into an exclusion); over a bounded link the body is still queued, so the link fails too, and its failure is a
    ``ValueError`` as well."""
    inlet, outlet, raw = _pair()
    server = BoundedComm(Comm(RankContext(0, 3, 0, "test"), 5.0), Wire(inlets={2: inlet}))
    outlet.send(DECRYPTION_STATUS, struct.pack("<q", 100))
    outlet.send(DECRYPTION_STATUS, bytes(100))
    with pytest.raises(ValueError, match="announced a payload of 100 bytes"):
        server.recv_bytes(2, DECRYPTION_STATUS, max_bytes=10)
    with pytest.raises(RefusedLink, match="worker rank 2 announced") as err:
        server.recv_bytes(2, DECRYPTION_STATUS, max_bytes=1000)
    assert isinstance(err.value, ValueError) and err.value.refused
    raw.close()
