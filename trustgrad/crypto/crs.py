"""The common public element of threshold key generation, drawn from a seed no single party controls.

Every party's key share is an RLWE sample on one public polynomial ``a``: ``b_i = -a s_i + e_i`` (public key), and
likewise one vector of ``a``'s per evaluation key (relinearisation round 1, each rotation). The joint key is the sum of
the ``b_i`` on that ``a`` (OpenFHE ``MultiAddPubKeys`` / ``MultiAddEvalKeys`` / ``MultiAddEvalAutomorphismKeys``,
which keep the ``a`` of their first argument). Whoever chooses ``a`` can break everything: with ``a`` = 1 the joint
public key is ``-s + e`` and every ciphertext decrypts without any share; with a trapdoored ``a`` (NTRU-like
``g / f``, small ``f, g``) it is the same in disguise. So ``a`` must be a random oracle output on a seed that the
parties flip together (commit, then reveal; :mod:`trustgrad.secure.keys`), and every contribution must be checked to
sit on exactly that ``a``.

The 1.6.1 Python bindings expose no polynomial of a key, so this module works on OpenFHE's binary serialization:
a key is a sequence of RNS towers, each ``[ring_dim as uint64][ring_dim uint64 values][modulus as uint64]``. Which
towers are ``a`` is found by difference, not by assuming a layout: a template key and a key that OpenFHE generated
*on the template's* ``a`` share exactly the ``a`` towers. Those towers are then overwritten with SHAKE-256 output
reduced by rejection sampling (uniform mod q; uniform in the NTT domain is uniform in the coefficient domain, the
NTT being a bijection). ``tests/crypto/test_keyset.py`` checks that keys made this way decrypt with all shares
and not with fewer, and that a contribution on another ``a`` is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import openfhe

from trustgrad.crypto import wire
from trustgrad.crypto.context import Context
from trustgrad.errors import CryptoError

__all__ = ["Towers", "towers", "CommonElement"]

_MIN_Q_BITS, _MAX_Q_BITS = 17, 61


@dataclass(frozen=True)
class Towers:
    """The RNS towers found in a serialized key: byte offset of each tower's values and its modulus."""

    offsets: tuple[int, ...]
    moduli: tuple[int, ...]


def towers(data: bytes, ring_dim: int) -> Towers:
    """Locate every ``[N][N values < q][q]`` run in ``data`` (a serialized OpenFHE key)."""
    pat, size = ring_dim.to_bytes(8, "little"), 8 * ring_dim
    offsets, moduli, i = [], [], 0
    while (i := data.find(pat, i)) >= 0:
        end = i + 8 + size
        if end + 8 <= len(data):
            q = int.from_bytes(data[end : end + 8], "little")
            if q % 2 and _MIN_Q_BITS <= q.bit_length() <= _MAX_Q_BITS:
                values = np.frombuffer(data, dtype="<u8", count=ring_dim, offset=i + 8)
                if int(values.max()) < q:
                    offsets.append(i + 8)
                    moduli.append(q)
                    i = end
                    continue
        i += 1
    return Towers(tuple(offsets), tuple(moduli))


def _uniform(seed: bytes, label: str, index: int, q: int, n: int) -> np.ndarray:
    """n values uniform mod q from SHAKE-256(seed, label, index), by rejection of masked 64-bit words.

    The derivation: pass ``c`` = the first ``2 n`` words of SHAKE-256(seed|label|index|c); the values are the words
    below q, in order, over passes 0, 1, ... until n are found. Words are drawn only as far as needed: SHAKE is an XOF,
    so a shorter output is a prefix of the pass, and the first values found in a prefix are the pass's first values.
    Moduli just below a power of two accept almost every word, so about n words (not 2 n) are drawn for them: SHAKE
    was most of the time spent deriving the rotation keys' element. A prefix that falls short is drawn in full
    (the pass as defined), so the next pass starts where the derivation says."""
    bits = q.bit_length()
    mask, rate = np.uint64((1 << bits) - 1), q / float(1 << bits)  # rate: a word's acceptance, >= 1/2
    found: list[np.ndarray] = []
    have, counter = 0, 0
    while have < n:
        xof = hashlib.shake_256(b"%s|%s|%d|%d" % (seed, label.encode(), index, counter))
        need = n - have
        want = min(2 * n, int(need / rate + 8 * need**0.5 / rate) + 64)  # 8 sigma above the expected draws
        words = np.frombuffer(xof.digest(8 * want), dtype="<u8") & mask
        kept = words[words < np.uint64(q)]
        if kept.size < need and want < 2 * n:
            words = np.frombuffer(xof.digest(16 * n), dtype="<u8") & mask
            kept = words[words < np.uint64(q)]
        found.append(kept)
        have += kept.size
        counter += 1
    return np.concatenate(found)[:n] if len(found) > 1 else found[0][:n]


class CommonElement:
    """The public ``a`` of one kind of key, drawn from ``seed``; makes the template and checks contributions.

    ``template``/``derived`` build a pair of keys (as OpenFHE objects) where ``derived`` was made on ``template``'s
    ``a``; ``serialize``/``parse`` convert to and from bytes.
    """

    def __init__(
        self,
        context: Context,
        seed: bytes,
        label: str,
        pair: Callable[[], tuple[Any, Any]] | None,
        parse: Callable[[bytes], Any],
        template: Callable[[], Any] | None = None,
        release: Callable[[], None] | None = None,
        pattern: tuple[tuple[bool, ...], tuple[int, ...]] | None = None,
    ) -> None:
        """``template`` (optional): the key (or its serialized bytes) to draw into, when ``pair`` makes another key
        of the same kind whose tower pattern repeats in it (rotation keys: keyset.RotationElements);
        ``release`` (optional): frees what ``pair``/``template`` left in the context once their bytes are read
        (rotation key sets run to hundreds of MB: a set-up that held every copy at once was OOM-killed);
        ``pattern`` (optional, with ``template``): an earlier element's ``pattern`` of the same kind of key (which
        towers of one key are ``a``, and their moduli), so ``pair`` is not made again (rotation keys, one index at a
        time: the pattern is the same for every index, and each pair costs two key generations)."""
        self.context, self.label, self._parse = context, label, parse
        self.tag = ""  # the joint key's tag, for the public key's element (set by ``keyset``)
        self.indices: list[int] = []  # rotation indices, for the rotation keys' element
        n = context.ring_dim
        if pattern is None:
            if pair is None:
                raise CryptoError(f"common element ({label}): neither a pair of keys nor a known pattern")
            with wire.openfhe_errors(f"common element ({label})"):
                x, y = pair()
                bx, by = openfhe.Serialize(x, openfhe.BINARY), openfhe.Serialize(y, openfhe.BINARY)
            del x, y
            tx, ty = towers(bx, n), towers(by, n)
            if not tx.offsets or tx.moduli != ty.moduli:
                raise CryptoError(
                    f"common element ({label}): cannot locate the RNS towers of this OpenFHE version's keys"
                )
            one = [bx[ox : ox + 8 * n] == by[oy : oy + 8 * n] for ox, oy in zip(tx.offsets, ty.offsets)]
            if not any(one) or all(one):
                raise CryptoError(f"common element ({label}): cannot tell the public element from the key part")
            pattern = (tuple(one), ty.moduli)
            del by
        elif template is None:
            raise CryptoError(f"common element ({label}): a known pattern needs a template to draw into")
        self.pattern = pattern
        shared, moduli = list(pattern[0]), pattern[1]
        if template is not None:
            with wire.openfhe_errors(f"common element ({label})"):
                made = template()  # a key, or the bytes of one (rotation keys: keyset.RotationElements._template)
                bx = made if isinstance(made, (bytes, bytearray)) else openfhe.Serialize(made, openfhe.BINARY)
                del made
        if release is not None:
            release()
        if template is not None:
            period, tx = len(shared), towers(bx, n)
            if len(tx.offsets) % period or tx.moduli != moduli * (len(tx.offsets) // period):
                raise CryptoError(f"common element ({label}): the key's towers do not repeat the pattern of one key")
            shared = shared * (len(tx.offsets) // period)
        self.layout = tx.moduli
        self.shared = tuple(k for k, is_a in enumerate(shared) if is_a)
        data = bytearray(bx)
        del bx
        self._a: list[bytes] = []
        for k in self.shared:
            values = _uniform(seed, label, k, tx.moduli[k], n).astype("<u8").tobytes()
            data[tx.offsets[k] : tx.offsets[k] + 8 * n] = values
            self._a.append(values)
        self.size = len(data)  # the bytes themselves are not kept: rotation keys run to hundreds of MB
        self.value = context._parse(memoryview(data), parse, f"common element ({label})")
        del data

    def a_towers(self, data: bytes) -> list[bytes] | None:
        """The ``a`` towers of a serialized contribution, or ``None`` if its tower layout is not this kind's."""
        n = self.context.ring_dim
        t = towers(data, n)
        if t.moduli != self.layout:
            return None
        return [bytes(data[t.offsets[k] : t.offsets[k] + 8 * n]) for k in self.shared]

    def check(self, data: bytes, who: str) -> None:
        """Refuse a contribution (bytes) whose ``a`` is not this common element's, naming ``who``."""
        got = self.a_towers(data)
        if got is None:
            raise CryptoError(f"{who}'s {self.label} contribution does not have the layout of such a key")
        if got != self._a:
            raise CryptoError(f"{who}'s {self.label} contribution is not on the common public element")
