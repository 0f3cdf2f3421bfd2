"""Threshold key set-up that no single party controls: shares on a common element, committed, summed by everyone.

The steps are in :mod:`trustgrad.crypto.threshold`'s docstring; this module is one party's computations, bytes in
and bytes out (the transport, commitments exchange and naming of deviators: :mod:`trustgrad.secure.keys`).

Why each piece (a rogue party reads this code and controls every byte it sends):

- **Common element from a joint seed** (:mod:`trustgrad.crypto.crs`): whoever picks ``a`` can pick one with a
  trapdoor; derived from a seed every party contributed to (committed first), nobody picked it.
- **Commit before reveal**: a contribution ``b_r = b_own - sum(b_honest)`` would cancel the honest shares and leave a
  joint key whose secret is the rogue's alone; it needs the honest contributions first, and they are revealed only
  after every commitment is in. Commitments are BLAKE2b-256 of the contribution's bytes (binding under collision
  resistance; contributions are RLWE samples, so the digest hides them).
- **Every party sums itself**, including its own contribution, so an honest party's key always contains its share;
  the digests of the joint keys are compared before anyone encrypts.

Evaluation keys: relinearisation round 1 contributions sit on a common element like the public key (OpenFHE
``MultiKeySwitchGen`` on it, summed with ``MultiAddEvalKeys``); round 2 contributions are ``s_i`` times the joint
round-1 key (``MultiMultEvalKey``, summed with ``MultiAddEvalMultKeys``, which adds both halves); rotation keys sit
on a common element per index (``MultiEvalAtIndexKeyGen``, summed with ``MultiAddEvalAutomorphismKeys``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import openfhe

from trustgrad.crypto import wire
from trustgrad.crypto.context import MAX_PARTIES, Context, PublicKey
from trustgrad.crypto.crs import CommonElement, towers
from trustgrad.crypto.threshold import KeyShare
from trustgrad.errors import CryptoError

__all__ = [
    "SEED_BYTES",
    "commitment",
    "joint_seed",
    "key_digest",
    "digest",
    "common_public_key",
    "threshold_share",
    "joint_public_key",
    "common_eval_mult",
    "eval_mult_round1",
    "joint_eval_round1",
    "eval_mult_round2",
    "joint_eval_mult",
    "RotationElements",
    "deserialize_key_map",
    "common_rotations",
    "rotation_contribution",
    "rotation_keys",
    "joint_rotations",
    "threshold_keys",
]

log = logging.getLogger(__name__)

SEED_BYTES = 32


def commitment(data: bytes) -> bytes:
    """BLAKE2b-256 commitment to ``data`` (domain-separated from every other digest in trustgrad)."""
    return hashlib.blake2b(data, digest_size=32, person=b"tg-key-commit").digest()


def joint_seed(revealed: Mapping[int, bytes]) -> bytes:
    """The seed of the common elements from every party's revealed random bytes (party order, fixed length)."""
    if any(len(r) != SEED_BYTES for r in revealed.values()):
        raise CryptoError(f"seed contributions must be {SEED_BYTES} bytes each")
    h = hashlib.blake2b(digest_size=32, person=b"tg-key-seed")
    for index in sorted(revealed):
        h.update(index.to_bytes(4, "little") + revealed[index])
    return h.digest()


def key_digest(public_key: PublicKey) -> bytes:
    """What the parties compare at the end: BLAKE2b-256 of the joint key's bytes (with its evaluation keys)."""
    return digest(public_key.to_bytes())


def digest(key_bytes: bytes) -> bytes:
    """:func:`key_digest` of an already serialized key."""
    return hashlib.blake2b(key_bytes, digest_size=32, person=b"tg-joint-key").digest()


def _tag(seed: bytes) -> str:
    """The joint key's tag: the same at every party (OpenFHE otherwise tags a sum like its first operand). 32 hex
    characters, as OpenFHE's own tags: the wire's exact layouts (crypto/layout.py) fix the tag's length."""
    return hashlib.blake2b(seed, digest_size=16, person=b"tg-key-tag").hexdigest()


# -- the public key -------------------------------------------------------------------------------------------------


def common_public_key(context: Context, seed: bytes) -> CommonElement:
    """The public key element every party makes its share on (same bytes at every party for the same seed)."""
    cc = context.cc

    def pair() -> tuple[Any, Any]:
        kp = cc.KeyGen()
        return kp.publicKey, cc.MultipartyKeyGen(kp.publicKey, False, True).publicKey

    common = CommonElement(context, seed, "public key", pair, _deser_pk)
    common.tag = _tag(seed)
    return common


def threshold_share(common: CommonElement, *, index: int, parties: int) -> tuple[bytes, KeyShare]:
    """Party ``index``'s contribution (its public key part, bytes) and its secret share, on ``common``."""
    if not 2 <= parties <= MAX_PARTIES or not 1 <= index <= parties:
        raise CryptoError(f"threshold keys need 2 to {MAX_PARTIES} parties and 1 <= index <= parties")
    cc = common.context.cc
    with wire.openfhe_errors("threshold key share"):
        kp = cc.MultipartyKeyGen(common.value, False, True)  # fresh: b_i = -a s_i + e_i, not added to anything
        data = openfhe.Serialize(kp.publicKey, openfhe.BINARY)
    return data, KeyShare(common.context, kp.secretKey, index=index, parties=parties)


def joint_public_key(
    common: CommonElement, contributions: Mapping[int, bytes], parties: int, names: Mapping[int, str] | None = None
) -> PublicKey:
    """Check every party's contribution is on ``common`` (naming the first that is not) and sum them."""
    cc, tag = common.context.cc, common.tag
    joint = _fold(common, contributions, parties, names or {}, _deser_pk, lambda x, y: cc.MultiAddPubKeys(x, y, tag))
    return PublicKey(common.context, joint, parties=parties, joined=parties)


# -- relinearisation key --------------------------------------------------------------------------------------------


def common_eval_mult(context: Context, seed: bytes) -> CommonElement:
    cc = context.cc

    def pair() -> tuple[Any, Any]:
        k1, k2 = cc.KeyGen(), cc.KeyGen()
        base = cc.KeySwitchGen(k1.secretKey, k1.secretKey)
        return base, cc.MultiKeySwitchGen(k2.secretKey, k2.secretKey, base)

    return CommonElement(context, seed, "relinearisation key", pair, _deser_evk)


def eval_mult_round1(share: KeyShare, common: CommonElement) -> bytes:
    """Round 1: this party's key-switching key from ``s_i`` to ``s_i`` on the common element."""
    with wire.openfhe_errors("relinearisation key round 1"):
        return openfhe.Serialize(share.context.cc.MultiKeySwitchGen(share._sk, share._sk, common.value), openfhe.BINARY)


def joint_eval_round1(
    common: CommonElement, contributions: Mapping[int, bytes], parties: int, tag: str, names: Mapping[int, str] = {}
) -> Any:
    cc = common.context.cc
    return _fold(common, contributions, parties, names, _deser_evk, lambda x, y: cc.MultiAddEvalKeys(x, y, tag))


def eval_mult_round2(share: KeyShare, round1: Any, tag: str) -> bytes:
    """Round 2: ``s_i`` times the joint round-1 key."""
    with wire.openfhe_errors("relinearisation key round 2"):
        return openfhe.Serialize(share.context.cc.MultiMultEvalKey(share._sk, round1, tag), openfhe.BINARY)


def joint_eval_mult(context: Context, contributions: Mapping[int, bytes], parties: int, tag: str) -> Any:
    """The joint relinearisation key from every party's round-2 part (not installed)."""
    _all_parties(contributions, parties)
    keys = [
        context._parse_isolated(memoryview(contributions[i]), _deser_evk, "eval key", f"party {i}'s round 2")
        for i in sorted(contributions)
    ]
    cc = context.cc
    with wire.openfhe_errors("summing relinearisation round 2"):
        return functools.reduce(lambda x, y: cc.MultiAddEvalMultKeys(x, y, tag), keys)


# -- rotation keys --------------------------------------------------------------------------------------------------


class RotationElements:
    """The common elements of the rotation keys of ``indices``, one element per index, derived when asked for.

    Why one index at a time: a whole set of rotation keys is ~245 MB at N = 16384 (13 indices), and deriving it,
    making a party's keys on it and combining every party's set held several copies of that at once (2.7 GB per rank
    in the demo's blind job). One index is ~19 MB; the combiner adds every party's key of one index before the next
    (``secure.evaluation_keys``). Each index has its own element, drawn under its own label: keys of two indices on
    one ``a`` would hand out the difference of two automorphisms of the secret plus small noise."""

    def __init__(self, context: Context, seed: bytes, indices: Sequence[int]) -> None:
        idx = sorted({int(i) for i in indices})
        if not idx or 0 in idx:
            raise CryptoError("rotation indices must be non-zero integers")
        self.context, self.seed, self.indices = context, seed, idx
        self._pattern: Any = None  # which towers of a one-index key are a's: learnt with the first element
        self._base: tuple[bytes, int] | None = None  # a one-index map's bytes and where its map key is (_learn)
        self._learnt = False

    def element(self, index: int) -> CommonElement:
        """The common element of rotation ``index`` (a one-index key map on the seed's ``a``)."""
        if index not in self.indices:
            raise CryptoError(f"rotation {index} is not one of this set-up's indices {self.indices}")
        cc = self.context.cc

        def installed() -> tuple[Any, Any]:
            # throwaway keys, installed under their own tag (OpenFHE's free-standing EvalAutomorphismKeyGen maps do
            # not serialize to maps MultiEvalAtIndexKeyGen can use); only their layout is used
            k = cc.KeyGen()
            cc.EvalAtIndexKeyGen(k.secretKey, [index])
            return k, cc.GetEvalAutomorphismKeyMap(k.secretKey.GetKeyTag())

        def pair() -> tuple[Any, Any]:  # which towers are a's: the same for every index, learnt once
            k, base = installed()
            return base, cc.MultiEvalAtIndexKeyGen(cc.KeyGen().secretKey, base, [index], k.secretKey.GetKeyTag())

        # release: the throwaway keys stay installed in OpenFHE's process-wide map until cleared (only all tags at
        # once in the 1.6.1 bindings): callers derive these before installing any rotation key they need
        def template() -> Any:
            return self._template(index) or installed()[1]

        common = CommonElement(
            self.context, self.seed, f"rotation key {index}", pair, deserialize_key_map,
            template, cc.ClearEvalAutomorphismKeys, self._pattern,
        )  # fmt: skip
        self._pattern = common.pattern
        common.indices = [index]
        return common

    def _template(self, index: int) -> bytearray | None:
        """The bytes of a one-index key map for ``index`` made without generating a key: a throwaway map's bytes with
        its map key (the automorphism index) rewritten. A template's ``a`` towers are overwritten and its ``b``
        towers are never read (``MultiEvalAtIndexKeyGen`` takes only the ``a`` of the map it is given), so only
        its map key tells one index's template from another's; generating a throwaway key per index was half the
        time of deriving the elements. ``None`` if the map key was not found (:meth:`_learn`): a key is then
        generated per index."""
        if not self._learnt:
            self._base, self._learnt = self._learn(), True
        if self._base is None:
            return None
        data, offset = self._base
        out = bytearray(data)
        out[offset : offset + 4] = int(self.context.cc.FindAutomorphismIndices([index])[0]).to_bytes(4, "little")
        return out

    def _learn(self) -> tuple[bytes, int] | None:
        """Where the map key is, found by difference as the towers are (crypto/crs.py): two throwaway maps of one
        secret key, for the first and the last index, differ outside their RNS towers only there, and there each
        holds its automorphism index (a 32-bit little-endian word). Anything else: ``None``."""
        cc, n = self.context.cc, self.context.ring_dim
        first, last = self.indices[0], self.indices[-1]
        if first == last:
            return None
        with wire.openfhe_errors("rotation keys' template"):
            k = cc.KeyGen()

            def one(index: int) -> bytes:
                cc.EvalAtIndexKeyGen(k.secretKey, [index])
                data = openfhe.Serialize(cc.GetEvalAutomorphismKeyMap(k.secretKey.GetKeyTag()), openfhe.BINARY)
                cc.ClearEvalAutomorphismKeys()  # as every element's release: nothing else is installed yet
                return data

            a, b = one(first), one(last)
            want = [int(cc.FindAutomorphismIndices([i])[0]) for i in (first, last)]
        ta, tb = towers(a, n), towers(b, n)
        if len(a) != len(b) or not ta.offsets or ta.offsets != tb.offsets:
            return None
        outside = np.ones(len(a), dtype=bool)
        for o in ta.offsets:
            outside[o : o + 8 * n] = False
        diff = np.flatnonzero((np.frombuffer(a, dtype=np.uint8) != np.frombuffer(b, dtype=np.uint8)) & outside)
        if not diff.size or diff[-1] - diff[0] >= 4:
            return None
        found = [
            o for o in range(max(0, int(diff[-1]) - 3), int(diff[0]) + 1)
            if [int.from_bytes(x[o : o + 4], "little") for x in (a, b)] == want
        ]  # fmt: skip
        return (a, found[0]) if len(found) == 1 else None


def common_rotations(context: Context, seed: bytes, indices: Sequence[int]) -> RotationElements:
    """The rotation keys' common elements (one per index: ``.element(index)``)."""
    return RotationElements(context, seed, indices)


def rotation_contribution(share: KeyShare, common: CommonElement, tag: str) -> bytes:
    """This party's rotation keys on ``common`` (its indices: one, for an element of :class:`RotationElements`)."""
    with wire.openfhe_errors("rotation key contribution"):
        return openfhe.Serialize(rotation_keys(share, common, tag), openfhe.BINARY)


def rotation_keys(share: KeyShare, common: CommonElement, tag: str) -> Any:
    """:func:`rotation_contribution` as the OpenFHE key map (the combiner adds its own without parsing it back)."""
    with wire.openfhe_errors("rotation key contribution"):
        return share.context.cc.MultiEvalAtIndexKeyGen(share._sk, common.value, common.indices, tag)


def joint_rotations(
    common: CommonElement,
    contributions: Mapping[int, bytes],
    parties: int,
    tag: str,
    names: Mapping[int, str] = {},
    start: Any = None,
) -> Any:
    """Check every contribution against ``common`` and sum them; ``start`` (optional): a key map of this party's
    own to add them to (it is not checked: this party made it)."""
    cc = common.context.cc

    def add(x: Any, y: Any) -> Any:
        return cc.MultiAddEvalAutomorphismKeys(x, y, tag)

    total = _fold(common, contributions, parties, names, deserialize_key_map, add)
    if start is None:
        return total
    with wire.openfhe_errors(f"summing the {common.label}"):
        return add(start, total)


def install(
    public_key: PublicKey, eval_mult: Any = None, rotations: Any = None, indices: Sequence[int] = ()
) -> PublicKey:
    """Install joint evaluation keys under the joint key's tag; returns the public key that carries them.
    ``rotations``: a key map, or a list of them (one per index)."""
    cc = public_key.context.cc
    with wire.openfhe_errors("installing the joint evaluation keys"):
        if eval_mult is not None:
            cc.InsertEvalMultKey([eval_mult])
        # one key map per index (RotationElements) or one for all: OpenFHE adds each map's keys to the tag's
        maps = rotations if isinstance(rotations, (list, tuple)) else [] if rotations is None else [rotations]
        for keys in maps:
            cc.InsertEvalAutomorphismKey(keys, public_key.tag)
    return PublicKey(
        public_key.context,
        public_key._pk,
        parties=public_key.parties,
        joined=public_key.joined,
        eval_mult=public_key.eval_mult or eval_mult is not None,
        rotations=sorted(set(public_key.rotations) | set(indices)),
    )


# -- in one process -------------------------------------------------------------------------------------------------


def threshold_keys(context: Context, parties: int, seed: bytes | None = None) -> tuple[PublicKey, list[KeyShare]]:
    """All parties' steps in one process (tests, experiments): the joint key and every share.

    >>> from trustgrad.crypto import CKKSParams
    >>> ctx = Context(CKKSParams.for_aggregation("threshold", ring_dim=1024, security="none", allow_insecure=True))
    >>> pk, shares = threshold_keys(ctx, 3)
    >>> pk.complete, [s.index for s in shares]
    (True, [1, 2, 3])
    """
    import secrets

    seed = seed if seed is not None else joint_seed({i: secrets.token_bytes(SEED_BYTES) for i in range(1, parties + 1)})
    common = common_public_key(context, seed)
    made = [threshold_share(common, index=i, parties=parties) for i in range(1, parties + 1)]
    pk = joint_public_key(common, {s.index: c for c, s in made}, parties)
    return pk, [s for _, s in made]


def _fold(
    common: CommonElement,
    contributions: Mapping[int, bytes],
    parties: int,
    names: Mapping[int, str],
    parse: Callable[[bytes], Any],
    add: Callable[[Any, Any], Any],
) -> Any:
    """Check each contribution against ``common`` and add it to the running sum, one at a time (rotation key
    sets are hundreds of MB each: holding all n parsed at once is what exhausts memory). A contribution is another
    party's bytes: its towers are checked here, and OpenFHE parses it first in the isolated helper (docs/wire.md), so
    crafted metadata around honest-looking towers costs the helper, not this party."""
    _all_parties(contributions, parties)
    total = None
    for index in sorted(contributions):
        who = names.get(index, f"party {index}")
        common.check(contributions[index], who)
        kind = _ISOLATED_KIND[parse]
        key = common.context._parse_isolated(memoryview(contributions[index]), parse, kind, f"{who}'s {common.label}")
        with wire.openfhe_errors(f"summing the {common.label}"):
            total = key if total is None else add(total, key)
    return total


def _all_parties(contributions: Mapping[int, bytes], parties: int) -> None:
    if sorted(contributions) != list(range(1, parties + 1)):
        raise CryptoError(f"contributions of parties {sorted(contributions)}; all of 1..{parties} are required")


def _deser_pk(b: bytes) -> Any:
    return openfhe.DeserializePublicKeyString(b, openfhe.BINARY)


def _deser_evk(b: bytes) -> Any:
    return openfhe.DeserializeEvalKeyString(b, openfhe.BINARY)


def deserialize_key_map(b: bytes) -> Any:
    """An evaluation key map (rotation keys) from its bytes; :func:`Context._parse_isolated` runs it in the helper."""
    return openfhe.DeserializeEvalKeyMapString(b, openfhe.BINARY)


#: the isolated helper's name (crypto/sandbox.py) for what each parser reads
_ISOLATED_KIND = {_deser_pk: "public key", _deser_evk: "eval key", deserialize_key_map: "eval key map"}
