"""Untrusted bytes: every defect is a one-line CryptoError before OpenFHE parses anything (docs/architecture.md §4)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import openfhe
import pytest

from trustgrad.crypto import (
    CKKSParams,
    Context,
    EncryptedVector,
    PartialDecryption,
    PublicKey,
    SecretKey,
    decrypt,
    encrypt,
    keygen,
    partial_decrypt,
)
from trustgrad.errors import CryptoError

SMALL = {"ring_dim": 1024, "security": "none", "allow_insecure": True}


@pytest.fixture(scope="module")
def wire(small_ctx, small_keys):
    pk, sk = small_keys
    return encrypt(pk, np.linspace(-1, 1, 1000)).to_bytes()


def test_roundtrip(small_ctx, small_keys, wire):
    _, sk = small_keys
    np.testing.assert_allclose(
        decrypt(sk, EncryptedVector.from_bytes(small_ctx, wire)), np.linspace(-1, 1, 1000), atol=1e-6
    )


@pytest.mark.parametrize("position", [0, 5, 20, 60, 200, 1000, 30_000, -1])
def test_flipped_byte_is_rejected(small_ctx, wire, position):
    bad = bytearray(wire)
    bad[position] ^= 0x10
    with pytest.raises(CryptoError):
        EncryptedVector.from_bytes(small_ctx, bytes(bad))


@pytest.mark.parametrize("cut", [0, 3, 19, 40, 100, 5000])
def test_truncated_is_rejected(small_ctx, wire, cut):
    with pytest.raises(CryptoError, match="truncated"):
        EncryptedVector.from_bytes(small_ctx, wire[: len(wire) - cut] if cut else wire[:10])


def test_oversized_and_garbage_are_rejected(small_ctx, wire):
    with pytest.raises(CryptoError, match="oversized"):
        EncryptedVector.from_bytes(small_ctx, wire + b"\0")
    with pytest.raises(CryptoError, match="magic"):
        EncryptedVector.from_bytes(small_ctx, np.random.default_rng(0).bytes(100_000))
    with pytest.raises(CryptoError, match="expected bytes"):
        EncryptedVector.from_bytes(small_ctx, "text")  # type: ignore[arg-type]
    huge = struct.pack("<4sBBHII", b"TGHE", 2, 4, 0, 10, 1 << 30)
    with pytest.raises(CryptoError, match="limits"):
        EncryptedVector.from_bytes(small_ctx, huge + bytes(64))


def test_kind_confusion_is_rejected(small_ctx, small_keys, wire):
    with pytest.raises(CryptoError, match="expected a public key, got a encrypted vector"):
        PublicKey.from_bytes(small_ctx, wire)


def _reframe(data: bytes, mutate) -> bytes:
    """Re-pack a frame after editing its metadata, with a valid CRC: what a buggy or hostile peer could send."""
    import json

    magic, version, kind, res, meta_len, n = struct.unpack_from("<4sBBHII", data)
    pos = 16 + 8 * n + 4
    meta = json.loads(data[pos : pos + meta_len])
    mutate(meta)
    meta_b = json.dumps(meta).encode()
    body = meta_b + data[pos + meta_len :]
    head = struct.pack("<4sBBHII", magic, version, kind, res, len(meta_b), n) + data[16 : 16 + 8 * n]
    return head + struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + body


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda m: m.update(length=10**6), "cannot hold"),
        (lambda m: m.update(mults=7), "outside this context's depth"),
        (lambda m: m.update(dtype="object"), "dtype"),
        (lambda m: m.update(tag="00" * 16), "key tag"),
        (lambda m: m.pop("id"), "'id'"),
    ],
)
def test_inconsistent_metadata_is_rejected(small_ctx, wire, mutate, match):
    with pytest.raises(CryptoError, match=match):
        EncryptedVector.from_bytes(small_ctx, _reframe(wire, mutate))


def test_garbage_payload_with_valid_frame_is_a_crypto_error(small_ctx, wire):
    """A well-framed item that is not an OpenFHE ciphertext never reaches OpenFHE: its layout is refused."""
    from trustgrad.crypto import wire as frame

    with pytest.raises(CryptoError, match="has exactly|isolated parser"):
        EncryptedVector.from_bytes(small_ctx, frame.pack(4, _wire_meta(wire), [b"\x00" * 64, b"\x01" * 10]))


def _wire_meta(data: bytes) -> dict:
    import json

    _, _, _, _, meta_len, n = struct.unpack_from("<4sBBHII", data)
    pos = 16 + 8 * n + 4
    meta = json.loads(data[pos : pos + meta_len])
    meta["n"] = 2
    meta["length"] = 1000
    return meta


def test_ciphertext_from_another_context_or_key(small_ctx, small_keys, wire):
    other = Context(CKKSParams.for_aggregation("shared", ring_dim=2048, security="none", allow_insecure=True))
    with pytest.raises(CryptoError, match="another CKKS context"):
        EncryptedVector.from_bytes(other, wire)
    other_pk, _ = keygen(small_ctx)
    with pytest.raises(CryptoError, match="not under the expected key"):
        EncryptedVector.from_bytes(small_ctx, wire, public_key=other_pk)


def test_key_file_that_does_not_match_the_context(small_ctx, small_keys):
    pk, sk = small_keys
    other = Context(CKKSParams.for_aggregation("threshold", **SMALL))
    with pytest.raises(CryptoError, match="another CKKS context"):
        PublicKey.from_bytes(other, pk.to_bytes())
    with pytest.raises(CryptoError, match="another CKKS context"):
        SecretKey.from_bytes(other, sk.to_bytes(include_secret=True))


def test_context_roundtrip_is_small_and_checked(small_ctx):
    data = small_ctx.to_bytes()
    assert len(data) < 600
    assert Context.from_bytes(data).fingerprint == small_ctx.fingerprint
    forged = _reframe(data, lambda m: m.update(ctx="0" * 32))
    with pytest.raises(CryptoError, match="different OpenFHE context"):
        Context.from_bytes(forged)


def test_server_bytes_contain_no_secret_key(small_ctx, small_keys):
    """What the server receives (public context + public key) cannot decrypt and does not contain the secret key."""
    pk, sk = small_keys
    server_bytes = small_ctx.to_bytes() + pk.to_bytes()
    # 1. the secret key's coefficients never appear: look for any 64-byte window of the OpenFHE secret-key blob
    secret = openfhe.Serialize(sk._sk, openfhe.BINARY)
    body = secret[len(secret) // 2 :]  # past the shared parameter header, into the secret polynomial
    assert all(body[i : i + 64] not in server_bytes for i in range(0, len(body) - 64, 4096))
    # 2. by construction: nothing the server can parse is a secret key; asking for one fails
    for chunk in (small_ctx.to_bytes(), pk.to_bytes()):
        with pytest.raises(CryptoError, match="expected a secret key"):
            SecretKey.from_bytes(small_ctx, chunk)
    # 3. and a secret key is only ever serialized on explicit request
    with pytest.raises(CryptoError, match="include_secret=True"):
        sk.to_bytes()


def test_partial_decryption_roundtrip_and_validation(small_threshold, rng):
    ctx, pk, shares = small_threshold
    v = encrypt(pk, rng.standard_normal(50))
    data = partial_decrypt(shares[1], v).to_bytes()
    p = PartialDecryption.from_bytes(ctx, data)
    assert (p.index, p.parties, p.id) == (2, 3, v.id)
    with pytest.raises(CryptoError, match="invalid party index"):
        PartialDecryption.from_bytes(ctx, _reframe(data, lambda m: m.update(index=4)))
    with pytest.raises(CryptoError, match="checksum"):
        PartialDecryption.from_bytes(ctx, data[:-1] + bytes([data[-1] ^ 1]))


def test_eval_keys_roundtrip(small_ctx):
    pk, sk = keygen(small_ctx, eval_mult=True, rotations=[1, -2])
    again = PublicKey.from_bytes(small_ctx, pk.to_bytes())
    assert again.eval_mult and again.rotations == (-2, 1)
    x = np.arange(small_ctx.slots, dtype=np.float64) / small_ctx.slots
    v = encrypt(again, x)
    rotated = EncryptedVector(small_ctx, [small_ctx.cc.EvalRotate(v.ciphertexts[0], 1)], v.length, "float64", v.tag)
    np.testing.assert_allclose(decrypt(sk, rotated), np.roll(x, -1), atol=1e-6)
