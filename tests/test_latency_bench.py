"""``trustgrad bench latency``'s network: every packet between namespaces is held for the delay, one way; its arguments.

The benchmark's figures are never asserted (timings are measured, printed, and quoted in docs/multihost.md); what is
checked here is that the delay it claims is the delay packets get (a TCP round trip costs two delays, not zero and not
four), that its namespaces go away, and that bad arguments are one line and exit code 2.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from trustgrad.bench import delaynet
from trustgrad.cli import main

_ECHO = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("{addr}", 5000)); s.listen()
print("listening", flush=True)
c, _ = s.accept()
while data := c.recv(1 << 16):
    c.sendall(data)
"""
_PING = """
import socket, time
s = socket.create_connection(("{addr}", 5000), timeout=30)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(5):
    t = time.perf_counter(); s.sendall(b"x" * 1000); n = 0
    while n < 1000:
        n += len(s.recv(1 << 16))
    rtts.append(time.perf_counter() - t)
print(min(rtts))
"""


def _round_trip(delay: float) -> tuple[float, list[str]]:
    """The best of 5 TCP round trips of 1000 bytes between two namespaces, and the namespaces' names."""
    with delaynet.delayed_network(2, delay) as (a, b):
        server = subprocess.Popen(
            b.command([sys.executable, "-c", _ECHO.format(addr=b.addr)]), stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout.readline().strip() == "listening"
            ping = subprocess.run(
                a.command([sys.executable, "-c", _PING.format(addr=b.addr)]), capture_output=True, text=True, timeout=60
            )
            assert ping.returncode == 0, ping.stderr
            return float(ping.stdout), [a.ns, b.ns]
        finally:
            server.kill()
            server.wait(5)


@pytest.mark.skipif(delaynet.unavailable() is not None, reason=f"needs namespaces: {delaynet.unavailable()}")
def test_a_round_trip_costs_two_delays_and_the_namespaces_go_away():
    rtt, names = _round_trip(0.050)
    assert 0.100 <= rtt < 0.100 + 0.040, rtt  # two one-way delays, plus the forwarder's and the stacks' moments
    rtt0, _ = _round_trip(0.0)
    assert rtt0 < 0.020, rtt0
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    assert not any(name in listed for name in names), listed


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--delays-ms", "-5"], "--delays-ms must be within 0..1000"),
        (["--workers", "99"], "--workers must be within 2..8"),
        (["--patterns", "nope"], "invalid choice: 'nope'"),
        (["--epochs", "1"], "--epochs must be within 2..20"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_code_2(flags, message, capsys):
    assert main(["bench", "latency", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
