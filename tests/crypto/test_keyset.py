"""Threshold key set-up on a common element (``crypto.keyset``) and the rogue-party attacks on it, in one process.

Every party's steps run here on its own objects; what crosses between parties is bytes. Each attack is first shown
to work against a receiver that skips the check, then shown to be refused by the check."""

from __future__ import annotations

import numpy as np
import openfhe
import pytest

from trustgrad.crypto import CKKSParams, Context, EncryptedVector, encrypt, fuse, partial_decrypt
from trustgrad.crypto import keyset as ks
from trustgrad.crypto.crs import towers
from trustgrad.crypto.flooding import FLOODING, NO_FLOODING, Flooding
from trustgrad.crypto.threshold import threshold_keygen
from trustgrad.errors import CryptoError
from trustgrad.secure.keys import check_openings
from trustgrad.secure.rogue import cancel_others

SMALL = {"ring_dim": 1024, "security": "none", "allow_insecure": True}  # toy parameters, as in conftest

PARTIES = 3


@pytest.fixture(scope="module")
def ctx():
    return Context(CKKSParams.for_aggregation("threshold", depth=2, **SMALL))


def _setup(ctx, seed=b"\x01" * 32):
    """Each party derives the common element itself (their templates differ; only ``a`` is common)."""
    commons = [ks.common_public_key(ctx, seed) for _ in range(PARTIES)]
    made = [ks.threshold_share(commons[i], index=i + 1, parties=PARTIES) for i in range(PARTIES)]
    return commons, {i + 1: c for i, (c, _) in enumerate(made)}, [s for _, s in made]


def _raw_decrypt(ctx, shares, vector):
    """Fuse the partials of ``shares`` only (no party-count check): what a coalition of those shares recovers."""
    cc = ctx.cc
    parts = [cc.MultipartyDecryptLead(vector.ciphertexts, shares[0]._sk)[0]]
    parts += [cc.MultipartyDecryptMain(vector.ciphertexts, s._sk)[0] for s in shares[1:]]
    try:
        return np.array(cc.MultipartyDecryptFusion(parts).GetRealPackedValueArray())[: vector.length]
    except RuntimeError:  # OpenFHE: "approximation error is too high"
        return None


def _alone(ctx, share, vector):
    """What one share decrypts by itself (OpenFHE's plain decryption with the share as the key)."""
    try:
        out = ctx.cc.Decrypt(share._sk, vector.ciphertexts[0])
    except RuntimeError:  # "approximation error is too high": noise
        return None
    return np.array(out.GetRealPackedValueArray())[: vector.length]


def test_sum_of_independent_shares_decrypts_with_all_and_not_with_fewer(ctx, rng):
    commons, contributions, shares = _setup(ctx)
    keys = [ks.joint_public_key(c, contributions, PARTIES) for c in commons]  # every party sums itself
    assert len({ks.key_digest(k) for k in keys}) == 1  # ... and all hold the same key
    x = rng.standard_normal(200)
    v = encrypt(keys[0], x)
    np.testing.assert_allclose(fuse([partial_decrypt(s, v, NO_FLOODING) for s in shares]), x, atol=1e-9)
    for drop in range(PARTIES):
        fewer = _raw_decrypt(ctx, [s for i, s in enumerate(shares) if i != drop], v)
        assert fewer is None or np.abs(fewer - x).max() > 1.0  # noise, not the plaintext
    alone = _alone(ctx, shares[0], v)
    assert alone is None or np.abs(alone - x).max() > 1.0


def test_the_common_element_is_the_seed_s_and_nobody_else_s(ctx):
    a = ks.common_public_key(ctx, b"\x02" * 32)
    b = ks.common_public_key(ctx, b"\x02" * 32)
    c = ks.common_public_key(ctx, b"\x03" * 32)
    assert a._a == b._a and a._a != c._a  # same seed -> same element at every party; another seed -> another
    assert len(a.shared) == len(a.layout) // 2  # the a half of (b, a)


def test_own_chain_works_against_the_old_set_up_and_is_refused_by_the_new(ctx, rng):
    commons, contributions, shares = _setup(ctx)
    pk, rogue_shares = None, []
    for _ in range(PARTIES):  # the attack of issue 15: a complete chain run by one party
        pk, s = threshold_keygen(ctx, PARTIES, pk)
        rogue_shares.append(s)
    x = rng.standard_normal(50)
    v = encrypt(pk, x)
    got = fuse([partial_decrypt(s, v, NO_FLOODING) for s in rogue_shares])
    assert np.abs(got - x).max() < 1e-6  # under the old set-up, the rogue reads every update alone
    contributions[2] = openfhe.Serialize(pk._pk, openfhe.BINARY)
    with pytest.raises(CryptoError, match="party 2's public key contribution is not on the common public element"):
        ks.joint_public_key(commons[0], contributions, PARTIES)


def test_cancelling_the_others_works_unless_committed_first(ctx, rng):
    commons, contributions, shares = _setup(ctx)
    committed = {r: ks.commitment(c) for r, c in contributions.items()}
    honest = [contributions[1], contributions[2]]
    contributions[3] = cancel_others(commons[2], contributions[3], honest)  # chosen after seeing the others'
    joint = ks.joint_public_key(commons[0], contributions, PARTIES)  # on the common element: that check passes
    x = rng.standard_normal(50)
    v = encrypt(joint, x)
    alone = _alone(ctx, shares[2], v)
    assert alone is not None and np.abs(alone - x).max() < 1e-6  # the joint secret is the rogue's share alone
    names = {i: f"party {i}" for i in range(1, PARTIES + 1)}
    with pytest.raises(CryptoError, match="party 3 revealed a public key share that does not open its commitment"):
        check_openings(committed, contributions, {i: i for i in names}, names, "public key share")


def test_a_trapdoor_element_is_refused(ctx):
    commons, contributions, _ = _setup(ctx)
    n = ctx.ring_dim
    data = bytearray(contributions[1])
    t = towers(bytes(data), n)
    for k in commons[0].shared:  # a = 1 in every tower: the joint key would be -s + e, readable by anyone
        data[t.offsets[k] : t.offsets[k] + 8 * n] = np.ones(n, dtype="<u8").tobytes()
    contributions[1] = bytes(data)
    with pytest.raises(CryptoError, match="party 1's public key contribution is not on the common public element"):
        ks.joint_public_key(commons[1], contributions, PARTIES)
    contributions[1] = contributions[1][:-9000]  # a tower missing
    with pytest.raises(CryptoError, match="does not have the layout"):
        ks.joint_public_key(commons[1], contributions, PARTIES)


def test_joint_evaluation_keys_from_independent_common_elements(ctx, rng):
    commons, contributions, shares = _setup(ctx)
    pk = ks.joint_public_key(commons[0], contributions, PARTIES)
    seed, tag = b"\x04" * 32, pk.tag
    cm = [ks.common_eval_mult(ctx, seed) for _ in shares]
    r1 = {s.index: ks.eval_mult_round1(s, cm[i]) for i, s in enumerate(shares)}
    joint_rot = []
    for index in (1, 3):  # one element per index, derived by each party on its own
        cr = [ks.common_rotations(ctx, seed, [1, 3]).element(index) for _ in shares]
        rot = {s.index: ks.rotation_contribution(s, cr[i], tag) for i, s in enumerate(shares)}
        joint_rot.append(ks.joint_rotations(cr[1], rot, PARTIES, tag))
    joint1 = ks.joint_eval_round1(cm[0], r1, PARTIES, tag)
    r2 = {s.index: ks.eval_mult_round2(s, joint1, tag) for s in shares}
    full = ks.install(pk, ks.joint_eval_mult(ctx, r2, PARTIES, tag), joint_rot, [1, 3])
    x = rng.uniform(-1, 1, ctx.slots)
    ct = encrypt(full, x).ciphertexts[0]
    square = EncryptedVector(ctx, [ctx.cc.EvalMult(ct, ct)], ctx.slots, "float64", pk.tag, 1)
    rotated = EncryptedVector(ctx, [ctx.cc.EvalRotate(ct, 3)], ctx.slots, "float64", pk.tag, 0)
    np.testing.assert_allclose(fuse([partial_decrypt(s, square, NO_FLOODING) for s in shares]), x**2, atol=1e-7)
    np.testing.assert_allclose(
        fuse([partial_decrypt(s, rotated, NO_FLOODING) for s in shares]), np.roll(x, -3), atol=1e-7
    )
    other = ks.eval_mult_round1(shares[1], ks.common_eval_mult(ctx, b"\x05" * 32))  # a round 1 on its own element
    with pytest.raises(CryptoError, match="party 2's relinearisation key contribution is not on the common"):
        ks.joint_eval_round1(cm[0], {**r1, 2: other}, PARTIES, tag)


def test_flooding_is_on_by_default_fresh_and_of_the_stated_size(ctx, rng):
    _, contributions, shares = _setup(ctx)
    commons = ks.common_public_key(ctx, b"\x01" * 32)
    pk = ks.joint_public_key(commons, contributions, PARTIES)
    x = rng.standard_normal(ctx.slots)
    v = encrypt(pk, x)
    a, b = partial_decrypt(shares[1], v), partial_decrypt(shares[1], v)
    assert a.to_bytes() != b.to_bytes()  # fresh noise: two partials of one ciphertext never repeat
    plain = fuse([partial_decrypt(s, v, NO_FLOODING) for s in shares]) - x
    flooded = fuse([partial_decrypt(s, v) for s in shares]) - x
    sigma = FLOODING.sigma(ctx.params.scale_bits) * np.sqrt(PARTIES)
    assert np.abs(plain).max() < 1e-9 and 0.9 * sigma < flooded.std() < 1.1 * sigma  # 512 slots: std within 10%
    assert Flooding(security_bits=40).sigma(50) == 2.0**5 * FLOODING.sigma(50)  # sigma doubles every 2 bits


def test_crafted_metadata_around_honest_towers_is_refused_in_the_isolated_helper(ctx):
    """A rogue contribution keeps the common element's towers (so the tower check passes) and rewrites OpenFHE's
    metadata bytes around them: OpenFHE parses it first in the isolated helper, so whatever the bytes do there, this
    party gets a one-line CryptoError naming the sender, or a key that sums like any other, and survives."""
    common = ks.common_public_key(ctx, b"\x07" * 32)
    contributions = {i: ks.threshold_share(common, index=i, parties=2)[0] for i in (1, 2)}
    spans = towers(contributions[2], ctx.ring_dim)
    inside = {p for o in spans.offsets for p in range(o - 8, o + 8 * ctx.ring_dim + 8)}
    positions = [p for p in range(0, len(contributions[2]), 97) if p not in inside][:24]
    refused = 0
    for p in positions:
        crafted = bytearray(contributions[2])
        crafted[p] ^= 0xFF
        try:
            ks.joint_public_key(common, {1: contributions[1], 2: bytes(crafted)}, 2, {2: "party 2 (rank 2)"})
        except CryptoError as exc:
            assert len(str(exc).splitlines()) == 1 and "party 2 (rank 2)" in str(exc), exc
            refused += 1
    assert positions and refused >= 1, (refused, len(positions))  # the mutants reach OpenFHE's parser


def test_each_rotation_index_has_its_own_common_element(ctx):
    """Keys of two indices on one ``a`` would hand out the difference of two automorphisms of the secret: each index
    draws its own element, and a party's key of one index is refused as another index's, naming the party."""
    _, _, shares = _setup(ctx)
    rotation = ks.common_rotations(ctx, b"\x06" * 32, [1, 3])
    one, three = rotation.element(1), rotation.element(3)
    assert one.layout == three.layout and set(one._a).isdisjoint(three._a)
    assert rotation._base is not None  # templates by rewriting the map key, not a key generated per index
    again = ks.common_rotations(ctx, b"\x06" * 32, [1, 3])
    again._learnt = True  # as when the map key is not found: a throwaway key per index, the same element
    assert again.element(3)._a == three._a
    mine = ks.rotation_contribution(shares[0], one, shares[0].tag)
    ks.joint_rotations(one, {1: mine}, 1, shares[0].tag)  # on its own index's element: accepted
    with pytest.raises(CryptoError, match="party 1's rotation key 3 contribution is not on the common public element"):
        ks.joint_rotations(three, {1: mine}, 1, shares[0].tag)
