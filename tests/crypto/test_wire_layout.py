"""Crafted bytes with a valid checksum: refused with one line before OpenFHE parses them, or parsed in isolation
(docs/wire.md). Every mutant below is re-framed with a recomputed CRC, as a malicious peer would."""

from __future__ import annotations

import numpy as np
import pytest

from trustgrad.crypto import (
    CKKSParams,
    Context,
    EncryptedVector,
    PartialDecryption,
    PublicKey,
    SecretKey,
    aggregate,
    decrypt,
    encrypt,
    fuse,
    joint_eval_mult_round1,
    keygen,
    layout,
    partial_decrypt,
    wire,
)
from trustgrad.crypto.flooding import NO_FLOODING
from trustgrad.crypto.sandbox import sandbox_for
from trustgrad.errors import CryptoError


def _reframe(data: bytes, kind: int, edit_meta=None, edit_item=None, reserved: int = 0) -> bytes:
    meta, items = wire.unpack(data, kind)
    items = [bytes(i) for i in items]
    if edit_meta is not None:
        edit_meta(meta)
    if edit_item is not None:
        items[0] = edit_item(bytearray(items[0]))
    out = bytearray(wire.pack(kind, meta, items))
    if reserved:  # the reserved header bytes, with the CRC recomputed over them as the sender would
        import struct
        import zlib

        out[6:8] = struct.pack("<H", reserved)
        n = struct.unpack_from("<I", out, 12)[0]
        pos = 16 + 8 * n
        out[pos : pos + 4] = struct.pack("<I", zlib.crc32(out[pos + 4 :], zlib.crc32(out[:pos])))
    return bytes(out)


@pytest.fixture(scope="module")
def job(small_ctx, small_keys):
    pk, sk = small_keys
    values = np.random.default_rng(3).uniform(-1, 1, 1000)
    return small_ctx, pk, sk, values, encrypt(pk, values)


def test_honest_bytes_of_every_history_pass(job, small_threshold):
    ctx, pk, sk, values, v = job
    for vec in (v, aggregate([v, v], scale=0.5), EncryptedVector.from_bytes(ctx, v.to_bytes()) + v):
        back = EncryptedVector.from_bytes(ctx, vec.to_bytes(), public_key=pk, length=1000, padded=True)
        np.testing.assert_allclose(decrypt(sk, back), decrypt(sk, vec), atol=1e-6)
    tctx, tpk, shares = small_threshold
    again = PublicKey.from_bytes(tctx, tpk.to_bytes())
    tv = encrypt(again, values)
    # without flooding: this checks the wire round trip to CKKS precision (flooding's own test: test_aggregation)
    parts = [
        PartialDecryption.from_bytes(tctx, partial_decrypt(s, tv, NO_FLOODING).to_bytes(), parties=3) for s in shares
    ]
    np.testing.assert_allclose(fuse(parts), values, atol=1e-6)
    assert SecretKey.from_bytes(tctx, shares[1].to_bytes(include_secret=True)).tag == shares[1].tag


def test_every_openfhe_metadata_byte_is_checked_exactly(job):
    """Each byte of the OpenFHE serialization that is not a coefficient or the key tag, changed: refused before
    OpenFHE parses it (a parse would take ~1 ms each; the check alone runs here)."""
    ctx, pk, _, _, v = job
    data = v.to_bytes()
    variant = layout.layouts_for(ctx, layout.CIPHERTEXT, layout.shape_of(v.ciphertexts[0]))
    item = bytes(wire.unpack(data, wire.KIND_VECTOR)[1][0])
    (lay,) = [x for x in variant if x.size == len(item)]
    fixed = np.flatnonzero(lay.fixed)
    assert 1000 < fixed.size < len(item) // 4  # parameters and headers; the rest are coefficients
    for pos in fixed.tolist():
        bad = bytearray(item)
        bad[pos] ^= 0x01
        with pytest.raises(CryptoError, match=f"byte {pos} of the OpenFHE ciphertext differs"):
            lay.check(bytes(bad), pk.tag, "x")


@pytest.mark.parametrize("offset", [0, 1, -1])
def test_coefficients_at_or_above_the_modulus_are_refused(job, offset):
    ctx, pk, _, _, v = job
    lay = layout.layouts_for(ctx, layout.CIPHERTEXT, layout.shape_of(v.ciphertexts[0]))[0]

    def edit(item):
        at, q = lay.arrays[-1] + 8 * 17, lay.moduli[-1]
        item[at : at + 8] = (q + offset if offset >= 0 else 2**64 - 1).to_bytes(8, "little")
        return bytes(item)

    with pytest.raises(CryptoError, match="not below its modulus"):
        EncryptedVector.from_bytes(ctx, _reframe(v.to_bytes(), wire.KIND_VECTOR, edit_item=edit))


def test_a_coefficient_changed_in_range_decrypts_to_noise_and_is_refused(job):
    ctx, pk, sk, _, v = job
    lay = layout.layouts_for(ctx, layout.CIPHERTEXT, layout.shape_of(v.ciphertexts[0]))[0]

    def edit(item):
        at, q = lay.arrays[0] + 8 * 5, lay.moduli[0]
        item[at : at + 8] = ((int.from_bytes(item[at : at + 8], "little") + 1) % q).to_bytes(8, "little")
        return bytes(item)

    crafted = EncryptedVector.from_bytes(ctx, _reframe(v.to_bytes(), wire.KIND_VECTOR, edit_item=edit))
    with pytest.raises(CryptoError, match="decryption is noise|approximation error is too high"):
        decrypt(sk, crafted)  # OpenFHE's own check or ours, depending on how far the error spreads


def test_a_cut_length_is_refused_not_truncated(job):
    ctx, _, sk, _, v = job
    cut = _reframe(v.to_bytes(), wire.KIND_VECTOR, edit_meta=lambda m: m.update(length=999))
    with pytest.raises(CryptoError, match="holds 999 values, expected 1000"):
        EncryptedVector.from_bytes(ctx, cut, length=1000)
    with pytest.raises(CryptoError, match="past the declared length 999 hold data"):
        decrypt(sk, EncryptedVector.from_bytes(ctx, cut))  # a receiver that does not know the length


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.update(dtype="float16"), "declares dtype float16, expected float64"),
        (lambda m: m.update(padded=False), "expected the opposite"),
        (lambda m: m.update(shape=[1, 2]), "has exactly"),
        (lambda m: m.update(shape=[40, 2]), "impossible in this context"),
        (lambda m: m.update(n=3), "announces 3 ciphertexts"),
        (lambda m: m.update(id="Z" * 16), "hex digits"),
        (lambda m: m.update(length=[[1]]), "short list of integers"),
        (lambda m: m.update(tag={"a": 1}), "nested"),
    ],
)
def test_metadata_lies_are_refused(job, edit, match):
    ctx, pk, _, _, v = job
    with pytest.raises(CryptoError, match=match) as err:
        EncryptedVector.from_bytes(
            ctx,
            _reframe(v.to_bytes(), wire.KIND_VECTOR, edit_meta=edit),
            length=1000,
            dtype="float64",
            padded=True,
            exact=True,
        )
    assert len(str(err.value).splitlines()) == 1


def test_deeply_nested_metadata_and_reserved_bytes(job):
    ctx, _, _, _, v = job
    data = v.to_bytes()
    items = [bytes(i) for i in wire.unpack(data, wire.KIND_VECTOR)[1]]
    deep = b"[" * 30000 + b"]" * 30000  # under the 64 KB cap: Python's parser would recurse into a RecursionError
    with pytest.raises(CryptoError, match="nested too deeply"):
        EncryptedVector.from_bytes(ctx, _pack_raw(wire.KIND_VECTOR, deep, items))
    with pytest.raises(CryptoError, match="reserved header bytes are 0x0001"):
        EncryptedVector.from_bytes(ctx, _reframe(data, wire.KIND_VECTOR, reserved=1))
    import struct
    import zlib

    n = struct.unpack_from("<I", data, 12)[0]
    pos = 16 + 8 * n  # the checksum covers every byte of the frame but itself, the header included
    assert struct.unpack_from("<I", data, pos)[0] == zlib.crc32(data[pos + 4 :], zlib.crc32(data[:pos]))


def _pack_raw(kind: int, meta_raw: bytes, items: list[bytes]) -> bytes:
    """A frame around metadata bytes that ``json.dumps`` would never write, with a valid CRC."""
    import struct
    import zlib

    head = struct.pack("<4sBBHII", b"TGHE", wire.VERSION, kind, 0, len(meta_raw), len(items))
    head += b"".join(struct.pack("<Q", len(i)) for i in items)
    body = meta_raw + b"".join(items)
    return head + struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + body


def test_a_crashing_evaluation_key_kills_the_isolated_parser_not_the_receiver(small_threshold):
    """Round-1 eval-mult messages have no exact layout; bytes that abort or SIGFPE OpenFHE's deserializer (found by
    fuzzing: parameter-block bytes set to 0xff) are refused with one line, and the next honest message parses."""
    ctx, pk, shares = small_threshold
    honest = joint_eval_mult_round1(shares[0], pk)
    outcomes = []
    for pos in (177, 412):

        def edit(item, pos=pos):
            item[pos] = 0xFF
            return bytes(item)

        crafted = _reframe(honest, wire.KIND_EVAL_ROUND1, edit_item=edit)
        with pytest.raises(CryptoError) as err:
            joint_eval_mult_round1(shares[1], pk, crafted)
        assert len(str(err.value).splitlines()) == 1
        outcomes.append(str(err.value))
    assert any("killed by SIG" in o for o in outcomes), outcomes  # the helper died; this process did not
    assert sandbox_for(ctx).restarts >= 1
    joint_eval_mult_round1(shares[1], pk, honest)  # a new helper parses the honest message


def test_a_rotated_ciphertext_is_parsed_in_isolation_unless_the_receiver_wants_exact_layouts():
    """HYBRID key switching gives layouts that are not learnt: receivers of such ciphertexts (blind verdicts) get
    them through the isolated parser and a comparison of their decryption fields; ps and ring receivers refuse them."""
    small_ctx = Context(
        CKKSParams(ring_dim=1024, depth=2, key_switching="hybrid", security="none", allow_insecure=True)
    )
    pk, sk = keygen(small_ctx, rotations=[1])
    x = np.arange(small_ctx.slots, dtype=np.float64) / small_ctx.slots
    v = encrypt(pk, x)
    rotated = EncryptedVector(small_ctx, [small_ctx.cc.EvalRotate(v.ciphertexts[0], 1)], v.length, "float64", v.tag)
    data = rotated.to_bytes()
    with pytest.raises(layout.NoLayout):
        EncryptedVector.from_bytes(small_ctx, data, exact=True)
    np.testing.assert_allclose(decrypt(sk, EncryptedVector.from_bytes(small_ctx, data)), np.roll(x, -1), atol=1e-6)
    lied = _reframe(data, wire.KIND_VECTOR, edit_meta=lambda m: m.update(shape=[1, 2]))
    with pytest.raises(CryptoError, match="not those of an honest ciphertext"):
        EncryptedVector.from_bytes(small_ctx, lied)
