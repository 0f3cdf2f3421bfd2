"""Fuzz target: a threshold public key a key party sends (``PublicKey.from_bytes`` as the next party and the server
call it). A mutant accepted must still be the honest joint key: what it encrypts, the honest shares decrypt.

Not drawn here: coefficient words changed to other values below their modulus. Such a key is a well-formed key for
another secret, indistinguishable from an honest one without that secret; binding the joint key to the parties'
shares is the key generation's job (docs/wire.md, residual risks). Coefficients at or above a modulus are drawn."""

from __future__ import annotations

import pathlib
import random
from typing import Any

import numpy as np

from tests.fuzz.harness import Finding
from tests.fuzz.targets import _cryptofuzz as cf
from trustgrad.crypto import CKKSParams, Context, PublicKey, encrypt, fuse, layout, partial_decrypt, threshold_keygen
from trustgrad.crypto.flooding import NO_FLOODING
from trustgrad.errors import TrustgradError

NAME = "public-key"
PARTIES = 3
TOLERANCE = 1e-6


def setup(workdir: pathlib.Path) -> dict[str, Any]:
    ctx = Context(CKKSParams.for_aggregation("threshold", ring_dim=1024, security="none", allow_insecure=True))
    pk, shares = None, []
    for _ in range(PARTIES):
        pk, share = threshold_keygen(ctx, PARTIES, None if pk is None else PublicKey.from_bytes(ctx, pk.to_bytes()))
        shares.append(share)
    first = threshold_keygen(ctx, PARTIES)[0]  # a one-party key: foreign items
    return {
        "ctx": ctx, "shares": shares, "honest": pk.to_bytes(), "other": [cf.Frame(first.to_bytes()).items[0]],
        "layouts": list(layout.layouts_for(ctx, layout.PUBLIC_KEY)), "values": np.linspace(-1.0, 1.0, 300),
    }  # fmt: skip


def case(state: dict[str, Any], rng: random.Random) -> str:
    family, data = cf.mutant(state["honest"], rng, state["layouts"], state["other"], coefficients=False)
    try:
        key = PublicKey.from_bytes(state["ctx"], data)
        vector = encrypt(key, state["values"])
        got = fuse([partial_decrypt(s, vector, NO_FLOODING) for s in state["shares"]])  # CKKS precision
    except TrustgradError as exc:
        if len(str(exc).splitlines()) > 1:
            raise
        return "refused"
    if not cf.same_values(got, state["values"], TOLERANCE):
        raise Finding("silent-accept", f"{family} mutant key accepted but not the joint key")
    return "accepted"
