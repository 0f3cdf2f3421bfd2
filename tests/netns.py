"""Two "machines" on this one: network namespaces joined by a veth pair, for multi-host tests (needs root).

``two_hosts()`` makes two namespaces with unique names (so parallel test runs never share one), each with loopback
and one end of a veth pair on a private /24 it invents; it yields them and removes both in a ``finally`` even when the
test fails (removing a namespace removes its veth end, and the pair goes with it). Only addresses inside these
namespaces are ever targets. ``Host.run`` starts a process inside a namespace in its own process group so the test
can end it (and its children: torchrun's workers) by that group's id.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["Host", "two_hosts", "unavailable", "stop"]


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None when they can): the reason a skipped test states."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"tgprobe{os.getpid()}{secrets.token_hex(3)}"
    made = _ip("netns", "add", probe)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()[:200]}"
    _ip("netns", "del", probe)
    return None


@dataclass(frozen=True)
class Host:
    ns: str
    addr: str
    dev: str

    def run(self, argv: list[str], env: dict[str, str], cwd: str, log: str) -> subprocess.Popen:
        """``argv`` inside this namespace, stdout and stderr to the file ``log``, in a process group of its own."""
        with open(log, "w") as fh:
            return subprocess.Popen(
                ["ip", "netns", "exec", self.ns, *argv],
                stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True,
            )  # fmt: skip

    def link(self, up: bool) -> None:
        """Bring this host's end of the pair down (a cut cable: no reset, packets just stop) or up again."""
        done = _ip("-n", self.ns, "link", "set", self.dev, "up" if up else "down")
        if done.returncode != 0:
            raise RuntimeError(f"ip link set {self.dev} in {self.ns}: {done.stderr.strip()}")


def stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """End ``proc`` and everything it started (its process group), politely first."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):  # torchrun's workers may outlive their agent: the group goes too
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)


@contextlib.contextmanager
def two_hosts() -> Iterator[tuple[Host, Host]]:
    tag = f"tg{os.getpid() % 100000}{secrets.token_hex(3)}"
    subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
    hosts = (Host(f"{tag}a", f"{subnet}.1", f"{tag}a"[-15:]), Host(f"{tag}b", f"{subnet}.2", f"{tag}b"[-15:]))
    made: list[str] = []
    try:
        for h in hosts:
            _check(_ip("netns", "add", h.ns))
            made.append(h.ns)
            _check(_ip("-n", h.ns, "link", "set", "lo", "up"))
        a, b = hosts
        _check(_ip("-n", a.ns, "link", "add", a.dev, "type", "veth", "peer", "name", b.dev, "netns", b.ns))
        for h in hosts:
            _check(_ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", h.dev))
            h.link(up=True)
        yield hosts
    finally:
        for ns in made:
            _ip("netns", "del", ns)


def _check(done: subprocess.CompletedProcess) -> None:
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(done.args)}: {done.stderr.strip()}")
