"""Fuzz target: a partial decryption a key party sends (``PartialDecryption.from_bytes`` as ring owners and ps
workers call it, then ``fuse`` with the other parties' honest partials). A mutant accepted must fuse to the honest
values."""

from __future__ import annotations

import pathlib
import random
from typing import Any

import numpy as np

from tests.fuzz.harness import Finding
from tests.fuzz.targets import _cryptofuzz as cf
from trustgrad.crypto import (
    CKKSParams,
    Context,
    PartialDecryption,
    encrypt,
    fuse,
    layout,
    partial_decrypt,
    threshold_keygen,
)  # fmt: skip
from trustgrad.crypto.flooding import NO_FLOODING
from trustgrad.errors import TrustgradError

NAME = "partial"
LENGTH = 1000
PARTIES = 3
TOLERANCE = 1e-6


def setup(workdir: pathlib.Path) -> dict[str, Any]:
    ctx = Context(CKKSParams.for_aggregation("threshold", ring_dim=1024, security="none", allow_insecure=True))
    pk, shares = None, []
    for _ in range(PARTIES):
        pk, share = threshold_keygen(ctx, PARTIES, pk)
        shares.append(share)
    values = np.random.default_rng(8).uniform(-2.0, 2.0, LENGTH)
    vector = encrypt(pk, values)
    # without flooding: the wire is under test, and a mutant must fuse to the values within CKKS precision
    partials = [partial_decrypt(s, vector, NO_FLOODING) for s in shares]
    stranger = partial_decrypt(shares[1], encrypt(pk, values), NO_FLOODING)  # another vector's partial: foreign items
    shape = layout.shape_of(partials[1].ciphertexts[0])
    return {
        "ctx": ctx, "values": values, "partials": partials, "honest": partials[1].to_bytes(),
        "other": [cf.Frame(stranger.to_bytes()).items[0], cf.Frame(partials[2].to_bytes()).items[0]],
        "layouts": list(layout.layouts_for(ctx, layout.PARTIAL, shape)),
    }  # fmt: skip


def case(state: dict[str, Any], rng: random.Random) -> str:
    family, data = cf.mutant(state["honest"], rng, state["layouts"], state["other"], coefficients=True)
    first, _, third = state["partials"]
    try:
        got = PartialDecryption.from_bytes(
            state["ctx"], data, length=LENGTH, parties=PARTIES, padded=True, dtype="float64", exact=True
        )
        values = fuse([first, got, third])
    except TrustgradError as exc:
        if len(str(exc).splitlines()) > 1:
            raise
        return "refused"
    if not cf.same_values(values, state["values"], TOLERANCE):
        raise Finding("silent-accept", f"{family} mutant fused to other values")
    return "accepted"
