"""Mutations of trustgrad crypto frames, shared by the ciphertext, public-key and partial-decryption targets.

A forger controls every byte and recomputes the CRC, so every mutant here is re-framed with a valid checksum (unless
the mutation is of the checksum itself). Families, drawn uniformly:

- ``header``: magic, version, kind, the reserved bytes, metadata length, item count, item lengths;
- ``meta``: each metadata field set to another type, an extreme or neighbouring value, deleted, or replaced by
  nesting (up to the 64 KB cap); unknown fields added;
- ``openfhe``: bytes of an item's OpenFHE serialization: a flipped bit or a set byte anywhere, an aligned 4- or
  8-byte word set to an extreme value, bytes inserted or removed (item length adjusted), an item cut, swapped,
  duplicated or replaced by an item of another object; a coefficient word set at or above its modulus;
- ``coefficient``: a coefficient word changed to another in-range value (a valid-looking encryption of something
  else; only the ciphertext and partial targets draw it: their receiver decrypts, which must refuse the noise);
- ``noop``: the honest payload re-framed, which must be accepted and mean the same.
"""

from __future__ import annotations

import json
import random
import struct
import zlib
from typing import Any

import numpy as np

from trustgrad.crypto import layout

_HEAD = struct.Struct("<4sBBHII")
_EXTREMES = [0, 1, -1, 2, 255, 256, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1]


class Frame:
    """A parsed trustgrad frame whose parts can be edited and packed again with a valid CRC."""

    def __init__(self, data: bytes) -> None:
        magic, self.version, self.kind, self.reserved, meta_len, n = _HEAD.unpack_from(data, 0)
        self.magic = magic
        pos = _HEAD.size + 8 * n + 4
        self.lens = list(struct.unpack_from(f"<{n}Q", data, _HEAD.size))
        self.meta_raw = data[pos : pos + meta_len]
        self.meta: dict[str, Any] = json.loads(self.meta_raw)
        pos += meta_len
        self.items = []
        for n_i in self.lens:
            self.items.append(data[pos : pos + n_i])
            pos += n_i
        self.meta_len: int | None = None  # an override of the announced lengths (else the true ones)
        self.n_items: int | None = None
        self.crc_delta = 0

    def pack(self, meta_raw: bytes | None = None, lens: list[int] | None = None) -> bytes:
        meta_b = meta_raw if meta_raw is not None else json.dumps(self.meta, sort_keys=True).encode()
        lens = lens if lens is not None else [len(i) for i in self.items]
        head = _HEAD.pack(
            self.magic,
            self.version,
            self.kind,
            self.reserved,
            len(meta_b) if self.meta_len is None else self.meta_len,
            len(lens) if self.n_items is None else self.n_items,
        ) + b"".join(struct.pack("<Q", n) for n in lens)
        crc = zlib.crc32(head) if self.version >= 2 else 0  # version 1 did not cover the header
        crc = zlib.crc32(meta_b, crc)
        for item in self.items:
            crc = zlib.crc32(item, crc)
        return head + struct.pack("<I", (crc + self.crc_delta) & 0xFFFFFFFF) + meta_b + b"".join(self.items)


def _deep(rng: random.Random) -> str:
    depth = rng.choice([50, 500, 1000, 5000, 30000])
    opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
    return opener * depth + "1" + closer * depth


def mutate_header(frame: Frame, rng: random.Random) -> bytes:
    field = rng.choice(["magic", "version", "kind", "reserved", "meta_len", "n_items", "lens", "crc"])
    if field == "magic":
        frame.magic = bytes(rng.randrange(256) for _ in range(4))
    elif field == "version":
        frame.version = rng.choice([0, 1, 3, 255])
    elif field == "kind":
        frame.kind = rng.choice([k for k in range(9) if k != frame.kind] + [255])
    elif field == "reserved":
        frame.reserved = rng.randrange(1, 65536)
    elif field == "meta_len":
        frame.meta_len = rng.choice([0, 1, len(frame.meta_raw) - 1, len(frame.meta_raw) + 1, 65536, 2**32 - 1])
    elif field == "n_items":
        frame.n_items = rng.choice([0, len(frame.items) - 1, len(frame.items) + 1, 2**20, 2**32 - 1])
    elif field == "lens":
        lens = [len(i) for i in frame.items]
        k = rng.randrange(len(lens))
        lens[k] = rng.choice([0, lens[k] - 1, lens[k] + 1, 2**31, 2**63, 2**64 - 1])
        return frame.pack(lens=lens)
    else:
        frame.crc_delta = rng.randrange(1, 2**32)
    return frame.pack()


def mutate_meta(frame: Frame, rng: random.Random) -> bytes:
    key = rng.choice(sorted(frame.meta) + ["extra"])
    value = frame.meta.get(key)
    how = rng.choice(["type", "extreme", "neighbour", "delete", "nest", "string"])
    if how == "nest":
        raw = json.dumps({**frame.meta, key: None}, sort_keys=True)
        raw = raw.replace(f'"{key}": null', f'"{key}": {_deep(rng)}')
        return frame.pack(meta_raw=raw.encode()[: 64 * 1024])
    if how == "delete":
        frame.meta.pop(key, None)
    elif how == "type":
        frame.meta[key] = rng.choice([None, True, 1.5, "x", [], [1, 2], {"a": 1}, str(value), [value]])
    elif how == "extreme":
        frame.meta[key] = rng.choice(_EXTREMES + [-(2**63), 10**400, 1e308])
    elif how == "neighbour" and isinstance(value, bool):
        frame.meta[key] = not value
    elif how == "neighbour" and isinstance(value, int):
        frame.meta[key] = value + rng.choice([-1, 1, -value, value])
    elif how == "neighbour" and isinstance(value, list):
        frame.meta[key] = [v + rng.choice([-1, 1]) if isinstance(v, int) else v for v in value] or [0]
    else:  # strings: near misses of the honest value
        text = str(value)
        frame.meta[key] = rng.choice(
            [text[:-1], text + "0", text.upper(), "0" * len(text), "", "float16", "float32", "object", "\u0000"]
        )
    return frame.pack()


def coefficient_words(item: bytes, template: layout.Layout) -> list[tuple[int, int]]:
    """(byte offset, modulus) of every coefficient word of an item with ``template``'s layout."""
    return [(off + 8 * j, q) for off, q in zip(template.arrays, template.moduli) for j in range(template.ring_dim)]


def mutate_openfhe(frame: Frame, rng: random.Random, layouts: list[layout.Layout], other: list[bytes]) -> bytes:
    k = rng.randrange(len(frame.items))
    item = bytearray(frame.items[k])
    how = rng.choice(["bit", "byte", "word", "insert", "remove", "cut", "swap", "foreign", "modulus", "span"])
    fitting = [lay for lay in layouts if lay.size == len(item)]
    if how == "bit":
        pos = rng.randrange(len(item))
        item[pos] ^= 1 << rng.randrange(8)
    elif how == "byte":
        item[rng.randrange(len(item))] = rng.randrange(256)
    elif how == "word":
        width = rng.choice([4, 8])
        pos = rng.randrange(0, len(item) - width) & ~(width - 1)
        value = rng.choice(_EXTREMES) % (1 << (8 * width))
        item[pos : pos + width] = value.to_bytes(width, "little")
    elif how == "insert":
        pos = rng.randrange(len(item))
        item[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.choice([1, 4, 8, 64])))
    elif how == "remove":
        pos = rng.randrange(len(item))
        del item[pos : pos + rng.choice([1, 4, 8, 64])]
    elif how == "cut":
        item = item[: rng.randrange(len(item))]
    elif how == "swap" and len(frame.items) > 1:
        frame.items[k], frame.items[-1 - k] = frame.items[-1 - k], frame.items[k]
        return frame.pack()
    elif how in ("foreign", "swap"):
        item = bytearray(rng.choice(other))
    elif how == "modulus" and fitting:
        pos, q = rng.choice(coefficient_words(bytes(item), fitting[0]))
        item[pos : pos + 8] = min(2**64 - 1, q + rng.choice([0, 1, q, 2**64])).to_bytes(8, "little")
    else:  # a span of the non-coefficient bytes set to random values
        pos = rng.randrange(len(item))
        item[pos : pos + 16] = bytes(rng.randrange(256) for _ in range(len(item[pos : pos + 16])))
    frame.items[k] = bytes(item)
    return frame.pack()


def mutate_coefficient(frame: Frame, rng: random.Random, layouts: list[layout.Layout]) -> bytes:
    k = rng.randrange(len(frame.items))
    item = bytearray(frame.items[k])
    fitting = [lay for lay in layouts if lay.size == len(item)]
    pos, q = rng.choice(coefficient_words(bytes(item), fitting[0]))
    old = int.from_bytes(item[pos : pos + 8], "little")
    new = rng.choice([(old + 1) % q, (old + rng.randrange(1, q)) % q, 0, q - 1])
    item[pos : pos + 8] = new.to_bytes(8, "little")
    frame.items[k] = bytes(item)
    return frame.pack()


def mutant(honest: bytes, rng: random.Random, layouts: list[layout.Layout], other: list[bytes], coefficients: bool):
    """(family, bytes) of one mutant of ``honest``."""
    families = ["header", "meta", "meta", "openfhe", "openfhe", "openfhe", "noop"] + ["coefficient"] * coefficients
    family = rng.choice(families)
    frame = Frame(honest)
    if family == "header":
        return family, mutate_header(frame, rng)
    if family == "meta":
        return family, mutate_meta(frame, rng)
    if family == "openfhe":
        return family, mutate_openfhe(frame, rng, layouts, other)
    if family == "coefficient":
        return family, mutate_coefficient(frame, rng, layouts)
    return family, frame.pack()


def same_values(got: np.ndarray, want: np.ndarray, tolerance: float) -> bool:
    got = np.asarray(got, dtype=np.float64)
    return got.shape == want.shape and bool(np.all(np.abs(got - want) <= tolerance))
