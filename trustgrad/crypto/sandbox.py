"""Parse OpenFHE bytes that no exact layout covers in a sacrificial helper process first.

Ciphertexts, partial decryptions and public keys are checked byte for byte against an exact layout before OpenFHE
parses them (:mod:`trustgrad.crypto.layout`). Evaluation keys (the relinearisation key, rotation-key maps and the
rounds that make them) are maps of key-switching keys whose layout varies with the indices and the key-switching
technique, and no layout of them is learnt. Their bytes are therefore parsed first by a helper process under an
address-space limit (RLIMIT_AS), a CPU-time limit (RLIMIT_CPU) and a wall-clock timeout. If the helper dies (signal),
runs out of time or memory, or OpenFHE raises there, the receiver gets a one-line ``CryptoError`` and never parses
the bytes itself; only bytes the helper parsed cleanly reach the receiver's own OpenFHE. OpenFHE's parse is
deterministic given the context, so bytes that did not crash the helper do not crash the receiver.

One helper per context and process, started on first use (about a second: a Python interpreter that imports
``openfhe`` and rebuilds the context from its public parameters) and reused for every later message; after a failure
it is restarted on the next use. What it costs per message is measured in docs/wire.md.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import IO, Any

from trustgrad.errors import CryptoError

__all__ = ["Sandbox", "sandbox_for", "PARSERS", "PARAM_CLASSES", "send_frame", "recv_frame"]

log = logging.getLogger(__name__)

#: what the helper can parse: kind -> the name of the ``openfhe`` function
PARSERS = {
    "ciphertext": "DeserializeCiphertextString",
    "public key": "DeserializePublicKeyString",
    "eval-mult key": "DeserializeEvalMultKeyString",
    "rotation keys": "DeserializeEvalAutomorphismKeyString",
    "eval key": "DeserializeEvalKeyString",
    "eval key map": "DeserializeEvalKeyMapString",
}
PARAM_CLASSES = {"CKKSParams": "trustgrad.crypto.params", "BlindParams": "trustgrad.blind.params"}
BASE_MEMORY = 1 << 30  # bytes a parse may allocate beyond the helper's size, plus 4x the payload (a parsed key map
# measured 2-3x its serialization)
BASE_SECONDS = 30.0  # CPU and wall seconds per parse, plus one per MB (a 215 MB rotation-key map parses in ~2 s)
_LEN = struct.Struct("<Q")


class Sandbox:
    """A persistent helper process that parses OpenFHE bytes for one context."""

    def __init__(self, params: Any) -> None:
        self.spec = {"class": type(params).__name__, "params": params._to_json()}
        self.proc: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()
        self.parses = self.restarts = 0

    def parse(self, kind: str, data: bytes | memoryview, what: str) -> dict[str, Any]:
        """Parse ``data`` as ``kind`` in the helper; a one-line ``CryptoError`` naming ``what`` unless it parsed.
        For a ciphertext, returns what it decrypts under (``layout.describe``) and its key tag."""
        if kind not in PARSERS:
            raise CryptoError(f"{what}: the isolated parser knows no {kind!r}")
        seconds = BASE_SECONDS + len(data) / 1e6
        request = {"kind": kind, "memory": BASE_MEMORY + 4 * len(data), "seconds": seconds}
        with self.lock:
            proc = self._helper()
            try:
                send_frame(proc.stdin, json.dumps(request).encode())  # type: ignore[arg-type]
                send_frame(proc.stdin, data)  # type: ignore[arg-type]
                reply = recv_frame(proc.stdout, seconds + 5.0, proc)  # type: ignore[arg-type]
            except (OSError, TimeoutError, EOFError) as exc:
                why = self._failure(proc, exc)
                raise CryptoError(f"{what}: the isolated parser {why}; the bytes were not parsed here") from None
        self.parses += 1
        status = json.loads(reply)
        if not status.get("ok"):
            detail = str(status.get("error", "failed")).strip().splitlines()
            raise CryptoError(f"{what}: parsing it failed in the isolated parser: {(detail or ['?'])[-1][:300]}")
        return dict(status.get("meta", {}))

    def close(self) -> None:
        with self.lock:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def _helper(self) -> subprocess.Popen[bytes]:
        if self.proc is not None and self.proc.poll() is None:
            return self.proc
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trustgrad.crypto.sandbox_helper"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        send_frame(self.proc.stdin, json.dumps(self.spec).encode())  # type: ignore[arg-type]
        log.debug("crypto sandbox started (pid %d)", self.proc.pid)
        return self.proc

    def _failure(self, proc: subprocess.Popen[bytes], exc: BaseException) -> str:
        """Why the helper failed, after making sure it is gone (the next parse starts a new one)."""
        if proc.poll() is None:
            proc.kill()
        code = proc.wait()
        self.proc = None
        self.restarts += 1
        if isinstance(exc, TimeoutError):
            return "ran out of time"
        if code < 0:
            name = signal.Signals(-code).name
            return f"was killed by {name}" + (" (its CPU-time limit)" if name == "SIGXCPU" else "")
        return f"stopped (exit code {code}; memory limit or crash)"


_SANDBOXES: dict[str, Sandbox] = {}
_GLOBAL = threading.Lock()


def sandbox_for(context: Any) -> Sandbox:
    """The helper of ``context`` in this process (one per context fingerprint)."""
    with _GLOBAL:
        box = _SANDBOXES.get(context.fingerprint)
        if box is None:
            box = _SANDBOXES[context.fingerprint] = Sandbox(context.params)
        return box


def send_frame(stream: IO[bytes], payload: bytes | memoryview) -> None:
    """A length-prefixed message; ``payload`` is written as it is (no copy of a key of hundreds of MB)."""
    stream.write(_LEN.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def recv_frame(stream: IO[bytes], timeout: float, proc: subprocess.Popen[bytes] | None = None) -> bytes:
    """One length-prefixed message; ``TimeoutError`` after ``timeout`` seconds (the helper is then killed)."""
    if proc is not None:
        timer = threading.Timer(timeout, lambda: proc.poll() is None and proc.kill())
        timer.start()
    started = time.monotonic()
    try:
        head = stream.read(_LEN.size)
        if len(head) < _LEN.size:
            if proc is not None and time.monotonic() - started >= timeout:
                raise TimeoutError
            raise EOFError
        (n,) = _LEN.unpack(head)
        body = stream.read(n)
        if len(body) < n:
            raise EOFError
        return body
    finally:
        if proc is not None:
            timer.cancel()


# -- the helper -----------------------------------------------------------------------------------------------------
