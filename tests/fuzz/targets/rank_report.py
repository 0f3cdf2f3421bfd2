"""Fuzz ``trustgrad.reports.decode_report``: what a torchrun rank on another machine writes to the job's store.

The store is unauthenticated, so a report is bookkeeping a rank asserts about itself (its byte counters, steps,
statistics), not evidence: the property is that the coordinator refuses anything that is not a report of the rank
whose key it read, with one line, within the size budget, and never crashes, recurses or unpickles. An accepted mutant
must therefore still be a well-formed report of that rank that does not claim to be the coordinator's.
"""

from __future__ import annotations

import json

from tests.fuzz.harness import Finding
from trustgrad.errors import TrustgradError
from trustgrad.reports import MAX_REPORT_BYTES, decode_report, encode_report

NAME = "rank_report"
RANK = 2


def setup(workdir):
    honest = {
        "rank": RANK, "role": "worker", "steps": 420, "worker": 1, "train_seconds": 5.4, "bytes_sent": 15086480,
        "messages_sent": 1262, "seconds": 9.1, "stats": {"peers_skipped": 0, "consensus_trace": [0.1, 0.05]},
    }  # fmt: skip
    return encode_report(honest)


_ODD = [None, True, False, -1, 2**63, 1.5, float("nan"), "2", [], {}, "x" * 100]


def _structural(raw: bytes, rng) -> bytes:
    body = json.loads(raw)
    key = rng.choice(["rank", "coordinator", "bytes_sent", "messages_sent", "steps", "stats", "role", "extra"])
    body[key] = rng.choice(_ODD + [rng.randrange(-5, 5)])
    if rng.random() < 0.2:
        body = rng.choice([[body], "report", 3, None])
    return json.dumps(body).encode()


def _bytes(raw: bytes, rng) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(3)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif op == 1:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:
            del data[pos : pos + rng.randint(1, 16)]
    return bytes(data)


def _extreme(raw: bytes, rng) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:  # nesting deep enough to exhaust Python's recursion in json
        depth = rng.randint(10_000, 200_000)
        return b"[" * depth + b"]" * depth
    if kind == 1:  # over the budget
        return b" " * (MAX_REPORT_BYTES + rng.randint(1, 1024)) + raw
    if kind == 2:  # not UTF-8
        return b"\xff\xfe" + raw
    return json.dumps({"rank": RANK, "stats": {"x": "y" * rng.randint(1, 1 << 20)}}).encode()


def case(state, rng):
    raw = rng.choice([_structural, _bytes, _extreme])(state, rng)
    try:
        body = decode_report(raw, RANK)
    except TrustgradError as exc:
        if "\n" in str(exc):
            raise
        return "refused"
    bad = (
        body.get("rank") != RANK or body.get("coordinator")
        or any(not isinstance(body.get(k, 0), int) or isinstance(body.get(k, 0), bool) or body.get(k, 0) < 0
               for k in ("bytes_sent", "messages_sent", "steps"))
        or not isinstance(body.get("stats", {}), dict)
    )  # fmt: skip
    if bad:
        raise Finding("silent-accept", f"accepted a report that breaks the report's shape: {str(body)[:200]}")
    return "accepted"
