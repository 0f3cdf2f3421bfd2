"""Encrypted aggregation against the plaintext reference (docs/architecture.md §5).

Error bound. A CKKS slot decrypts to ``x + e / Delta`` where ``e`` is the encryption noise seen through the canonical
embedding; OpenFHE estimates its precision at ``scale_bits - 11`` bits for a fresh N=8192 ciphertext (29 bits at
Delta = 2**40). Summing W = 4 ciphertexts multiplies the noise by about sqrt(W) = 2 and the 1/W rescale divides
it back, plus the rounding of the scalar; threshold decryption adds each party's smudging noise. We test against
``2 ** -(scale_bits - 16)``, i.e. ~5 bits of margin over OpenFHE's estimate:

- shared, Delta = 2**40: bound 6.0e-8; measured max error 3.7-4.9e-9 (8195 values, unit normal, 5 runs);
- threshold, Delta = 2**50 (3 parties): bound 5.8e-11; measured 4.1-4.9e-12.
Encryption noise is random (OpenFHE's PRNG is not seedable from Python), but exceeding the bound would be a ~30-sigma
event, so the tests are deterministic in practice.
"""

from __future__ import annotations

import numpy as np
import pytest

from trustgrad.crypto import (
    FLOODING,
    NO_FLOODING,
    CKKSParams,
    Context,
    EncryptedVector,
    PartialDecryption,
    PublicKey,
    aggregate,
    decrypt,
    encrypt,
    fuse,
    keygen,
    partial_decrypt,
    threshold_keys,
)
from trustgrad.errors import CryptoError


def _bound(ctx: Context) -> float:
    return 2.0 ** -(ctx.params.scale_bits - 16)


def test_mean_of_four_workers_shared_128bit(rng):
    ctx = Context(CKKSParams.for_aggregation("shared"))  # real parameters: N=8192, 128-bit
    pk, sk = keygen(ctx)
    length = 2 * ctx.slots + 3  # not a multiple of the slot count
    grads = [rng.standard_normal(length) for _ in range(4)]
    wire = [encrypt(pk, g).to_bytes() for g in grads]  # what the workers send
    server = Context.from_bytes(ctx.to_bytes())
    server_pk = PublicKey.from_bytes(server, pk.to_bytes())
    mean = aggregate([EncryptedVector.from_bytes(server, b, public_key=server_pk) for b in wire], scale=1 / 4)
    out = decrypt(sk, EncryptedVector.from_bytes(ctx, mean.to_bytes()))
    assert out.shape == (length,) and out.dtype == np.float64
    err = np.abs(out - np.mean(grads, axis=0)).max()
    assert err < _bound(ctx), err


def test_mean_of_four_workers_threshold_128bit(rng):
    """CKKS's own error against ``_bound``; with the default flooding, within 6 sigma of the parties' noise."""
    ctx = Context(CKKSParams.for_aggregation("threshold"))
    pk, shares = threshold_keys(ctx, 3)
    pk = PublicKey.from_bytes(ctx, pk.to_bytes())
    length = ctx.slots + 5
    grads = [rng.standard_normal(length) for _ in range(4)]
    mean = aggregate([encrypt(pk, g) for g in grads], scale=0.25)
    for flooding, bound in [(NO_FLOODING, _bound(ctx)), (FLOODING, 6 * np.sqrt(3) * FLOODING.sigma(50))]:
        partials = [PartialDecryption.from_bytes(ctx, partial_decrypt(s, mean, flooding).to_bytes()) for s in shares]
        err = np.abs(fuse(partials) - np.mean(grads, axis=0)).max()
        assert err < bound, (flooding, err)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_and_shape_are_restored(small_ctx, small_keys, rng, dtype):
    pk, sk = small_keys
    x = rng.standard_normal((7, 100)).astype(dtype)  # any shape is flattened
    out = decrypt(sk, encrypt(pk, x))
    assert out.dtype == dtype and out.shape == (700,)
    np.testing.assert_allclose(out, x.ravel(), atol=1e-6)


def test_add_sub_scale(small_ctx, small_keys, rng):
    pk, sk = small_keys
    a, b = rng.standard_normal(1000), rng.standard_normal(1000)
    ea, eb = encrypt(pk, a), encrypt(pk, b)
    np.testing.assert_allclose(decrypt(sk, ea + eb), a + b, atol=1e-6)
    np.testing.assert_allclose(decrypt(sk, ea - eb), a - b, atol=1e-6)
    np.testing.assert_allclose(decrypt(sk, 0.5 * ea * 3), 1.5 * a, atol=1e-6)  # depth 2: two scalar products


def test_depth_is_enforced(small_ctx, small_keys):
    pk, _ = small_keys
    v = encrypt(pk, np.ones(10)) * 0.5 * 0.5
    with pytest.raises(CryptoError, match="depth exhausted"):
        v * 0.5


def test_incompatible_operands(small_ctx, small_keys):
    pk, _ = small_keys
    other_pk, _ = keygen(small_ctx)
    with pytest.raises(CryptoError, match="lengths"):
        aggregate([encrypt(pk, np.ones(10)), encrypt(pk, np.ones(11))])
    with pytest.raises(CryptoError, match="different keys"):
        aggregate([encrypt(pk, np.ones(10)), encrypt(other_pk, np.ones(10))])
    with pytest.raises(CryptoError, match="levels"):
        encrypt(pk, np.ones(10)) + encrypt(pk, np.ones(10)) * 2.0
    with pytest.raises(CryptoError, match="at least one"):
        aggregate([])


@pytest.mark.parametrize(
    "bad", [np.array([np.nan]), np.array([np.inf]), np.array([1e9]), np.array([]), np.array(["a"])]
)
def test_encrypt_rejects_unencodable_values(small_keys, bad):
    with pytest.raises(CryptoError):
        encrypt(small_keys[0], bad)


def test_wrong_secret_key_is_refused(small_ctx, small_keys):
    pk, _ = small_keys
    _, other_sk = keygen(small_ctx)
    with pytest.raises(CryptoError, match="encrypted under key"):
        decrypt(other_sk, encrypt(pk, np.ones(10)))
