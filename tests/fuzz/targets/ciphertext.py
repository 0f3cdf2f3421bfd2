"""Fuzz target: a ciphertext a worker pushes (``EncryptedVector.from_bytes`` as the ps server and ring peers call it,
then decryption by a key holder). Mutations: ``_cryptofuzz``; a mutant accepted must decrypt to the honest values."""

from __future__ import annotations

import pathlib
import random
from typing import Any

import numpy as np

from tests.fuzz.harness import Finding
from tests.fuzz.targets import _cryptofuzz as cf
from trustgrad.crypto import CKKSParams, Context, EncryptedVector, aggregate, decrypt, encrypt, keygen, layout
from trustgrad.errors import TrustgradError

NAME = "ciphertext"
LENGTH = 1000  # two ciphertexts at 512 slots, the second one padded
TOLERANCE = 1e-6  # CKKS error of a fresh encryption at 2**40 is ~1e-9


def setup(workdir: pathlib.Path) -> dict[str, Any]:
    # the ps preset at a toy ring dimension: the same layouts as N = 8192, 16x faster per case
    ctx = Context(CKKSParams.for_aggregation("shared", ring_dim=1024, security="none", allow_insecure=True))
    pk, sk = keygen(ctx)
    values = np.random.default_rng(7).uniform(-2.0, 2.0, LENGTH)
    honest = encrypt(pk, values)
    scaled = aggregate([honest, honest], scale=0.5)  # another level: its items are foreign here
    other = [cf.Frame(v.to_bytes()).items[0] for v in (scaled, encrypt(keygen(ctx)[0], values))]
    shape = layout.shape_of(honest.ciphertexts[0])
    return {
        "ctx": ctx, "pk": pk, "sk": sk, "values": values, "honest": honest.to_bytes(), "other": other,
        "layouts": list(layout.layouts_for(ctx, layout.CIPHERTEXT, shape)),
    }  # fmt: skip


def case(state: dict[str, Any], rng: random.Random) -> str:
    family, data = cf.mutant(state["honest"], rng, state["layouts"], state["other"], coefficients=True)
    try:
        vector = EncryptedVector.from_bytes(
            state["ctx"], data, public_key=state["pk"], length=LENGTH, padded=True, dtype="float64", exact=True
        )  # fmt: skip
        got = decrypt(state["sk"], vector)
    except TrustgradError as exc:
        if len(str(exc).splitlines()) > 1:
            raise
        return "refused"
    if not cf.same_values(got, state["values"], TOLERANCE):
        worst = float(np.max(np.abs(np.asarray(got, np.float64)[:LENGTH] - state["values"][: len(got)])))
        raise Finding("silent-accept", f"{family} mutant decrypted to other values (max error {worst:.3g})")
    return "accepted"
