"""Threshold (3-of-3) CKKS run as the network protocol would: every message crosses as bytes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from trustgrad.crypto import (
    NO_FLOODING,
    Context,
    KeyShare,
    PartialDecryption,
    PublicKey,
    SecretKey,
    aggregate,
    decrypt,
    encrypt,
    fuse,
    joint_eval_mult_finish,
    joint_eval_mult_round1,
    joint_eval_mult_round2,
    partial_decrypt,
    threshold_keygen,
)
from trustgrad.errors import CryptoError


def test_each_party_holds_only_its_own_share(small_threshold, rng):
    ctx, _, _ = small_threshold
    wire_ctx = ctx.to_bytes()
    parties: list[dict] = [{} for _ in range(3)]  # each party's private state: only what it made or received
    message = None
    for i, state in enumerate(parties):
        state["ctx"] = Context.from_bytes(wire_ctx)
        prev = None if message is None else PublicKey.from_bytes(state["ctx"], message)
        pk, state["share"] = threshold_keygen(state["ctx"], 3, prev)
        assert state["share"].index == i + 1 and pk.joined == i + 1
        message = pk.to_bytes()
    server = Context.from_bytes(wire_ctx)
    joint = PublicKey.from_bytes(server, message)
    assert joint.complete
    tags = {p["share"].tag for p in parties}
    assert len(tags) == 3  # three distinct shares (OpenFHE tags the joint key like the last party's share)

    grads = [rng.standard_normal(700) for _ in range(4)]
    mean = aggregate([EncryptedVector_from(server, encrypt(joint, g).to_bytes()) for g in grads], scale=0.25)
    wire_mean = mean.to_bytes()
    partials = [
        partial_decrypt(p["share"], EncryptedVector_from(p["ctx"], wire_mean), NO_FLOODING).to_bytes() for p in parties
    ]
    out = fuse([PartialDecryption.from_bytes(server, b) for b in partials])
    np.testing.assert_allclose(out, np.mean(grads, axis=0), atol=1e-9)


def EncryptedVector_from(ctx, data):  # noqa: N802 - reads like the constructor it wraps
    from trustgrad.crypto import EncryptedVector

    return EncryptedVector.from_bytes(ctx, data)


def test_fusion_with_a_partial_missing_fails_clearly(small_threshold, rng):
    ctx, pk, shares = small_threshold
    v = encrypt(pk, rng.standard_normal(100))
    partials = [partial_decrypt(s, v) for s in shares]
    for drop in range(3):
        with pytest.raises(CryptoError, match=rf"missing parties \[{drop + 1}\]"):
            fuse(partials[:drop] + partials[drop + 1 :])
    with pytest.raises(CryptoError, match="more than once"):
        fuse([partials[0], partials[1], partials[1]])
    with pytest.raises(CryptoError, match="none"):
        fuse([])


def test_partials_of_different_vectors_are_not_fused(small_threshold, rng):
    ctx, pk, shares = small_threshold
    a, b = encrypt(pk, rng.standard_normal(100)), encrypt(pk, rng.standard_normal(100))
    with pytest.raises(CryptoError, match="different encrypted vectors"):
        fuse([partial_decrypt(shares[0], a), partial_decrypt(shares[1], b), partial_decrypt(shares[2], a)])


def test_a_share_cannot_decrypt_alone(small_threshold):
    ctx, pk, shares = small_threshold
    with pytest.raises(CryptoError, match="cannot decrypt alone"):
        decrypt(shares[0], encrypt(pk, np.ones(4)))


def test_incomplete_joint_key_cannot_encrypt(small_threshold):
    ctx, _, _ = small_threshold
    pk1, _ = threshold_keygen(ctx, 3)
    with pytest.raises(CryptoError, match="incomplete"):
        encrypt(pk1, np.ones(4))
    pk = pk1
    for _ in range(2):
        pk, _ = threshold_keygen(ctx, 3, pk)
    with pytest.raises(CryptoError, match="already joined"):
        threshold_keygen(ctx, 3, pk)


def test_share_roundtrip_needs_explicit_consent(small_threshold):
    ctx, _, shares = small_threshold
    with pytest.raises(CryptoError, match="include_secret=True"):
        shares[1].to_bytes()
    again = SecretKey.from_bytes(ctx, shares[1].to_bytes(include_secret=True))
    assert isinstance(again, KeyShare) and (again.index, again.parties, again.tag) == (2, 3, shares[1].tag)


def test_joint_eval_mult_key_two_rounds(small_threshold, rng):
    ctx, pk, shares = small_threshold
    msg = None
    for s in shares:  # round 1: sequential
        msg = joint_eval_mult_round1(s, pk, msg)
    with pytest.raises(CryptoError, match="already contributed"):
        joint_eval_mult_round1(shares[0], pk, msg)
    parts = [joint_eval_mult_round2(s, pk, msg) for s in shares]  # round 2: any order
    with pytest.raises(CryptoError, match="missing parties"):
        joint_eval_mult_finish(pk, parts[:2])
    pk_mult = PublicKey.from_bytes(ctx, joint_eval_mult_finish(pk, parts).to_bytes())
    assert pk_mult.eval_mult
    x = rng.uniform(-1, 1, ctx.slots)
    ct = encrypt(pk, x)
    # ciphertext x ciphertext needs the joint relinearisation key; done on raw OpenFHE objects
    from trustgrad.crypto import EncryptedVector

    sq = EncryptedVector(ctx, [ctx.cc.EvalMult(ct.ciphertexts[0], ct.ciphertexts[0])], ctx.slots, "float64", pk.tag, 1)
    out = fuse([partial_decrypt(s, sq, NO_FLOODING) for s in shares])  # CKKS's precision; flooding: test_keyset
    np.testing.assert_allclose(out, x**2, atol=1e-7)


def test_sharekeys_recovery_works_in_process_only():
    """Canary for the module docstring's claim about t-of-n recovery in the 1.6.1 bindings (see threshold.py).

    Runs in a subprocess because the failure mode we document (an empty PrivateKey) is a segfault.
    """
    code = textwrap.dedent(
        """
        import pickle, numpy as np, openfhe as o
        from trustgrad.crypto import CKKSParams, Context, threshold_keygen
        ctx = Context(CKKSParams.for_aggregation("threshold", ring_dim=1024, security="none", allow_insecure=True))
        cc, pk, shares = ctx.cc, None, []
        for _ in range(3):
            pk, s = threshold_keygen(ctx, 3, pk)
            shares.append(s)
        dealt = cc.ShareKeys(shares[2]._sk, 3, 2, 3, "shamir")   # party 3 deals shares of its key
        try:
            pickle.dumps(dealt[1]); print("DCRTPoly picklable")
        except Exception:
            print("DCRTPoly not serializable")
        recovered = cc.KeyGen().secretKey                     # output buffer (an empty PrivateKey() segfaults)
        cc.RecoverSharedKey(recovered, {1: dealt[1], 2: dealt[2]}, 3, 2, "shamir")
        x = np.linspace(-1, 1, 512)
        ct = cc.Encrypt(pk._pk, cc.MakeCKKSPackedPlaintext(x))
        parts = [cc.MultipartyDecryptLead([ct], shares[0]._sk)[0], cc.MultipartyDecryptMain([ct], shares[1]._sk)[0],
                 cc.MultipartyDecryptMain([ct], recovered)[0]]
        print("recovered error", np.abs(cc.MultipartyDecryptFusion(parts).GetRealPackedValueArray() - x).max())
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "DCRTPoly not serializable" in res.stdout
    assert float(res.stdout.split("recovered error")[1]) < 1e-8
