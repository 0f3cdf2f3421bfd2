"""Fuzz ``trustgrad.protect.codecs.ckks.parse_decryption_report``: what a worker tells the ps server about the partial
decryptions it received (threshold keys; docs/wire.md).

The property: anything that is not ``{"invalid": [ranks]}`` naming live workers other than the reporter is refused
(``None``: the server excludes the reporter), within the size budget, never a crash, recursion or traceback; an
accepted mutant must name only live workers other than the reporter, each once.
"""

from __future__ import annotations

import json

from tests.fuzz.harness import Finding
from trustgrad.protect.codecs.ckks import MAX_REPORT_BYTES, parse_decryption_report

NAME = "decryption_report"
RANK, LIVE = 2, [1, 2, 3, 4]

_ODD = [None, True, False, -1, 0, 2, 5, 2**63, 1.5, 3.0, float("nan"), "3", [], {}, [3], "x" * 100]


def setup(workdir):
    return json.dumps({"invalid": [3]}).encode()


def _structural(raw: bytes, rng) -> bytes:
    body = json.loads(raw)
    op = rng.randrange(4)
    if op == 0:
        body["invalid"] = [rng.choice(_ODD + [rng.randrange(-3, 8)]) for _ in range(rng.randint(0, 6))]
    elif op == 1:
        body[rng.choice(["extra", "invalid", "Invalid"])] = rng.choice(_ODD)
    elif op == 2:
        body = rng.choice([[body], "report", 3, None, {}])
    else:
        body["invalid"] = rng.choice(_ODD)
    return json.dumps(body).encode()


def _bytes(raw: bytes, rng) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 6)):
        pos = rng.randrange(len(data) + 1)
        if rng.random() < 0.5 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        else:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
    return bytes(data)


def _extreme(raw: bytes, rng) -> bytes:
    kind = rng.randrange(3)
    if kind == 0:
        depth = rng.randint(10_000, 200_000)
        return b'{"invalid":' + b"[" * depth + b"]" * depth + b"}"
    if kind == 1:
        return b" " * (MAX_REPORT_BYTES + rng.randint(1, 1024)) + raw
    return json.dumps({"invalid": [3] * rng.randint(1, 20_000)}).encode()


def case(state, rng):
    raw = rng.choice([_structural, _bytes, _extreme])(state, rng)
    accused = parse_decryption_report(raw, RANK, LIVE)
    if accused is None:
        return "refused"
    if any(type(r) is not int or r not in LIVE or r == RANK for r in accused) or len(set(accused)) != len(accused):
        raise Finding("silent-accept", f"accepted a report naming {accused!r}")
    return "accepted"
