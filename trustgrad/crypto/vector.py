"""Encrypted flat vectors: pack a numpy array into CKKS ciphertexts, aggregate them, unpack.

CKKS aggregation (what the server computes without any secret key):

1. each worker encodes its flat update ``g_i`` (length L) into ``ceil(L / S)`` plaintexts of S = N/2 slots, scaled by
   Delta, and encrypts them under the (shared or joint) public key;
2. the server adds the W ciphertexts slot-wise (``EvalAddMany``: additions are exact up to the encryption noise,
   which grows like sqrt(W)) and optionally multiplies by the public scalar 1/W (one level; OpenFHE's
   FLEXIBLEAUTOEXT scaling rescales automatically, so no explicit ``Rescale`` is needed and the product is about a
   third smaller on the wire than a fresh ciphertext);
3. the key holders decrypt (shared key) or decrypt jointly (threshold: partial decryptions + fusion) and drop the
   padding of the last ciphertext.

Speed: values enter OpenFHE through its numpy fast path (``MakeCKKSPackedPlaintext`` on a contiguous float64 view,
no per-element Python) and leave through ``GetRealPackedValueArray``; see ``trustgrad/bench/he_raw.py`` for the
overhead against raw OpenFHE calls.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np
import openfhe

from trustgrad.crypto import _wire
from trustgrad.crypto.context import Context, PublicKey, SecretKey
from trustgrad.errors import CryptoError

__all__ = ["EncryptedVector", "encrypt", "decrypt", "aggregate"]

log = logging.getLogger(__name__)

_DTYPES = ("float16", "float32", "float64")
# A decryption whose estimated precision is below this many bits is noise, not data (wrong key, tampered
# coefficients or overflow); fresh aggregates measure 29+ bits at Delta = 2**40.
MIN_PRECISION_BITS = 8.0


class EncryptedVector:
    """A flat float vector of ``length`` values packed into ``ceil(length / slots)`` CKKS ciphertexts.

    Supports ``a + b``, ``a - b``, ``a * scalar`` (one multiplicative level each); ``len(v)`` is the plaintext length.
    """

    __slots__ = ("context", "ciphertexts", "length", "dtype", "tag", "mults", "id")

    def __init__(
        self, context: Context, ciphertexts: list[Any], length: int, dtype: str, tag: str, mults: int = 0
    ) -> None:
        self.context = context
        self.ciphertexts = ciphertexts
        self.length = length
        self.dtype = dtype
        self.tag = tag
        self.mults = mults  # scalar multiplications applied: the level, which fixes the byte layout
        # a fresh random identifier per result, so partial decryptions of different vectors are never fused
        self.id = secrets.token_hex(8)

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return f"EncryptedVector(length={self.length}, ciphertexts={len(self.ciphertexts)}, level={self.mults})"

    # -- arithmetic ---------------------------------------------------------------------------------------------

    def __add__(self, other: EncryptedVector) -> EncryptedVector:
        return aggregate([self, other])

    def __sub__(self, other: EncryptedVector) -> EncryptedVector:
        _check_compatible([self, other])
        cc = self.context.cc
        with _wire.openfhe_errors("homomorphic subtraction"):
            cts = [cc.EvalSub(a, b) for a, b in zip(self.ciphertexts, other.ciphertexts, strict=True)]
        return self._derive(cts, _result_dtype([self, other]), self.mults)

    def __mul__(self, scalar: float) -> EncryptedVector:
        if not isinstance(scalar, (int, float, np.floating, np.integer)) or isinstance(scalar, bool):
            return NotImplemented
        scalar = float(scalar)
        if not math.isfinite(scalar):
            raise CryptoError(f"cannot multiply an encrypted vector by {scalar}")
        if self.mults + 1 > self.context.params.depth:
            raise CryptoError(
                f"multiplicative depth exhausted: the context has depth {self.context.params.depth} and this "
                f"vector was already multiplied {self.mults} time(s); raise CKKSParams.depth"
            )
        cc = self.context.cc
        with _wire.openfhe_errors("multiplication by a scalar"):
            cts = [cc.EvalMult(ct, scalar) for ct in self.ciphertexts]
        return self._derive(cts, self.dtype, self.mults + 1)

    __rmul__ = __mul__

    def _derive(self, cts: list[Any], dtype: str, mults: int) -> EncryptedVector:
        return EncryptedVector(self.context, cts, self.length, dtype, self.tag, mults)

    # -- bytes --------------------------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        with _wire.openfhe_errors("serializing ciphertexts"):
            items = [openfhe.Serialize(ct, openfhe.BINARY) for ct in self.ciphertexts]
        return _wire.pack(_wire.KIND_VECTOR, self._meta(), items)

    def _meta(self) -> dict[str, Any]:
        return self.context._meta(
            tag=self.tag, length=self.length, dtype=self.dtype, mults=self.mults, id=self.id, n=len(self.ciphertexts)
        )

    @classmethod
    def from_bytes(cls, context: Context, data: bytes, *, public_key: PublicKey | None = None) -> EncryptedVector:
        """Parse and validate; with ``public_key``, also require that the vector was encrypted under it."""
        what = "encrypted vector"
        meta, items = _wire.unpack(data, _wire.KIND_VECTOR)
        length, dtype, tag, mults, vid = _read_vector_meta(context, meta, items, what)
        if public_key is not None and tag != public_key.tag:
            raise CryptoError(
                f"{what} was encrypted under key {tag[:8]}, not under the expected key {public_key.tag[:8]}"
            )
        cts = [context._parse(item, _deser_ct, what) for item in items]
        _check_tags(cts, tag, what)
        vec = cls(context, cts, length, dtype, tag, mults)
        vec.id = vid
        return vec


def encrypt(public_key: PublicKey, values: np.ndarray) -> EncryptedVector:
    """Encrypt a flat (or any-shape, flattened) real array under ``public_key``.

    Values must be finite with ``|x| < 2**(first_mod_bits - scale_bits - 2)`` (128 for the threshold preset,
    2**18 for the shared one), which leaves room for a sum of a few workers.
    """
    ctx = public_key.context
    if not public_key.complete:
        raise CryptoError(
            f"threshold public key is incomplete ({public_key.joined} of {public_key.parties} parties joined); "
            "finish key generation before encrypting"
        )
    arr = np.asarray(values)
    if arr.dtype.kind not in "fiu":
        raise CryptoError(f"can only encrypt real numbers, got dtype {arr.dtype}")
    dtype = arr.dtype.name if arr.dtype.name in _DTYPES else "float64"
    x = np.ascontiguousarray(arr, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise CryptoError("cannot encrypt an empty array")
    bound = 2.0 ** (ctx.params.first_mod_bits - ctx.params.scale_bits - 2)
    peak = float(np.max(np.abs(x)))
    if not peak < bound:  # also catches NaN
        raise CryptoError(f"values must be finite with |x| < {bound:g} for these parameters; max |x| is {peak:g}")
    cc, pk, s = ctx.cc, public_key._pk, ctx.slots
    with _wire.openfhe_errors("encryption"):
        cts = [cc.Encrypt(pk, cc.MakeCKKSPackedPlaintext(x[i : i + s])) for i in range(0, x.size, s)]
    return EncryptedVector(ctx, cts, x.size, dtype, public_key.tag)


def decrypt(secret_key: SecretKey, vector: EncryptedVector) -> np.ndarray:
    """Decrypt with a shared secret key; returns the original length and dtype."""
    from trustgrad.crypto.threshold import KeyShare

    if isinstance(secret_key, KeyShare):
        raise CryptoError(
            "a threshold key share cannot decrypt alone: use partial_decrypt() by every party, then fuse()"
        )
    if vector.tag != secret_key.tag:
        raise CryptoError(
            f"the vector was encrypted under key {vector.tag[:8]}, this secret key is {secret_key.tag[:8]}"
        )
    cc, sk = vector.context.cc, secret_key._sk
    with _wire.openfhe_errors("decryption"):
        plaintexts = [cc.Decrypt(sk, ct) for ct in vector.ciphertexts]
    return _unpack(plaintexts, vector.length, vector.dtype, vector.context.slots)


def aggregate(vectors: Sequence[EncryptedVector], scale: float | None = None) -> EncryptedVector:
    """Slot-wise sum of encrypted vectors, optionally times a public scalar (``scale=1/W`` gives the mean).

    >>> # mean = aggregate([encrypt(pk, g) for g in grads], scale=1 / len(grads))
    """
    if not vectors:
        raise CryptoError("aggregate() needs at least one encrypted vector")
    _check_compatible(vectors)
    first = vectors[0]
    cc = first.context.cc
    with _wire.openfhe_errors("homomorphic addition"):
        if len(vectors) == 1:
            cts = list(first.ciphertexts)
        else:
            cts = [cc.EvalAddMany(list(group)) for group in zip(*(v.ciphertexts for v in vectors), strict=True)]
    out = first._derive(cts, _result_dtype(vectors), first.mults)
    return out if scale is None else out * scale


# -- helpers shared with threshold.py -----------------------------------------------------------------------------


def _unpack(plaintexts: list[Any], length: int, dtype: str, slots: int) -> np.ndarray:
    out = np.empty(len(plaintexts) * slots, dtype=np.float64)
    for i, pt in enumerate(plaintexts):
        bits = pt.GetLogPrecision()
        if not bits >= MIN_PRECISION_BITS:
            raise CryptoError(
                f"decryption is noise ({bits:.1f} bits of precision): wrong key, tampered ciphertext or overflow"
            )
        out[i * slots : (i + 1) * slots] = pt.GetRealPackedValueArray()[:slots]
    values = out[:length]
    if not np.isfinite(values).all():
        raise CryptoError("decryption produced non-finite values: wrong key, tampered ciphertext or overflow")
    return values.astype(dtype, copy=False)


def _check_compatible(vectors: Sequence[EncryptedVector]) -> None:
    first = vectors[0]
    for v in vectors[1:]:
        if v.context.fingerprint != first.context.fingerprint:
            raise CryptoError("cannot combine encrypted vectors from different CKKS contexts")
        if v.tag != first.tag:
            raise CryptoError("cannot combine encrypted vectors encrypted under different keys")
        if v.length != first.length:
            raise CryptoError(f"cannot combine encrypted vectors of lengths {first.length} and {v.length}")
        if v.mults != first.mults:
            raise CryptoError(f"cannot combine encrypted vectors at levels {first.mults} and {v.mults}")


def _result_dtype(vectors: Sequence[EncryptedVector]) -> str:
    return np.result_type(*(np.dtype(v.dtype) for v in vectors)).name


def _read_vector_meta(
    context: Context, meta: dict[str, Any], items: list[memoryview], what: str
) -> tuple[int, str, str, int, str]:
    context._check_meta(meta, what)
    length = _wire.field(meta, "length", int, what)
    dtype = _wire.field(meta, "dtype", str, what)
    tag = _wire.field(meta, "tag", str, what)
    mults = _wire.field(meta, "mults", int, what)
    vid = _wire.field(meta, "id", str, what)
    if dtype not in _DTYPES:
        raise CryptoError(f"{what}: unsupported dtype {dtype!r}")
    if not 0 <= mults <= context.params.depth:
        raise CryptoError(f"{what}: level {mults} is outside this context's depth {context.params.depth}")
    if length < 1 or len(items) != -(-length // context.slots):
        raise CryptoError(f"{what}: {len(items)} ciphertexts cannot hold {length} values at {context.slots} slots each")
    return length, dtype, tag, mults, vid


def _check_tags(cts: list[Any], tag: str, what: str) -> None:
    for ct in cts:
        if str(ct.GetKeyTag()) != tag:
            raise CryptoError(f"{what}: a ciphertext's key tag does not match the header")


def _deser_ct(b: bytes) -> Any:
    return openfhe.DeserializeCiphertextString(b, openfhe.BINARY)
