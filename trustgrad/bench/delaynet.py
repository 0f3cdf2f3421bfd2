"""A network with a set one-way delay, for latency benchmarks: one network namespace per rank, joined by a userspace
forwarder that holds every packet for the delay (needs root and ``ip``).

Why userspace: this machine's kernel has no ``netem`` (``CONFIG_NET_SCH_NETEM`` is not set and there are no modules to
load: ``tc qdisc add dev lo root netem delay 10ms`` in a namespace answers "Specified qdisc kind is unknown";
docs/multihost.md, "Latency"). So every namespace gets a TUN device on one private /24, the forwarder (a thread of the
caller) owns the devices' file descriptors, reads each IP packet, and writes it to the destination's device ``delay``
seconds later, in arrival order. Every packet pays the delay once, ACKs included: a round trip costs two delays, as on
a real link. The MTU is 64000 so a message of tens of KB is a single packet (a Python forwarder forwards a few tens of
thousands of packets per second; the delay, not the forwarder, must dominate).

Namespaces are named uniquely and removed in a ``finally``, with their devices, even when the benchmark fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import logging
import os
import secrets
import select
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["Node", "delayed_network", "unavailable"]

log = logging.getLogger(__name__)

_TUNSETIFF = 0x400454CA  # _IOW('T', 202, int) of <linux/if_tun.h>
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000
MTU = 64000


@dataclass(frozen=True)
class Node:
    """One rank's "machine": its namespace, its address and the device that carries it."""

    ns: str
    addr: str
    dev: str

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _check(done: subprocess.CompletedProcess) -> None:
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(done.args)}: {done.stderr.strip()}")


def unavailable() -> str | None:
    """Why the delayed network cannot be built here (None when it can)."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces and TUN devices needs root"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (no TUN support)"
    return None


class _Forwarder(threading.Thread):
    """Reads packets from every device and writes each to its destination's device ``delay`` seconds later."""

    def __init__(self, fds: dict[bytes, int], delay: float):
        super().__init__(name="delaynet-forwarder", daemon=True)
        self.fds, self.delay = fds, delay  # destination IPv4 address (4 bytes) -> its device's descriptor
        self.by_fd = list(fds.values())
        self._stop_r, self._stop_w = os.pipe()
        self.forwarded = self.dropped = 0

    def run(self) -> None:
        due: list[tuple[float, int, int, bytes]] = []  # (when, arrival order, fd, packet)
        order = 0
        while True:
            wait = None if not due else max(0.0, due[0][0] - time.monotonic())
            ready, _, _ = select.select([*self.by_fd, self._stop_r], [], [], wait)
            if self._stop_r in ready:
                return
            now = time.monotonic()
            for fd in ready:
                packet = os.read(fd, 65536)
                out = self.fds.get(packet[16:20]) if len(packet) >= 20 and packet[0] >> 4 == 4 else None
                if out is None:  # not IPv4 to one of ours (e.g. IPv6 router solicitations): a real link drops it too
                    self.dropped += 1
                    continue
                heapq.heappush(due, (now + self.delay, order, out, packet))
                order += 1
            now = time.monotonic()
            while due and due[0][0] <= now:
                _, _, fd, packet = heapq.heappop(due)
                with contextlib.suppress(OSError):  # a device going away at teardown
                    os.write(fd, packet)
                self.forwarded += 1

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        self.join(timeout=5)
        os.close(self._stop_r)
        os.close(self._stop_w)


@contextlib.contextmanager
def delayed_network(nodes: int, delay: float) -> Iterator[list[Node]]:
    """``nodes`` namespaces on one /24 whose every packet between them is delayed ``delay`` seconds one way."""
    reason = unavailable()
    if reason is not None:
        raise ConfigError(f"the latency benchmark needs network namespaces: {reason}")
    tag = f"tgd{os.getpid() % 100000}{secrets.token_hex(2)}"
    subnet = f"10.{150 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
    made: list[str] = []
    fds: dict[bytes, int] = {}
    forwarder = None
    try:
        out = []
        for i in range(nodes):
            node = Node(f"{tag}n{i}", f"{subnet}.{i + 1}", f"{tag}t{i}"[-15:])
            _check(_ip("netns", "add", node.ns))
            made.append(node.ns)
            fd = os.open("/dev/net/tun", os.O_RDWR)
            fds[bytes(int(x) for x in node.addr.split("."))] = fd
            fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", node.dev.encode(), _IFF_TUN | _IFF_NO_PI))
            _check(_ip("link", "set", node.dev, "netns", node.ns))  # the descriptor stays ours
            _check(_ip("-n", node.ns, "link", "set", "lo", "up"))
            _check(_ip("-n", node.ns, "link", "set", node.dev, "mtu", str(MTU), "up"))
            _check(_ip("-n", node.ns, "addr", "add", f"{node.addr}/24", "dev", node.dev))
            out.append(node)
        forwarder = _Forwarder(fds, delay)
        forwarder.start()
        yield out
    finally:
        if forwarder is not None:
            forwarder.stop()
            log.info("delaynet: %d packets forwarded, %d dropped", forwarder.forwarded, forwarder.dropped)
        for fd in fds.values():
            os.close(fd)
        for ns in made:
            _ip("netns", "del", ns)
