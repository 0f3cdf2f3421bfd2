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
from typing import Any, NamedTuple

import numpy as np
import openfhe

from trustgrad.crypto import layout, wire
from trustgrad.crypto.context import Context, KeyShare, PublicKey, SecretKey
from trustgrad.errors import CryptoError

__all__ = ["EncryptedVector", "encrypt", "decrypt", "aggregate"]

log = logging.getLogger(__name__)

_DTYPES = ("float16", "float32", "float64")
# A decryption whose estimated precision is below this many bits is noise, not data (wrong key, tampered
# coefficients or overflow); fresh aggregates measure 29+ bits at Delta = 2**40.
MIN_PRECISION_BITS = 8.0
# The slots past a zero-padded vector's length decrypt to CKKS noise (below 1e-6 in every preset, threshold smudging
# included); a declared length cut short leaves data there. Relative to the vector's largest value, floor 1.
PAD_TOLERANCE = 2.0**-10
_ID_HEX = 16


class EncryptedVector:
    """A flat float vector of ``length`` values packed into ``ceil(length / slots)`` CKKS ciphertexts.

    Supports ``a + b``, ``a - b``, ``a * scalar`` (one multiplicative level each); ``len(v)`` is the plaintext length.
    ``padded``: the slots past ``length`` hold zeros (true of :func:`encrypt` and of sums and scalings of its
    results), which decryption then checks: a declared length cut short is refused, not silently truncated.
    """

    __slots__ = ("context", "ciphertexts", "length", "dtype", "tag", "mults", "id", "padded")

    def __init__(
        self,
        context: Context,
        ciphertexts: list[Any],
        length: int,
        dtype: str,
        tag: str,
        mults: int = 0,
        padded: bool = False,
    ) -> None:
        self.context = context
        self.ciphertexts = ciphertexts
        self.length = length
        self.dtype = dtype
        self.tag = tag
        self.mults = mults  # scalar multiplications applied (the depth budget spent)
        self.padded = padded
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
        with wire.openfhe_errors("homomorphic subtraction"):
            cts = [cc.EvalSub(a, b) for a, b in zip(self.ciphertexts, other.ciphertexts, strict=True)]
        return self._derive(cts, _result_dtype([self, other]), self.mults, self.padded and other.padded)

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
        with wire.openfhe_errors("multiplication by a scalar"):
            cts = [cc.EvalMult(ct, scalar) for ct in self.ciphertexts]
        return self._derive(cts, self.dtype, self.mults + 1)

    __rmul__ = __mul__

    def _derive(self, cts: list[Any], dtype: str, mults: int, padded: bool | None = None) -> EncryptedVector:
        padded = self.padded if padded is None else padded
        return EncryptedVector(self.context, cts, self.length, dtype, self.tag, mults, padded)

    # -- bytes --------------------------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The canonical OpenFHE form of each ciphertext (``crypto.layout``), framed with the vector's metadata."""
        items = canonical_items(self.context, self.ciphertexts, layout.CIPHERTEXT, self.tag)
        return wire.pack(wire.KIND_VECTOR, self._meta(), items)

    def _meta(self) -> dict[str, Any]:
        return self.context._meta(
            tag=self.tag, length=self.length, dtype=self.dtype, mults=self.mults, id=self.id,
            n=len(self.ciphertexts), shape=list(ciphertexts_shape(self.ciphertexts)), padded=self.padded,
        )  # fmt: skip

    @classmethod
    def from_bytes(
        cls,
        context: Context,
        data: bytes,
        *,
        public_key: PublicKey | None = None,
        length: int | None = None,
        padded: bool | None = None,
        dtype: str | None = None,
        exact: bool = False,
    ) -> EncryptedVector:
        """Parse and validate before OpenFHE sees a byte (``crypto.wire``, ``crypto.layout``); with
        ``public_key``, also require that the vector was encrypted under it; with ``length`` / ``padded``, that it
        holds that many values / zero padding / decrypts to ``dtype`` (what the receiver expects, not what the sender
        declares: a dtype lie would round the values silently). ``exact``: only ciphertexts of a learnt layout (fresh,
        summed, scaled: all that ps and ring exchange); otherwise a ciphertext of another layout (after rotations or
        relinearisation) is parsed in the isolated helper first and its level, degree, scaling factor, slots and
        element count compared with an honest one's."""
        what = "encrypted vector"
        meta, items = wire.unpack(data, wire.KIND_VECTOR)
        head = read_vector_meta(context, meta, items, what, length, padded, dtype)
        if public_key is not None and head.tag != public_key.tag:
            raise CryptoError(
                f"{what} was encrypted under key {head.tag[:8]}, not under the expected key {public_key.tag[:8]}"
            )
        cts = parse_checked(context, items, layout.CIPHERTEXT, head, what, exact)
        vec = cls(context, cts, head.length, head.dtype, head.tag, head.mults, head.padded)
        vec.id = head.id
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
    cc, pk, s = ctx.cc, public_key._encryption_key(), ctx.slots
    with wire.openfhe_errors("encryption"):
        cts = [cc.Encrypt(pk, cc.MakeCKKSPackedPlaintext(x[i : i + s])) for i in range(0, x.size, s)]
    return EncryptedVector(ctx, cts, x.size, dtype, public_key.tag, padded=True)


def decrypt(secret_key: SecretKey, vector: EncryptedVector) -> np.ndarray:
    """Decrypt with a shared secret key; returns the original length and dtype."""
    if isinstance(secret_key, KeyShare):
        raise CryptoError(
            "a threshold key share cannot decrypt alone: use partial_decrypt() by every party, then fuse()"
        )
    if vector.tag != secret_key.tag:
        raise CryptoError(
            f"the vector was encrypted under key {vector.tag[:8]}, this secret key is {secret_key.tag[:8]}"
        )
    cc, sk = vector.context.cc, secret_key._sk
    with wire.openfhe_errors("decryption"):
        plaintexts = [cc.Decrypt(sk, ct) for ct in vector.ciphertexts]
    return unpack_values(plaintexts, vector.length, vector.dtype, vector.context.slots, vector.padded)


def aggregate(vectors: Sequence[EncryptedVector], scale: float | None = None) -> EncryptedVector:
    """Slot-wise sum of encrypted vectors, optionally times a public scalar (``scale=1/W`` gives the mean).

    >>> # mean = aggregate([encrypt(pk, g) for g in grads], scale=1 / len(grads))
    """
    if not vectors:
        raise CryptoError("aggregate() needs at least one encrypted vector")
    _check_compatible(vectors)
    first = vectors[0]
    cc = first.context.cc
    with wire.openfhe_errors("homomorphic addition"):
        if len(vectors) == 1:
            cts = list(first.ciphertexts)
        else:
            cts = [cc.EvalAddMany(list(group)) for group in zip(*(v.ciphertexts for v in vectors), strict=True)]
    out = first._derive(cts, _result_dtype(vectors), first.mults, all(v.padded for v in vectors))
    return out if scale is None else out * scale


# -- helpers shared with threshold.py -----------------------------------------------------------------------------


def unpack_values(
    plaintexts: list[Any], length: int, dtype: str, slots: int, padded: bool = False, noise: float = 0.0
) -> np.ndarray:
    """The decrypted values; ``noise`` bounds what honest decryption noise (flooding) may leave in padding slots."""
    out = np.empty(len(plaintexts) * slots, dtype=np.float64)
    for i, pt in enumerate(plaintexts):
        bits = pt.GetLogPrecision()
        if not bits >= MIN_PRECISION_BITS:
            raise CryptoError(
                f"decryption is noise ({bits:.1f} bits of precision): wrong key, tampered ciphertext or overflow"
            )
        out[i * slots : (i + 1) * slots] = pt.GetRealPackedValueArray()[:slots]
    if not np.isfinite(out).all():
        raise CryptoError("decryption produced non-finite values: wrong key, tampered ciphertext or overflow")
    values = out[:length]
    if padded and length < out.size:
        pad = float(np.max(np.abs(out[length:])))
        if pad > max(noise, PAD_TOLERANCE * max(1.0, float(np.max(np.abs(values))))):
            raise CryptoError(
                f"the slots past the declared length {length} hold data (|x| up to {pad:.3g}): a cut length"
            )
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


class _Head(NamedTuple):
    length: int
    dtype: str
    tag: str
    mults: int
    id: str
    shape: tuple[int, int]
    padded: bool


def read_vector_meta(
    context: Context,
    meta: dict[str, Any],
    items: list[memoryview],
    what: str,
    length: int | None = None,
    padded: bool | None = None,
    dtype: str | None = None,
) -> _Head:
    """The vector fields of a frame's metadata, each checked against the context and the receiver's expectations."""
    context._check_meta(meta, what)
    head = _Head(
        wire.field(meta, "length", int, what),
        wire.field(meta, "dtype", str, what),
        wire.field(meta, "tag", str, what),
        wire.field(meta, "mults", int, what),
        wire.field(meta, "id", str, what),
        tuple(wire.field(meta, "shape", list, what)),  # type: ignore[arg-type]
        wire.field(meta, "padded", bool, what),
    )
    if head.dtype not in _DTYPES:
        raise CryptoError(f"{what}: unsupported dtype {head.dtype!r}")
    if not 0 <= head.mults <= context.params.depth:
        raise CryptoError(f"{what}: level {head.mults} is outside this context's depth {context.params.depth}")
    if head.length < 1 or len(items) != -(-head.length // context.slots):
        raise CryptoError(
            f"{what}: {len(items)} ciphertexts cannot hold {head.length} values at {context.slots} slots each"
        )
    if wire.field(meta, "n", int, what) != len(items):
        raise CryptoError(f"{what}: the header announces {meta['n']} ciphertexts, the frame holds {len(items)}")
    if len(head.id) != _ID_HEX or not all(c in "0123456789abcdef" for c in head.id):
        raise CryptoError(f"{what}: the vector id is not {_ID_HEX} lowercase hex digits")
    if len(head.shape) != 2:
        raise CryptoError(f"{what}: metadata field 'shape' is not [level, noise-scale degree]")
    if length is not None and head.length != length:
        raise CryptoError(f"{what}: holds {head.length} values, expected {length}")
    if dtype is not None and head.dtype != dtype:
        raise CryptoError(f"{what}: declares dtype {head.dtype}, expected {dtype}")
    if padded is not None and head.padded != padded:
        raise CryptoError(f"{what}: {'not ' if padded else ''}zero-padded, expected the opposite")
    return head


def parse_checked(
    context: Context, items: list[memoryview], kind: str, head: _Head, what: str, exact: bool = True
) -> list[Any]:
    """Each item against the exact layout of its kind and shape in this context (or, when ``exact`` is off and no
    layout has its size, through the isolated parser and an honest sample's fields), then OpenFHE's parse."""
    for item in items:
        try:
            layout.check(context, kind, head.shape, item, head.tag, what)  # type: ignore[arg-type]
        except layout.NoLayout:
            if exact:
                raise
            _isolated(context, item, kind, head, what)
    return [context._parse(item, _deser_ct, what) for item in items]


def _isolated(context: Context, item: memoryview, kind: str, head: _Head, what: str) -> None:
    from trustgrad.crypto.sandbox import sandbox_for

    got = sandbox_for(context).parse("ciphertext", item, what)
    want = {**layout.expected_meta(context, kind, head.shape), "tag": head.tag}  # type: ignore[arg-type]
    wrong = sorted(k for k in want if got.get(k) != want[k])
    if wrong:
        raise CryptoError(f"{what}: its OpenFHE fields {', '.join(wrong)} are not those of an honest {kind}")


def ciphertexts_shape(cts: list[Any]) -> tuple[int, int]:
    shapes = {layout.shape_of(ct) for ct in cts}
    if len(shapes) != 1:
        raise CryptoError(f"the ciphertexts of one vector are at different levels {sorted(shapes)}")
    return shapes.pop()


def canonical_items(context: Context, objs: list[Any], kind: str, tag: str) -> list[bytes]:
    with wire.openfhe_errors(f"serializing a {kind}"):
        return [layout.serialize(context, obj, kind, layout.shape_of(obj), tag) for obj in objs]


def _check_tags(cts: list[Any], tag: str, what: str) -> None:
    for ct in cts:
        if str(ct.GetKeyTag()) != tag:
            raise CryptoError(f"{what}: a ciphertext's key tag does not match the header")


def _deser_ct(b: bytes) -> Any:
    return openfhe.DeserializeCiphertextString(b, openfhe.BINARY)
