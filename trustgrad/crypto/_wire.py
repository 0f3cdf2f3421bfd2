"""Byte framing and pre-parse validation for everything the crypto package sends or receives.

Why so careful: OpenFHE's binary deserializer trusts its input. A single flipped bit in the metadata of a serialized
ciphertext (e.g. a modulus) makes it throw from a ``noexcept`` path, which calls ``std::terminate`` and kills the whole
Python process; catching exceptions is not enough. So untrusted bytes pass three gates before OpenFHE sees them:

1. The frame: ``magic | version | kind | meta length | item count | item lengths | CRC-32 | meta (JSON) | items``.
   Truncated, oversized, garbage or corrupted input is rejected here (the CRC detects accidental corruption; it is
   not authentication: integrity against an active attacker comes from the transport, e.g. TLS).
2. The structure: every OpenFHE item must be byte-identical, outside its coefficient arrays and key tag, to an object
   of the same kind and state produced locally in the same context (a :class:`Template`). So an attacker controls
   only polynomial coefficients and the tag, never moduli, dimensions or lengths that OpenFHE would trust.
3. OpenFHE's own parse, with any exception converted to :class:`CryptoError`.
"""

from __future__ import annotations

import contextlib
import json
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from trustgrad.errors import CryptoError

MAGIC = b"TGHE"
VERSION = 1
KIND_CONTEXT = 1
KIND_PUBLIC_KEY = 2
KIND_SECRET_KEY = 3
KIND_VECTOR = 4
KIND_PARTIAL = 5
KIND_EVAL_ROUND1 = 6
KIND_EVAL_ROUND2 = 7
KIND_NAMES = {
    KIND_CONTEXT: "context",
    KIND_PUBLIC_KEY: "public key",
    KIND_SECRET_KEY: "secret key",
    KIND_VECTOR: "encrypted vector",
    KIND_PARTIAL: "partial decryption",
    KIND_EVAL_ROUND1: "eval-mult key round 1",
    KIND_EVAL_ROUND2: "eval-mult key round 2",
}

_HEAD = struct.Struct("<4sBBHII")  # magic, version, kind, reserved, meta length, item count
_LEN = struct.Struct("<Q")
_CRC = struct.Struct("<I")
MAX_META = 64 * 1024
MAX_ITEMS = 1 << 20  # 4 * 10**9 slots at N = 8192: far above any model we train
MAX_ITEM = 1 << 31  # 2 GiB: larger than the largest rotation-key map we have seen (215 MB)


def pack(kind: int, meta: dict[str, Any], items: Sequence[bytes]) -> bytes:
    """Frame ``items`` with a header describing them."""
    meta_b = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    crc = zlib.crc32(meta_b)
    for item in items:
        crc = zlib.crc32(item, crc)
    head = _HEAD.pack(MAGIC, VERSION, kind, 0, len(meta_b), len(items))
    lens = b"".join(_LEN.pack(len(item)) for item in items)
    return b"".join([head, lens, _CRC.pack(crc), meta_b, *items])


def unpack(data: bytes, kind: int) -> tuple[dict[str, Any], list[memoryview]]:
    """Check a frame and return its metadata and (zero-copy) item views; raise ``CryptoError`` on any defect."""
    what = KIND_NAMES[kind]
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CryptoError(f"{what}: expected bytes, got {type(data).__name__}")
    view = memoryview(data).cast("B")
    if len(view) < _HEAD.size + _CRC.size:
        raise CryptoError(f"{what}: truncated input ({len(view)} bytes, smaller than a header)")
    magic, version, got_kind, _, meta_len, n_items = _HEAD.unpack_from(view, 0)
    if magic != MAGIC:
        raise CryptoError(f"{what}: not trustgrad crypto data (bad magic {bytes(magic)!r})")
    if version != VERSION:
        raise CryptoError(f"{what}: unsupported format version {version} (this build reads {VERSION})")
    if got_kind != kind:
        raise CryptoError(f"expected a {what}, got a {KIND_NAMES.get(got_kind, f'unknown kind {got_kind}')}")
    if meta_len > MAX_META or n_items > MAX_ITEMS:
        raise CryptoError(f"{what}: header announces {n_items} items / {meta_len} metadata bytes, above the limits")
    pos = _HEAD.size
    if len(view) < pos + n_items * _LEN.size + _CRC.size:
        raise CryptoError(f"{what}: truncated input (item table cut off)")
    lens = [_LEN.unpack_from(view, pos + i * _LEN.size)[0] for i in range(n_items)]
    pos += n_items * _LEN.size
    if any(n > MAX_ITEM for n in lens):
        raise CryptoError(f"{what}: an item announces more than {MAX_ITEM} bytes")
    (crc_want,) = _CRC.unpack_from(view, pos)
    pos += _CRC.size
    expected = pos + meta_len + sum(lens)
    if len(view) != expected:
        state = "truncated" if len(view) < expected else "oversized"
        raise CryptoError(f"{what}: {state} input ({len(view)} bytes, header announces {expected})")
    crc = zlib.crc32(view[pos:])
    if crc != crc_want:
        raise CryptoError(f"{what}: checksum mismatch (corrupted or tampered bytes)")
    try:
        meta = json.loads(bytes(view[pos : pos + meta_len]))
    except (ValueError, UnicodeDecodeError):
        raise CryptoError(f"{what}: metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise CryptoError(f"{what}: metadata is not an object")
    pos += meta_len
    items = []
    for n in lens:
        items.append(view[pos : pos + n])
        pos += n
    return meta, items


def field(meta: dict[str, Any], name: str, typ: type | tuple[type, ...], what: str) -> Any:
    """Fetch a typed metadata field or raise ``CryptoError`` naming it."""
    value = meta.get(name)
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is int):
        raise CryptoError(f"{what}: metadata field {name!r} is missing or has the wrong type")
    return value


@contextlib.contextmanager
def openfhe_errors(action: str) -> Iterator[None]:
    """Convert whatever OpenFHE raises into a one-line ``CryptoError``."""
    try:
        yield
    except CryptoError:
        raise
    except Exception as exc:  # OpenFHE raises RuntimeError, TypeError, ValueError... from C++ exceptions
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        # OpenFHE prefixes messages with a build path and line; keep the informative tail.
        detail = detail.rsplit("():", 1)[-1].strip()
        raise CryptoError(f"{action} failed: {detail}") from None


class Template:
    """The byte layout shared by every legitimate serialization of one kind of OpenFHE object in one state.

    Built from several independently generated samples: bytes that differ between samples are the random parts
    (polynomial coefficients, key tags); bytes that agree are structure (parameters, moduli, sizes), which an input
    must reproduce exactly. Short agreeing runs inside random data (e.g. the zero high bytes of 40-bit coefficients,
    or chance coincidences) are folded into the random part, so only genuine metadata islands are enforced.
    """

    __slots__ = ("length", "_fixed_idx", "_fixed_val")

    # Six samples: the chance that a random high byte (16 values for a 60-bit modulus) agrees in all of them at a
    # block edge is 16**-5 per edge, so a legitimate input is never rejected in practice.
    SAMPLES = 6
    _MIN_ISLAND = 8

    def __init__(self, samples: Sequence[bytes]) -> None:
        arrays = [np.frombuffer(s, dtype=np.uint8) for s in samples]
        self.length = len(arrays[0])
        if any(len(a) != self.length for a in arrays):
            raise CryptoError("internal: template samples differ in length; this OpenFHE build is not supported")
        variable = np.zeros(self.length, dtype=bool)
        for a in arrays[1:]:
            variable |= a != arrays[0]
        # fold fixed runs shorter than _MIN_ISLAND that lie between variable bytes into the variable part
        step = np.diff(np.concatenate(([1], variable.astype(np.int8), [1])))
        starts, ends = np.flatnonzero(step == -1), np.flatnonzero(step == 1)  # fixed runs are [start, end)
        short = (ends - starts < self._MIN_ISLAND) & (starts > 0) & (ends < self.length)
        cover = np.zeros(self.length + 1, dtype=np.int64)
        np.add.at(cover, starts[short], 1)
        np.add.at(cover, ends[short], -1)
        variable |= np.cumsum(cover[:-1]) > 0
        self._fixed_idx = np.flatnonzero(~variable)
        self._fixed_val = arrays[0][self._fixed_idx]

    def check(self, item: memoryview | bytes, what: str) -> None:
        if len(item) != self.length:
            raise CryptoError(f"{what}: {len(item)} bytes where this context's layout has {self.length}")
        arr = np.frombuffer(item, dtype=np.uint8)
        if not np.array_equal(arr[self._fixed_idx], self._fixed_val):
            raise CryptoError(f"{what}: structure does not match this context (parameters, level or kind differ)")


class Layouts:
    """The legitimate layouts of one kind of object. OpenFHE's serializer (cereal) writes a shared parameter block
    once and back-references it; an object rebuilt by deserialization owns separate copies and writes them out
    again. So the same object has a "fresh" and a "deserialized" layout (the layout of a result follows its first
    operand), and both are accepted."""

    __slots__ = ("_templates",)

    def __init__(self, templates: Sequence[Template]) -> None:
        unique: dict[tuple[int, bytes, bytes], Template] = {}
        for t in templates:
            unique.setdefault((t.length, t._fixed_idx.tobytes(), t._fixed_val.tobytes()), t)
        self._templates = list(unique.values())

    def check(self, item: memoryview | bytes, what: str) -> None:
        candidates = [t for t in self._templates if t.length == len(item)]
        if not candidates:
            sizes = sorted({t.length for t in self._templates})
            raise CryptoError(f"{what}: {len(item)} bytes where this context's layout has {sizes}")
        for t in candidates[:-1]:
            try:
                t.check(item, what)
                return
            except CryptoError:
                continue
        candidates[-1].check(item, what)


def build_layouts(sample: Callable[[int, int], bytes], variants: int) -> Layouts:
    """``sample(i, variant)`` serializes the i-th independent sample of one layout variant."""
    return Layouts([Template([sample(i, v) for i in range(Template.SAMPLES)]) for v in range(variants)])
