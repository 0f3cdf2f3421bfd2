"""The isolated parser's side of :mod:`trustgrad.crypto.sandbox`: run as ``python -m trustgrad.crypto.sandbox_helper``.

Apart from ``sandbox`` so that the parent's module does not import the CKKS context it is used by (no import circle):
this process builds the receiver's context from the parameters it is sent, then parses each request's bytes under
the limits the request names and answers ok or the parser's error.
"""

from __future__ import annotations

import importlib
import json
import resource
import sys
from typing import Any

from trustgrad.crypto.context import Context
from trustgrad.crypto.layout import describe
from trustgrad.crypto.sandbox import PARAM_CLASSES, PARSERS, recv_frame, send_frame

__all__: list[str] = []


def _serve() -> None:  # pragma: no cover - runs in the helper process
    import openfhe

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    spec = json.loads(recv_frame(stdin, 1e9))
    cls = getattr(importlib.import_module(PARAM_CLASSES[spec["class"]]), spec["class"])
    Context(cls._from_json(spec["params"]))  # the receiver's context: the parse attaches to it
    while True:
        try:
            request = json.loads(recv_frame(stdin, 1e9))
            data = recv_frame(stdin, 1e9)
        except EOFError:
            return
        _limit(request["memory"], request["seconds"])
        try:
            obj = getattr(openfhe, PARSERS[request["kind"]])(data, openfhe.BINARY)
            reply: dict[str, Any] = {"ok": True}
            if request["kind"] == "ciphertext":
                reply["meta"] = {**describe(obj), "tag": str(obj.GetKeyTag())}
        except Exception as exc:  # OpenFHE's C++ exceptions arrive as RuntimeError and friends
            reply = {"ok": False, "error": str(exc) or type(exc).__name__}
        send_frame(stdout, json.dumps(reply).encode())


def _limit(memory: int, seconds: float) -> None:  # pragma: no cover - runs in the helper process
    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * resource.getpagesize()
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    want = size + memory
    resource.setrlimit(resource.RLIMIT_AS, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))
    used = resource.getrusage(resource.RUSAGE_SELF)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    cpu = int(used.ru_utime + used.ru_stime + seconds) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu if hard == resource.RLIM_INFINITY else min(cpu, hard), hard))


if __name__ == "__main__":
    _serve()
