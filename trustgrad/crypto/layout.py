"""Exact layouts of the OpenFHE objects trustgrad exchanges, checked before OpenFHE parses a byte of them.

OpenFHE's deserializer trusts its input (docs/wire.md has the crashes, hangs and silent errors crafted bytes cause),
so a receiver never hands it a structure it has not seen before. How:

1. Canonical form. Senders serialize ``deserialize(serialize(obj))`` (:func:`canonical`). A raw serialization
   depends on the object's history: cereal writes a polynomial's parameter block in full or as a back-reference to
   an earlier one, depending on which pointers the object happens to share. The canonical form is a fixed point, and
   for one context, kind and (level, noise-scale degree) its layout is unique: measured equal for fresh, summed,
   scaled and deserialized ciphertexts, lead and main partial decryptions, and single-party, multiparty and
   deserialized public keys.
2. A layout is learnt locally (:func:`layouts_for`): the receiver makes three objects of the same shape under a
   throwaway key of its own context and canonicalizes them. The bytes that differ between them are the coefficient
   arrays (``ring_dim`` little-endian 64-bit words after a length word) and the 32-character key tag; every other byte
   (the embedded crypto parameters, moduli, roots of unity, element and tower counts, formats, level, noise-scale
   degree, scaling factors, slots, encoding) is fixed. The moduli of the towers are read from the local template and
   checked against the samples (every tower's values below its modulus, the largest above a quarter of it).
3. :meth:`Layout.check` refuses, with a one-line ``CryptoError``, any item whose length differs, whose fixed bytes
   differ from the template, whose key tag is not the expected one, or whose coefficient is not below its modulus.
   What OpenFHE then parses is a structure it wrote itself, holding values an honest encryption can hold.

What this cannot check: coefficients in range are any ring element, so a peer can still send a well-formed encryption
of anything (a poisoned gradient, noise). Decryption refuses noise (``vector.MIN_PRECISION_BITS``); what a valid
encryption says is the business of audits and blind verification, not of the wire.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import openfhe

from trustgrad.errors import CryptoError

__all__ = [
    "CIPHERTEXT", "PARTIAL", "PUBLIC_KEY", "SECRET_KEY", "Layout", "NoLayout", "canonical", "check", "describe",
    "expected_meta", "fresh_shape", "layouts_for", "serialize", "shape_of",
]  # fmt: skip

log = logging.getLogger(__name__)

CIPHERTEXT, PARTIAL, PUBLIC_KEY, SECRET_KEY = "ciphertext", "partial decryption", "public key", "secret key"
_ELEMENTS = {CIPHERTEXT: 2, PARTIAL: 1, PUBLIC_KEY: 2, SECRET_KEY: 1}
_SAMPLES = 3  # objects a layout is learnt from: a coefficient byte equal in all three is snapped to its array
_TAG_LEN = 32  # OpenFHE key tags are 128-bit random identifiers written as 32 hex characters
_MAX_LEVEL = 64


def _deser_ct(b: bytes) -> Any:
    return openfhe.DeserializeCiphertextString(b, openfhe.BINARY)


def _deser_pk(b: bytes) -> Any:
    return openfhe.DeserializePublicKeyString(b, openfhe.BINARY)


def _deser_sk(b: bytes) -> Any:
    return openfhe.DeserializePrivateKeyString(b, openfhe.BINARY)


_DESER: dict[str, Callable[[bytes], Any]] = {
    CIPHERTEXT: _deser_ct, PARTIAL: _deser_ct, PUBLIC_KEY: _deser_pk, SECRET_KEY: _deser_sk,
}  # fmt: skip


def canonical(obj: Any, kind: str) -> bytes:
    """The canonical serialization of a (trusted, local) OpenFHE object: ``serialize(deserialize(serialize(obj)))``."""
    return openfhe.Serialize(_DESER[kind](openfhe.Serialize(obj, openfhe.BINARY)), openfhe.BINARY)


def serialize(context: Any, obj: Any, kind: str, shape: tuple[int, int], tag: str) -> bytes:
    """What a sender sends: the plain serialization when it already has the canonical layout (objects made from
    deserialized keys and ciphertexts do: a ~1 ms check instead of a ~5 ms round trip per ciphertext at N = 8192),
    else the canonical form."""
    raw = openfhe.Serialize(obj, openfhe.BINARY)
    try:
        check(context, kind, shape, raw, tag, kind)
        return raw
    except CryptoError:
        return canonical(obj, kind)


def fresh_shape(context: Any) -> tuple[int, int]:
    """(level, noise-scale degree) of a fresh encryption in ``context`` ((0, 2) under FLEXIBLEAUTOEXT, (0, 1) under
    FLEXIBLEAUTO): what a receiver that expects fresh encryptions requires."""
    with _LOCK:
        shape = context._layouts.get("fresh")
        if shape is None:
            cc = context.cc
            shape = context._layouts["fresh"] = shape_of(cc.Encrypt(cc.KeyGen().publicKey, _values(cc)))
    return shape


def shape_of(obj: Any) -> tuple[int, int]:
    """(level, noise-scale degree) of a ciphertext: with the kind and the context, what fixes its layout."""
    return int(obj.GetLevel()), int(obj.GetNoiseScaleDeg())


@dataclass(frozen=True, eq=False)
class Layout:
    """The one byte layout a canonical ``kind`` object of one shape has in one context."""

    kind: str
    shape: tuple[int, int]
    template: np.ndarray  # uint8: a canonical local object
    fixed: np.ndarray  # bool: bytes that must equal the template (all but coefficients and key tag)
    arrays: tuple[int, ...]  # byte offsets of the coefficient arrays, element-major, towers in chain order
    moduli: tuple[int, ...]  # the modulus of each array
    ring_dim: int
    tag_at: int

    @property
    def size(self) -> int:
        return int(self.template.size)

    def check(self, item: bytes | memoryview, tag: str, what: str) -> None:
        """Refuse ``item`` (one line, ``CryptoError``) unless it has exactly this layout, key ``tag`` and in-range
        coefficients. Cost: two vectorised passes over the bytes (about 1 ms per 0.4 MB ciphertext)."""
        buf = np.frombuffer(item, dtype=np.uint8)
        if buf.size != self.template.size:
            raise CryptoError(
                f"{what}: an OpenFHE {self.kind} at level {self.shape[0]} of this context has exactly "
                f"{self.template.size} bytes, got {buf.size}"
            )
        if buf[self.tag_at : self.tag_at + _TAG_LEN].tobytes() != tag.encode("ascii", "replace"):
            raise CryptoError(f"{what}: the OpenFHE key tag is not the one its header names")
        bad = np.flatnonzero((buf != self.template) & self.fixed)
        if bad.size:
            raise CryptoError(
                f"{what}: byte {int(bad[0])} of the OpenFHE {self.kind} differs from this context's layout "
                f"({bad.size} bytes of metadata, not coefficients)"
            )
        for i, (offset, q) in enumerate(zip(self.arrays, self.moduli, strict=True)):
            words = np.frombuffer(item, dtype="<u8", count=self.ring_dim, offset=offset)
            if (words >= np.uint64(q)).any():
                raise CryptoError(f"{what}: coefficient array {i} holds a value not below its modulus {q}")


# -- learning a layout -------------------------------------------------------------------------------------------

_LOCK = threading.Lock()


class NoLayout(CryptoError):
    """The item's size is none of the learnt layouts of its kind and shape. Ciphertexts that went through key
    switching (rotations, relinearisation) have layouts of their own that are not learnt; receivers that accept them
    parse them in isolation instead (``vector.parse_checked``)."""


def expected_meta(context: Any, kind: str, shape: tuple[int, int]) -> dict[str, Any]:
    """What the isolated parser must report for an honest ``kind`` of ``shape``: taken from a local sample."""
    with _LOCK:
        key = ("meta", kind, shape)
        meta = context._layouts.get(key)
        if meta is None:
            sample = _SAMPLERS[kind](context.cc, shape)[0][0]
            meta = context._layouts[key] = describe(sample)
    return meta


def describe(ct: Any) -> dict[str, Any]:
    """The fields of a parsed ciphertext that decide what it decrypts to, besides its coefficients."""
    return {
        "level": int(ct.GetLevel()), "deg": int(ct.GetNoiseScaleDeg()), "scale": float(ct.GetScalingFactor()),
        "slots": int(ct.GetSlots()), "elements": int(ct.NumberCiphertextElements()),
        "encoding": str(ct.GetEncodingType()),
    }  # fmt: skip


def check(context: Any, kind: str, shape: tuple[int, int], item: bytes | memoryview, tag: str, what: str) -> None:
    """Refuse ``item`` unless it is a canonical ``kind`` of ``shape`` in ``context`` under key ``tag``. OpenFHE has
    two honest layouts per kind and shape: objects made from a single-party key, and objects made from a
    multiparty (threshold) key, whose serialization carries more parameter blocks; the size tells which applies."""
    variants = layouts_for(context, kind, shape)
    size = len(item)
    fitting = [v for v in variants if v.size == size]
    if not fitting:
        sizes = " or ".join(str(v.size) for v in variants)
        raise NoLayout(
            f"{what}: an OpenFHE {kind} at level {shape[0]} of this context has exactly {sizes} bytes, got {size}"
        )
    for variant in fitting[:-1]:
        try:
            variant.check(item, tag, what)
            return
        except CryptoError:
            continue
    fitting[-1].check(item, tag, what)


def layouts_for(context: Any, kind: str, shape: tuple[int, int] = (0, 0)) -> tuple[Layout, ...]:
    """The layouts of a canonical ``kind`` in ``context`` (a :class:`~trustgrad.crypto.Context`) at ``shape`` =
    (level, noise-scale degree; ignored for public keys), learnt once per context and cached on it."""
    if kind in (PUBLIC_KEY, SECRET_KEY):
        shape = (0, 0)
    level, deg = shape
    if not (0 <= level <= min(context.params.depth + 1, _MAX_LEVEL) and 0 <= deg <= 2):
        raise CryptoError(f"{kind}: level {level} / noise-scale degree {deg} is impossible in this context")
    key = (kind, shape)
    with _LOCK:
        cached = context._layouts.get(key)
        if cached is None:
            try:
                families = _SAMPLERS[kind](context.cc, shape)
                cached = tuple(_learn(kind, shape, context.ring_dim, samples) for samples in families)
            except CryptoError as exc:  # remembered: a peer cannot make us learn the same failure twice
                cached = exc
            context._layouts[key] = cached
            log.debug("learnt the %s layouts at %s: %s", kind, shape, cached)
    if isinstance(cached, CryptoError):  # a shape honest senders cannot produce: remembered, refused again
        raise cached
    return cached


def _learn(kind: str, shape: tuple[int, int], ring_dim: int, samples: list[Any]) -> Layout:
    canon = [canonical(o, kind) for o in samples]
    tags = [str(o.GetKeyTag()) for o in samples]
    if len({len(c) for c in canon}) != 1:
        raise CryptoError(f"{kind}: OpenFHE's canonical layout varies between objects of one shape (unsupported)")
    tag_at = canon[0].find(tags[0].encode())
    if tag_at < 0 or any(c[tag_at : tag_at + _TAG_LEN] != t.encode() for c, t in zip(canon, tags)):
        raise CryptoError(f"{kind}: the key tag is not at one place in OpenFHE's layout (unsupported)")
    views = [np.frombuffer(c, dtype=np.uint8) for c in canon]
    varying = np.zeros(views[0].size, dtype=bool)
    for v in views[1:]:
        varying |= v != views[0]
    varying[tag_at : tag_at + _TAG_LEN] = False
    arrays = _arrays(canon[0], np.flatnonzero(varying), ring_dim, kind)
    elements = _ELEMENTS[kind]
    if not arrays or len(arrays) % elements:
        raise CryptoError(f"{kind}: {len(arrays)} coefficient arrays for {elements} elements (unsupported layout)")
    towers = len(arrays) // elements
    chain = _chain(canon[0], ring_dim, arrays)
    if len(chain) < towers:
        raise CryptoError(f"{kind}: found {len(chain)} moduli for {towers} towers (unsupported layout)")
    moduli = tuple(chain[t] for _ in range(elements) for t in range(towers))
    fixed = np.ones(views[0].size, dtype=bool)
    fixed[tag_at : tag_at + _TAG_LEN] = False
    for offset in arrays:
        fixed[offset : offset + 8 * ring_dim] = False
    for offset, q in zip(arrays, moduli):  # the tower order is right only if the samples fill each modulus
        peak = max(int(np.frombuffer(c, "<u8", ring_dim, offset).max()) for c in canon)
        if not q // 4 < peak < q:
            raise CryptoError(f"{kind}: tower moduli do not match the samples (unsupported layout)")
    return Layout(kind, shape, views[0].copy(), fixed, tuple(arrays), moduli, ring_dim, tag_at)


def _arrays(raw: bytes, varying: np.ndarray, ring_dim: int, kind: str) -> list[int]:
    """Snap every varying byte to the coefficient array holding it: ``ring_dim`` words after a length word."""
    marker, size = struct.pack("<Q", ring_dim), 8 * ring_dim
    arrays: list[int] = []
    end = -1
    for p in varying.tolist():
        if p < end:
            continue
        at = raw.rfind(marker, max(0, p - size - 7), p)
        if at < 0 or at + 8 < end:
            raise CryptoError(f"{kind}: byte {p} varies outside any coefficient array (unsupported layout)")
        arrays.append(at + 8)
        end = at + 8 + size
    return arrays


def _chain(raw: bytes, ring_dim: int, arrays: list[int]) -> list[int]:
    """The tower moduli in chain order: the parameter blocks of the crypto context (``cyclotomic order, ring_dim,
    [a version word on a type's first block], modulus, ...``) come first, one per tower, in order. A modulus is prime
    with ``q = 1 mod 2N`` (NTT-friendly); blocks inside coefficient arrays are skipped."""
    head = struct.pack("<II", 2 * ring_dim, ring_dim)
    covered = [(a, a + 8 * ring_dim) for a in arrays]
    chain: list[int] = []
    at = raw.find(head)
    while at >= 0:
        if not any(a <= at < b for a, b in covered):
            for skip in (8, 12):
                if at + skip + 8 <= len(raw):
                    (q,) = struct.unpack_from("<Q", raw, at + skip)
                    if q > 2 and q % (2 * ring_dim) == 1 and pow(3, q - 1, q) == 1 and q not in chain:
                        chain.append(q)
        at = raw.find(head, at + 1)
    return chain


# -- local samples of each kind and shape ---------------------------------------------------------------------------


def _descend(cc: Any, ct: Any, shape: tuple[int, int]) -> Any:
    """Scalar products (by random factors: a product by 1.0 leaves a tower all zero) move a fresh ciphertext
    down the chain the way honest circuits do: under OpenFHE's FLEXIBLEAUTO(EXT) scaling every product leaves degree
    2 and the next one rescales first."""
    for _ in range(2 * _MAX_LEVEL):
        now = shape_of(ct)
        if now == shape:
            return ct
        if now > shape:
            break
        ct = cc.EvalMult(ct, float(np.random.default_rng().uniform(0.5, 1.0)))
    raise CryptoError(f"level {shape[0]} / noise-scale degree {shape[1]} is not a shape this context produces")


def _values(cc: Any) -> Any:
    rng = np.random.default_rng()
    return cc.MakeCKKSPackedPlaintext(rng.uniform(-1.0, 1.0, int(cc.GetBatchSize())))


def _extend(cc: Any, public_key: Any) -> Any:
    """The next party's threshold key pair, made as parties make it: on the previous key received as bytes (a key
    extended in the process that made it serializes like a single-party key, one received does not)."""
    return cc.MultipartyKeyGen(_deser_pk(openfhe.Serialize(public_key, openfhe.BINARY)))


def _keys(cc: Any) -> list[Any]:
    """A single-party key pair and a two-party threshold one: the two families of layouts (see :func:`check`)."""
    single = cc.KeyGen()
    return [single, _extend(cc, single.publicKey)]


def _ciphertexts(cc: Any, shape: tuple[int, int]) -> list[list[Any]]:
    return [[_descend(cc, cc.Encrypt(kp.publicKey, _values(cc)), shape) for _ in range(_SAMPLES)] for kp in _keys(cc)]


def _partials(cc: Any, shape: tuple[int, int]) -> list[list[Any]]:
    _, joint = _keys(cc)
    cts = [_descend(cc, cc.Encrypt(joint.publicKey, _values(cc)), shape) for _ in range(_SAMPLES)]
    return [[cc.MultipartyDecryptMain([ct], joint.secretKey)[0] for ct in cts]]


def _public_keys(cc: Any, shape: tuple[int, int]) -> list[list[Any]]:
    singles = [cc.KeyGen() for _ in range(_SAMPLES)]
    return [[kp.publicKey for kp in singles], [_extend(cc, kp.publicKey).publicKey for kp in singles]]


def _secret_keys(cc: Any, shape: tuple[int, int]) -> list[list[Any]]:
    singles = [cc.KeyGen() for _ in range(_SAMPLES)]
    return [[kp.secretKey for kp in singles], [_extend(cc, kp.publicKey).secretKey for kp in singles]]


_SAMPLERS: dict[str, Callable[[Any, tuple[int, int]], list[list[Any]]]] = {
    CIPHERTEXT: _ciphertexts,
    PARTIAL: _partials,
    PUBLIC_KEY: _public_keys,
    SECRET_KEY: _secret_keys,
}
