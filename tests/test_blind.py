"""Blind verification of one SGD step on ciphertexts, against the plaintext gradient (128-bit parameters, N=16384).

Honest claims must decrypt to the plaintext distance (~0) within ``BOUND``; every kind of dishonest claim must land
far above it. Batches are small (12-16 digits) to keep the file fast; ``trustgrad bench blind`` runs batch 32.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from trustgrad.blind import (
    BlindParams,
    BlindVerifier,
    EncryptedSamples,
    Layout,
    SampleStore,
    encrypt_claim,
    encrypt_model,
    encrypt_samples,
    judge,
    poly_bce,
    reference_gradient,
    squared_distance,
)
from trustgrad.blind.models import linear_mse
from trustgrad.blind.step_check import encrypt_samples_bytes
from trustgrad.crypto import (
    Context,
    EncryptedVector,
    PartialDecryption,
    PublicKey,
    decrypt,
    encrypt,
    fuse,
    joint_eval_mult_finish,
    joint_eval_mult_round1,
    joint_eval_mult_round2,
    keygen,
    partial_decrypt,
    threshold_keygen,
)
from trustgrad.crypto.flooding import FLOODING, NO_FLOODING
from trustgrad.crypto.rotation import joint_rotation_base, joint_rotation_finish, joint_rotation_part
from trustgrad.data import load_dataset
from trustgrad.errors import CryptoError

# The verdict's absolute CKKS error at its last level measured <= 2.3e-9 (scale 2**40) without gain; the verifier
# multiplies the difference by gain = 8 before squaring, so honest distances measured <= 4.1e-11 (shared) and
# <= 8.4e-11 (threshold). A single gradient entry off by 1e-4 adds 1e-8. Bound (BlindVerifier.bound):
# 2**-(scale_bits - 14) / gain**2 = 2.3e-10.
GAIN = 8.0
BOUND = 2.0 ** -(40 - 14) / GAIN**2
FEATURES, CLASSES = 64, 10


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits")
    return ds.x_train.reshape(len(ds.x_train), -1).double().numpy(), ds.y_train.long().numpy()


def _setup(kind, digits, *, n=48):
    ctx = Context(BlindParams.for_check(kind))
    lay = Layout(FEATURES, CLASSES, ctx.slots)
    pk, sk = keygen(ctx, eval_mult=True, rotations=lay.rotations)
    x, y = digits
    ids = np.arange(n)
    store = SampleStore(lay)
    store.add(encrypt_samples(pk, lay, x[ids], y[ids], ids))
    return ctx, lay, pk, sk, store


def _model(seed, scale=0.1):
    rng = np.random.default_rng(seed)
    return rng.normal(0, scale, (CLASSES, FEATURES)), rng.normal(0, scale, CLASSES)


def _grad(kind, digits, batch, w, b):
    x, y = digits
    return reference_gradient(kind, x[batch], np.eye(CLASSES)[y[batch]], w, b)


@pytest.fixture(scope="module")
def poly(digits):
    return _setup("poly", digits)


# -- plaintext pieces --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss,kind", [(poly_bce, "poly"), (linear_mse, "linear")])
def test_torch_loss_gradient_is_the_checked_gradient(loss, kind, digits):
    x, y = digits[0][:20], digits[1][:20]
    w, b = _model(3)
    lin = torch.nn.Linear(FEATURES, CLASSES).double()
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
        lin.bias.copy_(torch.from_numpy(b))
    loss(lin(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    dw, db = reference_gradient(kind, x, np.eye(CLASSES)[y], w, b)
    np.testing.assert_allclose(lin.weight.grad.numpy(), dw, atol=1e-12)
    np.testing.assert_allclose(lin.bias.grad.numpy(), db, atol=1e-12)


def test_layout_roundtrip_and_rotations():
    lay = Layout(FEATURES, CLASSES, 8192)
    w, b = _model(0)
    np.testing.assert_array_equal(lay.unpack_weights(lay.pack_weights(w)), w)
    np.testing.assert_array_equal(lay.unpack_bias(lay.pack_bias(b)), b)
    assert lay.per_ct == 8 and lay.rotations == tuple(1 << i for i in range(13))
    x, y = np.arange(2 * FEATURES).reshape(2, FEATURES), np.eye(CLASSES)[[3, 7]]
    gx, gy = lay.pack_samples(x, y)
    gx, gy = gx.reshape(64, 8, 16), gy.reshape(64, 8, 16)
    assert gx[5, 1, 2] == x[1, 5] and gx[5, 1, 12] == 0 and gx[5, 2, 2] == 0
    assert gy[40, 0, 3] == 1 and gy[40, 1, 7] == 1 and gy[40, 1, 3] == 0


# -- the check (shared key) ------------------------------------------------------------------------------------


def test_poly_honest_and_dishonest_claims(poly, digits):
    ctx, lay, pk, sk, store = poly
    rng = np.random.default_rng(7)
    batch = rng.choice(48, 16, replace=False)
    w, b = _model(1)
    g = _grad("poly", digits, batch, w, b)
    verifier = BlindVerifier(pk, lay, "poly", gain=GAIN)
    assert verifier.bound == BOUND
    recomputed = verifier.recompute(store, batch, encrypt_model(pk, lay, w, b))

    def dist(claim):
        return verifier.finish(decrypt(sk, verifier.distance_to(recomputed, encrypt_claim(pk, lay, *claim))))

    honest = dist(g)
    assert abs(honest) <= BOUND and judge(honest, BOUND).accepted

    one = g[0].copy()
    one[4, 33] += 1e-4
    other = rng.choice(np.setdiff1d(np.arange(48), batch), 16, replace=False)
    stale_w, stale_b = w - 0.05 * g[0], b - 0.05 * g[1]  # claim computed on the previous model version
    dishonest = {
        "tamper-1e-4": (one, g[1]),
        "tamper-all-1e-4": (g[0] + 1e-4, g[1] + 1e-4),
        "sign-flip": (-g[0], -g[1]),
        "noise": (g[0] + rng.normal(0, 1e-2, g[0].shape), g[1]),
        "scale": (3 * g[0], 3 * g[1]),
        "other-batch": _grad("poly", digits, other, w, b),
        "stale-model": _grad("poly", digits, batch, stale_w, stale_b),
    }
    for name, claim in dishonest.items():
        d, truth = dist(claim), squared_distance(g, claim)
        verdict = judge(d, BOUND)
        assert not verdict.accepted, (name, d, truth)
        assert d >= 2 * BOUND, (name, d)
        if truth < verifier.max_distance:  # the decrypted distance is the plaintext one, up to the cross term
            # 2 <diff, e> of the difference with the recomputed gradient's CKKS error e (||e|| <= 1e-7)
            assert abs(d - truth) <= BOUND + 2e-7 * np.sqrt(truth) + 1e-6 * truth, (name, d, truth)


def test_linear_check_and_batches_larger_than_one_group(digits):
    ctx, lay, pk, sk, store = _setup("linear", digits, n=40)
    batch = np.arange(40)[::-1][:13]  # positions collide: several groups
    assert len(store.groups(batch)) >= 2
    w, b = _model(2)
    g = _grad("linear", digits, batch, w, b)
    verifier = BlindVerifier(pk, lay, "linear", gain=GAIN)
    rec = verifier.recompute(store, batch, encrypt_model(pk, lay, w, b))
    honest = verifier.finish(decrypt(sk, verifier.distance_to(rec, encrypt_claim(pk, lay, *g))))
    bad = (g[0], g[1] + np.full(CLASSES, 1e-3))
    tampered = verifier.finish(decrypt(sk, verifier.distance_to(rec, encrypt_claim(pk, lay, *bad))))
    assert abs(honest) <= BOUND
    assert abs(tampered - 1e-5) <= 1e-8 and not judge(tampered, BOUND).accepted


def test_verifier_refuses_missing_keys_and_foreign_vectors(poly, digits):
    ctx, lay, pk, sk, store = poly
    plain_pk, _ = keygen(ctx)  # no eval-mult, no rotation keys
    with pytest.raises(CryptoError, match="eval-mult"):
        BlindVerifier(plain_pk, lay, "poly")
    verifier = BlindVerifier(pk, lay, "poly")
    w, b = _model(0)
    with pytest.raises(CryptoError, match="key"):
        verifier.recompute(store, [0, 1], encrypt_model(plain_pk, lay, w, b))
    with pytest.raises(CryptoError, match="model layout"):
        verifier.distance_to(None, EncryptedVector(ctx, [], 3, "float64", pk.tag))
    assert judge(-1.0, BOUND).reason.startswith("negative")


_SERVER = textwrap.dedent(
    """
    import gc, sys
    import numpy as np
    from trustgrad.blind import BlindVerifier, EncryptedSamples, Layout, SampleStore, context_from_bytes
    from trustgrad.crypto import EncryptedVector, PublicKey, SecretKey

    d = sys.argv[1]
    blob = lambda name: open(f"{d}/{name}", "rb").read()
    ctx = context_from_bytes(blob("ctx"))
    pk = PublicKey.from_bytes(ctx, blob("pk"))
    lay = Layout(64, 10, ctx.slots)
    store = SampleStore(lay)
    store.add(EncryptedSamples.from_bytes(ctx, blob("samples"), public_key=pk))
    model = EncryptedVector.from_bytes(ctx, blob("model"), public_key=pk)
    claim = EncryptedVector.from_bytes(ctx, blob("claim"), public_key=pk)
    batch = [int(i) for i in blob("batch").split()]
    verdict = BlindVerifier(pk, lay, "linear", gain=8.0).distance(store, batch, model, claim)
    assert not any(isinstance(o, SecretKey) for o in gc.get_objects())
    open(f"{d}/verdict", "wb").write(verdict.to_bytes())
    """
)


def test_server_process_holds_no_secret(digits, tmp_path):
    """The server runs in its own process and receives bytes: context, public key, samples, model, claim."""
    ctx, lay, pk, sk, store = _setup("linear", digits, n=8)
    x, y = digits
    ids = np.arange(8, 16)
    w, b = _model(4)
    g = _grad("linear", digits, ids, w, b)
    files = {
        "ctx": ctx.to_bytes(),
        "pk": pk.to_bytes(),
        "samples": encrypt_samples_bytes(pk, lay, x[ids], y[ids], ids),  # what a worker sends
        "model": encrypt_model(pk, lay, w, b).to_bytes(),
        "claim": encrypt_claim(pk, lay, *g).to_bytes(),
        "batch": " ".join(map(str, ids)).encode(),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    proc = subprocess.run([sys.executable, "-c", _SERVER, str(tmp_path)], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    verdict = EncryptedVector.from_bytes(ctx, (tmp_path / "verdict").read_bytes(), public_key=pk)
    assert abs(float(decrypt(sk, verdict)[0])) / GAIN**2 <= BOUND
    with pytest.raises(CryptoError):
        EncryptedSamples.from_bytes(ctx, files["samples"][:-10])
    assert len(files["samples"]) == len(encrypt_samples(pk, lay, x[ids], y[ids], ids).to_bytes())  # one format


# -- threshold keys ----------------------------------------------------------------------------------------------


def test_threshold_three_parties_blind_check(digits):
    """3 parties: joint public key, joint eval-mult key, joint rotation keys (all as bytes); the distance is
    decrypted only with all three partial decryptions."""
    ctx = Context(BlindParams.for_check("linear"))
    lay = Layout(FEATURES, CLASSES, ctx.slots)
    pk, shares = None, []
    for _ in range(3):
        pk, share = threshold_keygen(ctx, 3, pk)
        shares.append(share)
    r1 = None
    for s in shares:
        r1 = joint_eval_mult_round1(s, pk, r1)
    pk = joint_eval_mult_finish(pk, [joint_eval_mult_round2(s, pk, r1) for s in shares])
    base = joint_rotation_base(shares[0], pk, lay.rotations)
    pk = joint_rotation_finish(pk, base, [joint_rotation_part(s, pk, base) for s in shares[1:]])
    with pytest.raises(CryptoError, match="missing parties"):
        joint_rotation_finish(pk, base, [joint_rotation_part(shares[1], pk, base)])
    server_pk = PublicKey.from_bytes(ctx, pk.to_bytes())
    assert server_pk.eval_mult and set(lay.rotations) <= set(server_pk.rotations)

    x, y = digits
    ids = np.arange(16)
    store = SampleStore(lay)
    store.add(encrypt_samples(server_pk, lay, x[ids], y[ids], ids))
    w, b = _model(5)
    g = _grad("linear", digits, ids[:12], w, b)
    verifier = BlindVerifier(server_pk, lay, "linear", gain=GAIN)
    rec = verifier.recompute(store, ids[:12], encrypt_model(server_pk, lay, w, b))

    def dist(claim, flooding=NO_FLOODING):
        v = verifier.distance_to(rec, encrypt_claim(server_pk, lay, *claim))
        parts = [PartialDecryption.from_bytes(ctx, partial_decrypt(s, v, flooding).to_bytes()) for s in shares]
        with pytest.raises(CryptoError, match="missing"):
            fuse(parts[1:])
        return verifier.finish(fuse(parts))

    assert abs(dist(g)) <= BOUND  # CKKS's own error
    # with every party's flooding (the default when verdicts leave the key holders): 7 sigma of the three parties' sum
    flooded = BOUND + 7 * FLOODING.sigma(ctx.params.scale_bits) * np.sqrt(3) / GAIN**2
    assert abs(dist(g, FLOODING)) <= flooded
    assert dist((-g[0], -g[1])) == pytest.approx(squared_distance(g, (-g[0], -g[1])), rel=1e-6)


# -- a round's claims in one evaluation, and claims that are not model-layout real vectors -------------------------


def _round(poly, digits, seed):
    ctx, lay, pk, sk, store = poly
    rng = np.random.default_rng(seed)
    batches = [rng.choice(48, 12, replace=False) for _ in range(3)]
    w, b = _model(seed)
    verifier = BlindVerifier(pk, lay, "poly", gain=GAIN)
    grads = [_grad("poly", digits, bt, w, b) for bt in batches]
    weights = [rng.uniform(0.5, 1.0, lay.slots) for _ in batches]
    return verifier, batches, encrypt_model(pk, lay, w, b), grads, weights


def _distances(verifier, sk):
    def of(vectors):
        out = []
        for v in vectors:
            try:
                out.append(verifier.finish(decrypt(sk, v)))
            except CryptoError:  # OpenFHE refuses to decode it: a verdict that is not a number, rejected
                out.append(float("nan"))
        return out

    return of


def test_round_check_accepts_honest_rounds_with_one_decryption_and_names_the_liar(poly, digits):
    ctx, lay, pk, sk, store = poly
    verifier, batches, model, grads, weights = _round(poly, digits, 11)
    claims = [encrypt_claim(pk, lay, *g) for g in grads]
    packed = verifier.check_round(store, batches, model, claims, weights=weights)
    distances = verifier.finish_round(packed, _distances(verifier, sk))
    assert packed.decryptions == 1 and all(judge(d, BOUND).accepted for d in distances)
    # batches overlap across claims: each claim's sums still see only its own samples (a liar on worker 1)
    bad = (grads[1][0].copy(), grads[1][1])
    bad[0][3, 20] += 1e-4
    claims[1] = encrypt_claim(pk, lay, *bad)
    packed = verifier.check_round(store, batches, model, claims, weights=weights)
    distances = verifier.finish_round(packed, _distances(verifier, sk))
    assert packed.decryptions == 4
    assert [judge(d, BOUND).accepted for d in distances] == [True, False, True]
    alone = verifier.finish(decrypt(sk, verifier.distance_to(verifier.recompute(store, batches[1], model), claims[1],
                                                              weights=weights[1])))  # fmt: skip
    assert abs(distances[1] - alone) <= BOUND and 0.25e-8 <= alone <= 1.01e-8


def test_claims_that_are_not_model_layout_vectors_are_rejected(poly, digits):
    """The strongest claims against a check that compares only the slots the gradient lands in: right there, wrong
    in the replicas the model multiplies later samples with (an honest worker framed next round), in the padding,
    or in one feature block of the bias."""
    ctx, lay, pk, sk, store = poly
    verifier, batches, model, grads, weights = _round(poly, digits, 12)
    rec = verifier.recompute(store, batches[0], model)
    dw, db = grads[0]
    cw, cb = lay.pack_weights(dw), lay.pack_bias(db)
    grid = (lay.fp, lay.per_ct, lay.cp)
    replicas = cw.reshape(grid).copy()
    replicas[:, 1:, :CLASSES] += 0.05  # j = 0 exact
    padding = cw.reshape(grid).copy()
    padding[:, :, CLASSES:] = 0.3
    block = cb.reshape(grid).copy()
    block[5, :, :CLASSES] -= 0.02  # j = 0 of block 0 exact
    forged = {"replicas": (replicas, cb), "padding": (padding, cb), "bias block": (cw, block)}
    check = _distances(verifier, sk)
    for name, (w_slots, b_slots) in forged.items():
        claim = encrypt(pk, np.concatenate([w_slots.reshape(-1), b_slots.reshape(-1)]))
        d = check([verifier.distance_to(rec, claim, weights=weights[0])])[0]
        assert not judge(d, BOUND).accepted and d > 1e-6, (name, d)
        claims = [claim] + [encrypt_claim(pk, lay, *g) for g in grads[1:]]
        packed = verifier.check_round(store, batches, model, claims, weights=weights)
        verdicts = [judge(x, BOUND).accepted for x in verifier.finish_round(packed, check)]
        assert verdicts == [False, True, True], (name, verdicts)


def test_a_claim_whose_imaginary_parts_cancel_its_distance_is_rejected(poly, digits):
    """CKKS slots are complex: with D = a + i t, D^2 has real part a^2 - t^2, so a prover that encodes t = |a| next
    to a poisoned real part a (here a sign flip x4) zeroes the real part of every squared difference, whatever the
    secret weights. Its verdict's imaginary part (2 a t) is then large, and OpenFHE's CKKS decoder, which estimates
    the error from the imaginary parts, refuses it or floods the real part with noise of that size."""
    import openfhe

    ctx, lay, pk, sk, store = poly
    verifier, batches, model, grads, weights = _round(poly, digits, 13)
    dw, db = grads[0]
    poison_w, poison_b = -5 * dw, -5 * db  # the claim: -4 g
    complex_params = BlindParams.for_check("poly")._openfhe()
    complex_params.SetCKKSDataType(openfhe.COMPLEX)
    encoder = openfhe.GenCryptoContext(complex_params)  # an attacker's encoder that keeps imaginary parts

    def forged(real, imag):
        pt = encoder.MakeCKKSPackedPlaintext([complex(a, t) for a, t in zip(real, imag)])
        assert max(abs(complex(v).imag) for v in pt.GetCKKSPackedValue()) > 0.1  # it does carry imaginary parts
        return ctx.cc.Encrypt(pk._pk, pt)

    cw = forged(lay.pack_weights(dw + poison_w), lay.pack_weights(np.abs(poison_w)))
    cb = forged(lay.pack_bias(db + poison_b), lay.pack_bias(np.abs(poison_b)))
    claim = EncryptedVector(ctx, [cw, cb], 2 * lay.slots, "float64", pk.tag, 0)
    check = _distances(verifier, sk)
    rec = verifier.recompute(store, batches[0], model)
    d = check([verifier.distance_to(rec, claim, weights=weights[0])])[0]
    assert not judge(d, BOUND).accepted, d
    claims = [claim] + [encrypt_claim(pk, lay, *g) for g in grads[1:]]
    packed = verifier.check_round(store, batches, model, claims, weights=weights)
    assert [judge(x, BOUND).accepted for x in verifier.finish_round(packed, check)] == [False, True, True]
