"""Joint rotation keys for threshold CKKS: the server can rotate slots without any party's secret.

A rotation by k is a key switch from the automorphism ``s(X^g)`` back to ``s``; under threshold keys
``s = s_1 + ... + s_n`` and the switching key is built like the joint public key (OpenFHE ``MultiEvalAtIndexKeyGen``
/ ``MultiAddEvalAutomorphismKeys``; Mouchet et al. 2021, "Multiparty homomorphic encryption from ring-learning-with-
errors", rotation-key generation). One round, bytes in and bytes out:

  1. party 1: ``base = joint_rotation_base(share_1, pk, indices)`` (its own rotation keys; their random ``a`` parts
     are the common reference for everyone else), sent to all parties;
  2. every party i >= 2: ``part_i = joint_rotation_part(share_i, pk, base)`` (its keys for the same ``a``), sent to
     a combiner;
  3. the combiner: ``pk = joint_rotation_finish(pk, base, parts)`` sums the n key sets (key tag of the joint key) and
     installs them; ``pk.rotations`` lists the indices and ``pk.to_bytes()`` carries them to the server.

The keys are public evaluation material (like the joint eval-mult key); fusing fewer than all n parties' key sets
gives keys for a partial secret, with which rotations decrypt to noise.

In-process and legacy only: here party 1's own keys are the common element, so party 1 chooses the ``a``'s every
other party's keys sit on (with ``a = 0`` the joint keys are ``e + P s(X^g)``, from which their holder reads the joint
secret). The distributed set-up (:mod:`trustgrad.secure.evaluation_keys`) derives them from the jointly flipped seed
instead (:func:`trustgrad.crypto.keyset.common_rotations`), and its combiner checks every party's keys against them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import openfhe

from trustgrad.crypto import wire
from trustgrad.crypto.context import PublicKey
from trustgrad.crypto.keyset import deserialize_key_map
from trustgrad.crypto.threshold import KeyShare, check_joint, require_all_parties
from trustgrad.errors import CryptoError

__all__ = ["joint_rotation_base", "joint_rotation_part", "joint_rotation_finish"]

_KIND_BASE = "rot-base"
_KIND_PART = "rot-part"
_MAX_INDICES = 4096


def joint_rotation_base(share: KeyShare, public_key: PublicKey, indices: Sequence[int]) -> bytes:
    """Step 1, party 1 only: its rotation keys for ``indices`` (the common reference of the other parties)."""
    check_joint(share, public_key)
    if share.index != 1:
        raise CryptoError(f"the rotation-key base comes from party 1, not party {share.index}")
    idx = _indices(indices)
    cc = share.context.cc
    with wire.openfhe_errors("rotation key generation (party 1)"):
        cc.EvalAtIndexKeyGen(share._sk, idx)
        keys = cc.GetEvalAutomorphismKeyMap(share.tag)
        blob = openfhe.Serialize(keys, openfhe.BINARY)
    return _pack(_KIND_BASE, public_key, share, idx, blob)


def joint_rotation_part(share: KeyShare, public_key: PublicKey, base: bytes) -> bytes:
    """Step 2, every party i >= 2: its rotation keys, generated against party 1's ``base``."""
    check_joint(share, public_key)
    if share.index == 1:
        raise CryptoError("party 1 contributes the base (joint_rotation_base), not a part")
    idx, base_keys = _unpack(_KIND_BASE, public_key, base, "rotation-key base")[1:]
    cc = share.context.cc
    with wire.openfhe_errors(f"rotation key generation (party {share.index})"):
        mine = cc.MultiEvalAtIndexKeyGen(share._sk, base_keys, idx, public_key.tag)
        blob = openfhe.Serialize(mine, openfhe.BINARY)
    return _pack(_KIND_PART, public_key, share, idx, blob)


def joint_rotation_finish(public_key: PublicKey, base: bytes, parts: Sequence[bytes]) -> PublicKey:
    """Step 3, the combiner: the joint rotation keys, installed; returns ``public_key`` with ``rotations`` set."""
    index, idx, base_keys = _unpack(_KIND_BASE, public_key, base, "rotation-key base")
    if index != 1:
        raise CryptoError("rotation-key base: not from party 1")
    seen, keys = [1], [base_keys]
    for data in parts:
        i, got, k = _unpack(_KIND_PART, public_key, data, "rotation-key part")
        if got != idx:
            raise CryptoError(f"rotation-key part of party {i} is for other indices than the base")
        seen.append(i)
        keys.append(k)
    require_all_parties(seen, public_key.parties, "rotation-key parts")
    cc = public_key.context.cc
    with wire.openfhe_errors("combining rotation keys"):
        joint = functools.reduce(lambda a, b: cc.MultiAddEvalAutomorphismKeys(a, b, public_key.tag), keys)
        cc.InsertEvalAutomorphismKey(joint, public_key.tag)
    return PublicKey(
        public_key.context,
        public_key._pk,
        parties=public_key.parties,
        joined=public_key.joined,
        eval_mult=public_key.eval_mult,
        rotations=sorted(set(public_key.rotations) | set(idx)),
    )


# -- framing ------------------------------------------------------------------------------------------------------


def _indices(indices: Sequence[int]) -> list[int]:
    idx = sorted({int(i) for i in indices})
    if not idx or len(idx) > _MAX_INDICES or 0 in idx:
        raise CryptoError(f"rotation indices must be 1..{_MAX_INDICES} non-zero integers, got {list(indices)[:8]}")
    return idx


def _pack(kind: str, public_key: PublicKey, share: KeyShare, idx: list[int], blob: bytes) -> bytes:
    meta = public_key.context._meta(
        tag=public_key.tag, index=share.index, parties=share.parties, indices=idx, kind=kind
    )
    return wire.pack(wire.KIND_EVAL_ROUND2, meta, [blob])


def _unpack(kind: str, public_key: PublicKey, data: bytes, what: str) -> tuple[int, list[int], Any]:
    meta, items = wire.unpack(data, wire.KIND_EVAL_ROUND2)
    ctx = public_key.context
    ctx._check_meta(meta, what)
    if meta.get("kind") != kind or wire.field(meta, "tag", str, what) != public_key.tag or len(items) != 1:
        raise CryptoError(f"{what}: not a {kind} message for this joint public key")
    index = wire.field(meta, "index", int, what)
    idx = wire.field(meta, "indices", list, what)
    if not 1 <= index <= public_key.parties:
        raise CryptoError(f"{what}: invalid party index {index}")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
        raise CryptoError(f"{what}: malformed index list")
    keys = ctx._parse_isolated(items[0], deserialize_key_map, "eval key map", what)
    return index, _indices(idx), keys
