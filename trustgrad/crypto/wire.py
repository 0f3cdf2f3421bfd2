"""Byte framing and pre-parse validation for everything the crypto package sends or receives.

Why so careful: OpenFHE's binary deserializer trusts its input. Crafted payloads with a valid checksum were measured
(docs/wire.md) to SIGSEGV or abort the receiving process inside the deserializer, SIGFPE or loop for minutes in
decryption, allocate gigabytes, or decode to wrong values without error; catching exceptions is not enough. A
malicious peer holds valid keys and recomputes any checksum, so untrusted bytes pass three gates:

1. The frame (this module): ``magic | version | kind | reserved (0) | meta length | item count | item lengths |
   CRC-32 | meta (JSON) | items``. The CRC covers every byte of the frame (header and reserved bytes included) and
   catches corruption, not attackers. The metadata must be a flat JSON object (no nesting: Python's parser recurses),
   of scalars and short lists of integers, and each field is checked against what the receiver expects.
2. The OpenFHE bytes of each item (:mod:`trustgrad.crypto.layout`): every object trustgrad sends is in a canonical
   form, and its exact layout is a function of the receiver's own context, the object kind and its level. Everything
   but the key tag and the coefficients must equal, byte for byte, an object the receiver made itself; the key tag
   must be the expected key's; every coefficient must be below its tower's modulus. What reaches OpenFHE is then a
   structure OpenFHE wrote itself, holding values any honest encryption could hold.
3. OpenFHE's own parse, with any exception converted to a one-line ``CryptoError``; decryption then refuses noise
   (low precision, non-finite values) and non-zero padding slots (a vector whose declared length was cut).

An earlier version byte-compared the non-coefficient bytes of the raw serialization and gave up: cereal writes each
polynomial's parameter block in full or as a back-reference depending on the object's history (fresh, deserialized,
derived from a deserialized key). Serializing ``deserialize(serialize(obj))`` removes that history: it is a fixed
point, and for a given context, kind and level its layout is one and the same (measured for fresh, summed, scaled and
deserialized ciphertexts, partial decryptions and single-party, multiparty and deserialized public keys).
"""

from __future__ import annotations

import contextlib
import json
import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

from trustgrad.errors import CryptoError

MAGIC = b"TGHE"
VERSION = 2  # 2: the CRC covers the header, the reserved bytes must be zero, canonical OpenFHE items
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
MAX_LIST = 4096  # the longest list a metadata field holds (rotation indices)


def pack(kind: int, meta: dict[str, Any], items: Sequence[bytes]) -> bytes:
    """Frame ``items`` with a header describing them."""
    meta_b = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    head = _HEAD.pack(MAGIC, VERSION, kind, 0, len(meta_b), len(items))
    lens = b"".join(_LEN.pack(len(item)) for item in items)
    crc = zlib.crc32(lens, zlib.crc32(head))
    crc = zlib.crc32(meta_b, crc)
    for item in items:
        crc = zlib.crc32(item, crc)
    return b"".join([head, lens, _CRC.pack(crc), meta_b, *items])


def unpack(data: bytes, kind: int) -> tuple[dict[str, Any], list[memoryview]]:
    """Check a frame and return its metadata and (zero-copy) item views; raise ``CryptoError`` on any defect."""
    what = KIND_NAMES[kind]
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CryptoError(f"{what}: expected bytes, got {type(data).__name__}")
    view = memoryview(data).cast("B")
    if len(view) < _HEAD.size + _CRC.size:
        raise CryptoError(f"{what}: truncated input ({len(view)} bytes, smaller than a header)")
    magic, version, got_kind, reserved, meta_len, n_items = _HEAD.unpack_from(view, 0)
    if magic != MAGIC:
        raise CryptoError(f"{what}: not trustgrad crypto data (bad magic {bytes(magic)!r})")
    if version != VERSION:
        raise CryptoError(f"{what}: unsupported format version {version} (this build reads {VERSION})")
    if got_kind != kind:
        raise CryptoError(f"expected a {what}, got a {KIND_NAMES.get(got_kind, f'unknown kind {got_kind}')}")
    if reserved != 0:
        raise CryptoError(f"{what}: reserved header bytes are {reserved:#06x}, must be zero")
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
    expected = pos + _CRC.size + meta_len + sum(lens)
    if len(view) != expected:
        state = "truncated" if len(view) < expected else "oversized"
        raise CryptoError(f"{what}: {state} input ({len(view)} bytes, header announces {expected})")
    crc = zlib.crc32(view[pos + _CRC.size :], zlib.crc32(view[:pos]))
    if crc != crc_want:
        raise CryptoError(f"{what}: checksum mismatch (corrupted or tampered bytes)")
    pos += _CRC.size
    meta = _parse_meta(bytes(view[pos : pos + meta_len]), what)
    pos += meta_len
    items = []
    for n in lens:
        items.append(view[pos : pos + n])
        pos += n
    return meta, items


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")


def _parse_meta(raw: bytes, what: str) -> dict[str, Any]:
    """The metadata: a flat JSON object of scalars and short lists of integers, nothing else."""
    try:
        meta = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:  # Python's JSON parser recurses: deep nesting is refused, never a traceback
        raise CryptoError(f"{what}: metadata is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise CryptoError(f"{what}: metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise CryptoError(f"{what}: metadata is not an object")
    for key, value in meta.items():
        if isinstance(value, list):
            if len(value) > MAX_LIST or not all(type(v) is int for v in value):
                raise CryptoError(f"{what}: metadata field {key!r} is not a short list of integers")
        elif value is not None and type(value) not in (str, int, float, bool):
            raise CryptoError(f"{what}: metadata field {key!r} is nested (only scalars and integer lists)")
    return meta


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
