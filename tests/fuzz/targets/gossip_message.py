"""Fuzz target: a gossip peer's push-sum message and consensus report, as the receiver checks them.

A peer controls every float it sends (no checksum protects them from their own sender). The receiver's checks
(``patterns.gossip._invalid``, the overflow check of the mix, ``patterns.consensus._invalid_report``) must refuse
every message outside what an honest peer can send: a weight outside (0, W], non-finite parameters, a sum with ours
that overflows, peer flags other than 0/1. A message inside that domain is admitted: gossip claims no integrity for
its values (a Byzantine peer can steer the average; docs/faults.md), so an in-domain mutant is ``accepted`` and the
target checks that what was admitted is finite. A refusal is a returned reason, not an exception (the receiver
evicts the sender and goes on), so this target maps a reason to ``refused``.
"""

from __future__ import annotations

import math
import random
import struct

import torch

from trustgrad.patterns.consensus import _invalid_report
from trustgrad.patterns.gossip import _invalid

NAME = "gossip-message"
WORLD, N = 4, 64
_SPECIAL = [math.nan, math.inf, -math.inf, 0.0, -0.0, 3.4e38, -3.4e38, 1e-45, 4.0, 4.0000005, 1e30, -1.0]


def setup(workdir) -> dict:  # noqa: ANN001
    honest = torch.linspace(-1.0, 1.0, N)
    share = 1.0 / 3
    message = torch.cat([honest * share, torch.tensor([share])])
    report = torch.cat([honest, torch.tensor([1.0]), torch.tensor([1.0, 1.0, 0.0, 1.0])])
    return {"message": message, "report": report, "ours": honest * share}


def _mutate(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    t = t.clone()
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(t.numel())
        kind = rng.random()
        if kind < 0.5:
            t[i] = rng.choice(_SPECIAL)
        elif kind < 0.8:  # a random float32 bit pattern
            t[i] = struct.unpack("<f", rng.getrandbits(32).to_bytes(4, "little"))[0]
        else:
            t[i] = t[i] * rng.choice([-1.0, 2.0, 1e20, 1e-20])
    return t


def _outside(t: torch.Tensor, weight_at: int, extra_ok) -> bool:  # noqa: ANN001
    w = float(t[weight_at])
    return not (0.0 < w <= WORLD) or not bool(torch.isfinite(t[:weight_at]).all()) or not extra_ok(t)


def case(state: dict, rng: random.Random) -> str:
    from tests.fuzz.harness import Finding  # the harness module lands with `make fuzz`

    if rng.random() < 0.5:
        msg = _mutate(state["message"], rng)
        reason = _invalid(msg, WORLD)
        mixed = state["ours"] + msg[:-1]
        if not reason and not bool(torch.isfinite(mixed).all()):
            reason = "sum overflows"  # the receiver's second check (PushSum._collect)
        outside = _outside(msg, N, lambda t: bool(torch.isfinite(state["ours"] + t[:-1]).all()))
    else:
        msg = _mutate(state["report"], rng)
        reason = _invalid_report(msg, N, WORLD)
        outside = _outside(msg, N, lambda t: bool(((t[N + 1 :] == 0) | (t[N + 1 :] == 1)).all()))
    if reason:
        if not outside:
            raise Finding("false-refusal", f"an in-domain message was refused: {reason}")
        return "refused"
    if outside:
        raise Finding("silent-accept", f"a message outside the honest domain was admitted: {msg.tolist()[-6:]}")
    return "accepted"
