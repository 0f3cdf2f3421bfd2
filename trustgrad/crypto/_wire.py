"""Byte framing and pre-parse validation for everything the crypto package sends or receives.

Why so careful: OpenFHE's binary deserializer trusts its input. Fuzzing it here (1.6.1) showed that a flipped bit in
the metadata of a serialized ciphertext (e.g. a modulus) can make it throw from a ``noexcept`` path, which calls
``std::terminate`` and kills the whole Python process; catching exceptions is not enough. Untrusted bytes therefore
pass these gates:

1. The frame: ``magic | version | kind | meta length | item count | item lengths | CRC-32 | meta (JSON) | items``.
   Truncated, oversized, garbage, corrupted or tampered input is rejected here, before OpenFHE sees a byte, with a
   one-line ``CryptoError``. The metadata names the context (fingerprint, ring dimension), the key tag, lengths and
   party indices, all checked against what the receiver expects.
2. OpenFHE's own parse, with any exception converted to ``CryptoError``; then the parsed object's key tag is compared
   with the header's.

Residual risk, stated plainly: the CRC detects corruption and naive tampering, it is not authentication. A peer that
*deliberately* crafts a payload with a valid CRC can still reach OpenFHE's parser and, with the right bytes, abort the
receiving process. A structural pre-check (byte-compare everything but the coefficients against a locally made
object) was tried and abandoned: cereal writes each polynomial's parameter block either in full or as a back-reference
depending on the object's history (fresh, deserialized, derived from a deserialized key), so legitimate layouts
multiply. Against active attackers, authenticate peers at the transport (TLS, signed messages) or parse in a
sacrificial subprocess.
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
