"""Fuzz target: a worker's pushed gradient (float32 bytes) judged by the calibrated auditor (``ps --proof audit``).

The bytes a worker pushes are the claim itself (the server hash-chains exactly them), so a forger controls all of
them. Mutants: bit flips anywhere (sign, exponent, mantissa), NaN / inf / huge / subnormal values, one-ulp pushes, a
push just under the old fixed threshold, truncation and extension. The server refuses a payload of the wrong length
before anything reads it (``PlainServer.decode``); every payload of the right length gets a verdict. Outcomes:
``refused`` (wrong length), ``invalid-verdict`` (replay differs, with a one-line reason), ``accepted`` only when the
mutant equals the honest gradient value for value (e.g. a zero's sign bit flipped: the update is the same).
"""

from __future__ import annotations

import random
import struct
from pathlib import Path
from typing import Any

import torch

from trustgrad.errors import LaunchError

NAME = "audit-claim"


def setup(workdir: Path) -> dict[str, Any]:
    from trustgrad.audit import Auditor
    from trustgrad.config import RunConfig
    from trustgrad.data import load_dataset

    cfg = RunConfig(workers=3, seed=0, progress=False)
    auditor = Auditor(cfg, load_dataset(cfg.dataset), 3)
    params = auditor.replica.flat_params()
    honest = auditor.replay(0, 0, params)
    return {"auditor": auditor, "params": params, "honest": honest, "bytes": honest.numpy().tobytes()}


def _mutate(data: bytearray, rng: random.Random, honest: torch.Tensor) -> bytes:
    kind = rng.randrange(7)
    n = len(data) // 4
    i = rng.randrange(n)
    if kind == 0:  # one bit anywhere
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # a special value
        value = rng.choice([float("nan"), float("inf"), -float("inf"), 3.4e38, 1e-45, -0.0, 0.0])
        data[4 * i : 4 * i + 4] = struct.pack("<f", value)
    elif kind == 2:  # one ulp up or down
        x = torch.tensor(struct.unpack("<f", bytes(data[4 * i : 4 * i + 4]))[0])
        toward = torch.tensor(rng.choice([float("inf"), -float("inf")]))
        data[4 * i : 4 * i + 4] = struct.pack("<f", float(torch.nextafter(x, toward)))
    elif kind == 3:  # a steering push just under the old fixed threshold
        u = torch.randn(n, generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
        pushed = honest + 2.9e-4 * honest.norm() * u / u.norm()
        data[:] = pushed.numpy().tobytes()
    elif kind == 4:  # truncated
        del data[rng.randrange(len(data)) :]
    elif kind == 5:  # extended
        data.extend(rng.randbytes(rng.randrange(1, 64)))
    else:  # a block of random bytes
        start = rng.randrange(len(data))
        block = rng.randbytes(min(len(data) - start, rng.randrange(1, 256)))
        data[start : start + len(block)] = block
    return bytes(data)


def case(state: dict[str, Any], rng: random.Random) -> str:
    honest: torch.Tensor = state["honest"]
    payload = _mutate(bytearray(state["bytes"]), rng, honest)
    try:
        if len(payload) != 4 * honest.numel():  # what the server checks before anything reads the bytes
            raise LaunchError(f"ps: worker 0 pushed {len(payload)} bytes, expected {4 * honest.numel()}")
    except LaunchError:
        return "refused"
    claim = torch.frombuffer(bytearray(payload), dtype=torch.float32)
    check = state["auditor"].check(0, 0, 0, state["params"], claim)
    if not check.ok:
        assert check.reason and "\n" not in check.reason
        return "invalid-verdict"
    if not torch.equal(claim, honest):
        from tests.fuzz.harness import Finding

        raise Finding("silent-accept", f"a claim differing from the honest gradient was accepted ({check})")
    return "accepted"
