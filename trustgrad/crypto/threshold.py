"""Threshold (n-of-n multiparty) CKKS: no single party, and never the server, can decrypt alone.

Each function is one party's step, bytes in and bytes out, so the protocol runs over any transport
(OpenFHE threshold FHE, after Asharov et al. 2012 / Mouchet et al. 2021):

Key generation (:mod:`trustgrad.crypto.keyset`; every party on one common element, no party decides the joint key;
``secure.keys`` runs it over the network):
  1. the parties flip a seed together: each commits to 32 random bytes (``commitment``), then reveals them;
     ``seed = joint_seed(revealed)``;
  2. every party derives the same public element ``pk_common = common_public_key(ctx, seed)`` (``crypto.crs``:
     SHAKE-256 of the seed, so no party chose it) and makes its share on it:
     ``contribution_i, share_i = threshold_share(ctx, pk_common, index=i, parties=n)``;
  3. each party commits to ``contribution_i`` (BLAKE2b of its bytes) and sends the commitment to all; only when it
     holds every commitment does it reveal ``contribution_i``;
  4. every party checks each revealed contribution against its commitment and the common element, and sums them
     itself: ``pk = joint_public_key(pk_common, contributions)`` (OpenFHE ``MultiAddPubKeys``);
  5. the parties exchange ``key_digest(pk)``; equal everywhere, or the set-up stops naming who differs.
  A contribution chosen after seeing the others' (to cancel them) breaks its commitment; a contribution made on
  another element (a chain of one's own) fails the common-element check; different contributions to different
  parties give different joint keys, caught at step 5. ``threshold_keygen`` (OpenFHE's chain, in which the last
  party's key is the joint key) is kept for in-process use and to demonstrate that attack; nothing distributed uses it.
Joint evaluation keys (relinearisation, rotations) sit on common elements of the same seed (``keyset``; run by
``trustgrad.secure.evaluation_keys``): relinearisation round 1 follows the same commit / reveal / sum-by-everyone
pattern; round-2 parts and rotation keys are summed by one combiner, which checks the rotation keys' element.
Legacy in-process rounds of the relinearisation key (each party in turn):
  3'. round 1, sequential: ``r = joint_eval_mult_round1(share_i, pk, r)`` starting from ``r=None``;
  4'. round 2, any order: each party sends ``joint_eval_mult_round2(share_i, pk, r)`` to a combiner, who calls
     ``pk = joint_eval_mult_finish(pk, parts)``.
Decryption of an aggregate ``v``:
  5. every party i sends ``partial_decrypt(share_i, v).to_bytes()`` (party 1 computes the "lead" share);
  6. anyone holding all n partials calls ``fuse(partials)``. Fusing fewer than n raises ``CryptoError``
     (checked by party index before OpenFHE runs; OpenFHE itself would fail with "approximation error is too high").

Each partial decryption carries OpenFHE's fixed multiparty smudging noise (~20 bits, the only mode OpenFHE offers
for CKKS) plus flooding noise the party adds itself (:mod:`trustgrad.crypto.flooding`, on by default, sized for a
stated IND-CPA^D security target; docs/threshold-keys.md has the parameter choice and the measured precision).

t-of-n recovery (``ShareKeys`` / ``RecoverSharedKey``) is not offered. In the 1.6.1 bindings the calls exist and work
inside one process (tested in ``tests/crypto/test_threshold.py``: a recovered share decrypts correctly), but
(1) the shares are ``DCRTPoly`` objects with no serialization or pickling in Python, so they cannot be sent to the
other parties, which is the whole point; (2) ``RecoverSharedKey`` segfaults when given an empty ``PrivateKey()`` and
needs a key from ``KeyGen`` as the output buffer; (3) recovery rebuilds the dropped party's entire secret share at one
party, which then holds two shares, weakening n-of-n. A dropped party therefore means a new key generation.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import openfhe

from trustgrad.crypto import layout, wire
from trustgrad.crypto.context import MAX_PARTIES, Context, KeyShare, PublicKey
from trustgrad.crypto.flooding import FLOODING, Flooding, flood
from trustgrad.crypto.vector import (
    EncryptedVector,
    canonical_items,
    ciphertexts_shape,
    parse_checked,
    read_vector_meta,
    unpack_values,
)
from trustgrad.errors import CryptoError

__all__ = [
    "KeyShare",
    "PartialDecryption",
    "threshold_keygen",
    "joint_eval_mult_round1",
    "joint_eval_mult_round2",
    "joint_eval_mult_finish",
    "partial_decrypt",
    "fuse",
]

log = logging.getLogger(__name__)


def threshold_keygen(context: Context, parties: int, previous: PublicKey | None = None) -> tuple[PublicKey, KeyShare]:
    """One party's key-generation step: party 1 passes no ``previous``, party i the public key of party i-1."""
    if not 2 <= parties <= MAX_PARTIES:
        raise CryptoError(f"threshold keys need 2 to {MAX_PARTIES} parties, got {parties}")
    cc = context.cc
    with wire.openfhe_errors("threshold key generation"):
        if previous is None:
            index, kp = 1, cc.KeyGen()
        else:
            if previous.context.fingerprint != context.fingerprint:
                raise CryptoError("the previous public key belongs to another CKKS context")
            if previous.parties != parties:
                raise CryptoError(f"the previous public key is for {previous.parties} parties, not {parties}")
            if previous.complete:
                raise CryptoError(f"all {parties} parties have already joined this key")
            index, kp = previous.joined + 1, cc.MultipartyKeyGen(previous._pk)
    log.debug("threshold key generation: party %d of %d joined", index, parties)
    return (
        PublicKey(context, kp.publicKey, parties=parties, joined=index),
        KeyShare(context, kp.secretKey, index=index, parties=parties),
    )


def joint_eval_mult_round1(share: KeyShare, public_key: PublicKey, previous: bytes | None = None) -> bytes:
    """Round 1 of the joint relinearisation key, run by every party in turn (the first passes ``None``)."""
    ctx, cc = share.context, share.context.cc
    check_joint(share, public_key)
    if previous is None:
        contributors: list[int] = []
        with wire.openfhe_errors("eval-mult key round 1"):
            joint = cc.KeySwitchGen(share._sk, share._sk)
    else:
        what = "eval-mult round 1 message"
        meta, items = wire.unpack(previous, wire.KIND_EVAL_ROUND1)
        contributors = _contributors(ctx, meta, items, public_key, what)
        if share.index in contributors:
            raise CryptoError(f"{what}: party {share.index} has already contributed")
        prev = ctx._parse_isolated(items[0], _deser_evk, "eval key", what)
        with wire.openfhe_errors("eval-mult key round 1"):
            mine = cc.MultiKeySwitchGen(share._sk, share._sk, prev)
            joint = cc.MultiAddEvalKeys(prev, mine, public_key.tag)
    meta = ctx._meta(tag=public_key.tag, parties=share.parties, contributors=[*contributors, share.index])
    return wire.pack(wire.KIND_EVAL_ROUND1, meta, [openfhe.Serialize(joint, openfhe.BINARY)])


def joint_eval_mult_round2(share: KeyShare, public_key: PublicKey, round1: bytes) -> bytes:
    """Round 2: each party turns the complete round-1 key into its part of ``s * (s_1 + ... + s_n)``."""
    ctx, cc = share.context, share.context.cc
    check_joint(share, public_key)
    what = "eval-mult round 1 message"
    meta, items = wire.unpack(round1, wire.KIND_EVAL_ROUND1)
    contributors = _contributors(ctx, meta, items, public_key, what)
    if sorted(contributors) != list(range(1, share.parties + 1)):
        raise CryptoError(f"{what}: round 1 is incomplete (parties {sorted(contributors)} of {share.parties})")
    joint = ctx._parse_isolated(items[0], _deser_evk, "eval key", what)
    with wire.openfhe_errors("eval-mult key round 2"):
        part = cc.MultiMultEvalKey(share._sk, joint, public_key.tag)
    meta = ctx._meta(tag=public_key.tag, parties=share.parties, index=share.index)
    return wire.pack(wire.KIND_EVAL_ROUND2, meta, [openfhe.Serialize(part, openfhe.BINARY)])


def joint_eval_mult_finish(public_key: PublicKey, parts: Sequence[bytes]) -> PublicKey:
    """Combine all parties' round-2 parts; returns the joint public key carrying the eval-mult key."""
    ctx, cc = public_key.context, public_key.context.cc
    what = "eval-mult round 2 message"
    keys, seen = [], []
    for data in parts:
        meta, items = wire.unpack(data, wire.KIND_EVAL_ROUND2)
        ctx._check_meta(meta, what)
        if wire.field(meta, "tag", str, what) != public_key.tag or len(items) != 1:
            raise CryptoError(f"{what}: not for this joint public key")
        seen.append(wire.field(meta, "index", int, what))
        keys.append(ctx._parse_isolated(items[0], _deser_evk, "eval key", what))
    require_all_parties(seen, public_key.parties, "eval-mult round 2 parts")
    with wire.openfhe_errors("combining eval-mult keys"):
        final = functools.reduce(lambda a, b: cc.MultiAddEvalMultKeys(a, b, public_key.tag), keys)
        cc.InsertEvalMultKey([final])
    return PublicKey(
        ctx,
        public_key._pk,
        parties=public_key.parties,
        joined=public_key.joined,
        eval_mult=True,
        rotations=public_key.rotations,
    )


class PartialDecryption:
    """Party ``index``'s decryption share of one encrypted vector; useless without all the others."""

    __slots__ = ("context", "ciphertexts", "index", "parties", "length", "dtype", "tag", "mults", "id", "padded")

    def __init__(self, vector: EncryptedVector, ciphertexts: list[Any], index: int, parties: int) -> None:
        self.context = vector.context
        self.ciphertexts = ciphertexts
        self.index, self.parties = index, parties
        self.length, self.dtype, self.tag, self.mults, self.id, self.padded = (
            vector.length,
            vector.dtype,
            vector.tag,
            vector.mults,
            vector.id,
            vector.padded,
        )

    def __repr__(self) -> str:
        return f"PartialDecryption(party={self.index}/{self.parties}, length={self.length}, vector={self.id})"

    def to_bytes(self) -> bytes:
        meta = self.context._meta(
            tag=self.tag,
            length=self.length,
            dtype=self.dtype,
            mults=self.mults,
            id=self.id,
            index=self.index,
            parties=self.parties,
            n=len(self.ciphertexts),
            shape=list(ciphertexts_shape(self.ciphertexts)),
            padded=self.padded,
        )
        return wire.pack(
            wire.KIND_PARTIAL, meta, canonical_items(self.context, self.ciphertexts, layout.PARTIAL, self.tag)
        )

    @classmethod
    def from_bytes(
        cls,
        context: Context,
        data: bytes,
        *,
        length: int | None = None,
        parties: int | None = None,
        padded: bool | None = None,
        dtype: str | None = None,
        exact: bool = False,
    ) -> PartialDecryption:
        """Parse and validate before OpenFHE sees a byte, like ``EncryptedVector.from_bytes``; ``length``,
        ``parties``, ``padded`` and ``dtype`` are what the receiver expects (checked against what the sender
        declares); ``exact`` as there."""
        what = "partial decryption"
        meta, items = wire.unpack(data, wire.KIND_PARTIAL)
        head = read_vector_meta(context, meta, items, what, length, padded, dtype)
        index = wire.field(meta, "index", int, what)
        count = wire.field(meta, "parties", int, what)
        if not 1 <= index <= count <= MAX_PARTIES or (parties is not None and count != parties):
            raise CryptoError(f"{what}: invalid party index {index}/{count}")
        cts = parse_checked(context, items, layout.PARTIAL, head, what, exact)
        shell = EncryptedVector(context, [], head.length, head.dtype, head.tag, head.mults, head.padded)
        shell.id = head.id
        return cls(shell, cts, index, count)


def partial_decrypt(share: KeyShare, vector: EncryptedVector, flooding: Flooding = FLOODING) -> PartialDecryption:
    """This party's decryption share of ``vector`` (party 1 computes the lead share), flooded with fresh noise
    (:mod:`trustgrad.crypto.flooding`; on by default: every partial leaves the party that makes it)."""
    if not isinstance(share, KeyShare):
        raise CryptoError("partial_decrypt() needs a threshold KeyShare; use decrypt() with a shared SecretKey")
    if vector.context.fingerprint != share.context.fingerprint:
        raise CryptoError("the vector and the key share belong to different CKKS contexts")
    cc = share.context.cc
    with wire.openfhe_errors("partial decryption"):
        step = cc.MultipartyDecryptLead if share.index == 1 else cc.MultipartyDecryptMain
        cts = step(vector.ciphertexts, share._sk)
        sigma = flooding.sigma(share.context.params.scale_bits)
        cts = [flood(cc, ct, sigma, share.context.slots) for ct in cts]
    return PartialDecryption(vector, cts, share.index, share.parties)


def fuse(partials: Sequence[PartialDecryption]) -> np.ndarray:
    """Combine the partial decryptions of all parties into the plaintext (original length and dtype)."""
    if not partials:
        raise CryptoError("fuse() needs the partial decryptions of all parties, got none")
    first = partials[0]
    for p in partials[1:]:
        if p.context.fingerprint != first.context.fingerprint:
            raise CryptoError("cannot fuse partial decryptions from different CKKS contexts")
        if (p.id, p.tag, p.length, p.mults, p.padded) != (first.id, first.tag, first.length, first.mults, first.padded):
            raise CryptoError("cannot fuse partial decryptions of different encrypted vectors")
        if p.parties != first.parties:
            raise CryptoError(f"partial decryptions disagree on the party count ({first.parties} vs {p.parties})")
    require_all_parties([p.index for p in partials], first.parties, "partial decryptions")
    cc = first.context.cc
    ordered = sorted(partials, key=lambda p: p.index)
    with wire.openfhe_errors("fusing partial decryptions"):
        plaintexts = [cc.MultipartyDecryptFusion(list(group)) for group in zip(*(p.ciphertexts for p in ordered))]
    # every party floods its partial (FLOODING): padding slots hold that noise, up to 8 sigma of the sum (~1e-15
    # per slot to exceed), and a cut length must stand out above it
    noise = 8.0 * np.sqrt(first.parties) * FLOODING.sigma(first.context.params.scale_bits)
    return unpack_values(plaintexts, first.length, first.dtype, first.context.slots, first.padded, noise)


# -- helpers ------------------------------------------------------------------------------------------------------


def require_all_parties(indices: list[int], parties: int, what: str) -> None:
    dupes = sorted({i for i in indices if indices.count(i) > 1})
    if dupes:
        raise CryptoError(f"{what}: parties {dupes} appear more than once")
    missing = sorted(set(range(1, parties + 1)) - set(indices))
    if missing:
        raise CryptoError(f"{what}: missing parties {missing} (have {len(indices)} of {parties}; all are required)")
    extra = sorted(set(indices) - set(range(1, parties + 1)))
    if extra:
        raise CryptoError(f"{what}: unknown parties {extra} (expected 1..{parties})")


def check_joint(share: KeyShare, public_key: PublicKey) -> None:
    if not isinstance(share, KeyShare):
        raise CryptoError("the joint eval-mult protocol needs a threshold KeyShare")
    if not public_key.complete or public_key.parties != share.parties:
        raise CryptoError("the joint eval-mult protocol needs the complete joint public key of these parties")
    if public_key.context.fingerprint != share.context.fingerprint:
        raise CryptoError("the public key and the key share belong to different CKKS contexts")


def _contributors(
    ctx: Context, meta: dict[str, Any], items: list[memoryview], public_key: PublicKey, what: str
) -> list[int]:
    ctx._check_meta(meta, what)
    if wire.field(meta, "tag", str, what) != public_key.tag or len(items) != 1:
        raise CryptoError(f"{what}: not for this joint public key")
    contributors = wire.field(meta, "contributors", list, what)
    if not all(isinstance(i, int) and 1 <= i <= public_key.parties for i in contributors) or len(
        set(contributors)
    ) != len(contributors):
        raise CryptoError(f"{what}: malformed contributor list")
    return contributors


def _deser_evk(b: bytes) -> Any:
    return openfhe.DeserializeEvalKeyString(b, openfhe.BINARY)
