"""Joint evaluation keys (relinearisation and rotations) for threshold CKKS, made by the key parties over ``Comm``.

What the server needs to *compute* on ciphertexts (blind verification multiplies and rotates) beyond the public key.
Under threshold keys no party can make these alone, and no party may choose them either (docs/threshold-keys.md,
steps 9-11): every contribution sits on common elements derived from the seed the parties flipped for the public key
(``KeyRing.seed``, :mod:`trustgrad.crypto.keyset`), so nobody picks an ``a`` (party 1 of the old chain could: a
round-1 key on ``a = 0`` is ``e + P s``, which every party received, and reveals the joint secret).

1. **Relinearisation round 1**, as the public key: every party makes its key on the common element, commits to it,
   reveals it only once every commitment is in, checks every reveal (opens its commitment, sits on the common
   element; a party that fails is named) and sums all of them itself; the parties compare the digests of their sums.
   Every party therefore computes round 2 on a round-1 key that contains its own share and that nobody crafted:
   round 2 multiplies the round-1 key by ``s_i``, so a round-1 key handed out by one party (the old chain's last) with
   a chosen ``b`` = ``c`` would have returned ``c s_i + e`` to that party, i.e. every honest share.
2. **Relinearisation round 2**: every party sends ``s_i * joint_round1`` to the combiner (the last party), which sums.
3. **Rotations**, one index at a time: every party derives the index's common element, makes its key on it and
   sends it to the combiner only; the combiner checks each against the element (naming a party whose key is not on
   it), adds every party's key of the index, hands the joint key of that index to the receivers (the server) and
   goes on to the next index. The public key with the joint relinearisation key goes to the receivers first.

Why the combiner, and not every party summing as in step 1: rotation key sets are ~245 MB each at N = 16384; every
party receiving n of them was OOM-killed on this 2-core, 24 GB machine. What a rogue combiner can still do is spoil
the keys it hands out (verdicts then decrypt to noise and the job stops: denial of service); it sees only RLWE samples
on uniform elements, so no share leaks to it (docs/threshold-keys.md, residual risks). Why one index at a time: the
whole set, received, parsed and summed at once, held several ~245 MB copies per rank (2.0-2.9 GB per rank in the
demo's blind job); one index is ~19 MB (docs/threshold-keys.md, cost).

Re-keying after an exclusion runs all of this again among the survivors, on the fresh seed of their new set-up.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import openfhe

from ..comm import Comm
from ..crypto import KeyShare, PublicKey, wire
from ..crypto import keyset as ks
from ..errors import CryptoError
from ..tags import EVALUATION_KEYS
from .keys import KeyRing, all_to_all, check_openings, compare_views, recv_patient
from .stats import CryptoStats

__all__ = ["joint_evaluation_keys"]

log = logging.getLogger(__name__)

_TAG = EVALUATION_KEYS  # trustgrad.tags
_SMALL = 1 << 16  # commitments
_MAX_KEY = 1 << 26  # one party's rotation key of one index, or its round-2 part, is ~19 MB at N = 16384; refuse a
# peer that announces more


def joint_evaluation_keys(
    comm: Comm, ring: KeyRing, rotations: Sequence[int], receivers: Sequence[int], stats: CryptoStats
) -> PublicKey:
    """Run on every key party of ``ring`` and every receiver; receivers get (and return) the public key with the
    joint eval-mult and rotation keys installed, key parties return theirs unchanged."""
    parties, me, last = ring.parties, comm.rank, ring.parties[-1]
    with stats.timing("keygen"):
        if me not in parties:  # the server waits through the whole set-up (rotation key generation: minutes)
            return _receive(comm, ring, rotations, last)
        share = ring.secret
        if not isinstance(share, KeyShare) or not ring.seed:
            raise CryptoError("joint evaluation keys need threshold key shares from the joint key set-up")
        names = {i + 1: f"party {i + 1} (rank {r})" for i, r in enumerate(parties)}
        round1 = _round1(comm, ring, share, names)
        part = ks.eval_mult_round2(share, round1, ring.public_key.tag)
        if me != last:  # the small part first, so the combiner sums round 2 while everyone makes rotation keys
            comm.send_bytes(part, last, _TAG)
            stats.sent(len(part), 0)
            rotation = ks.common_rotations(ring.context, ring.seed, rotations)
            for index in rotation.indices:  # one index at a time: ~19 MB each, not ~245 MB for the set
                mine = ks.rotation_contribution(share, rotation.element(index), ring.public_key.tag)
                comm.send_bytes(mine, last, _TAG)
                stats.sent(len(mine), 0)
                del mine
            return ring.public_key
        _combine(comm, ring, share, rotations, part, names, receivers, stats)
        log.info("rank %d: joint evaluation keys of %d parties handed out", me, len(parties))
        return ring.public_key


def _round1(comm: Comm, ring: KeyRing, share: KeyShare, names: dict[int, str]) -> Any:
    """Step 1: commit, reveal, check, sum; every party holds the same joint round-1 key or the set-up stops."""
    me, parties, tag = comm.rank, ring.parties, ring.public_key.tag
    peers = [r for r in parties if r != me]
    party = {r: parties.index(r) + 1 for r in parties}
    common = ks.common_eval_mult(ring.context, ring.seed)
    mine = ks.eval_mult_round1(share, common)
    commitments = all_to_all(comm, peers, lambda p, seen: ks.commitment(mine), _SMALL)
    reveals = all_to_all(comm, peers, lambda p, seen: mine, 2 * common.size + _SMALL)
    check_openings(commitments, reveals, party, names, "relinearisation round-1 key")
    contributions = {**{party[p]: reveals[p] for p in peers}, party[me]: mine}
    joint = ks.joint_eval_round1(common, contributions, len(parties), tag, names)
    digest = ks.digest(openfhe.Serialize(joint, openfhe.BINARY))
    sent = {p: commitments[p] + reveals[p] for p in peers}
    compare_views(comm, peers, party, names, digest, {**sent, me: ks.commitment(mine) + mine})
    return joint


def _combine(
    comm: Comm,
    ring: KeyRing,
    share: KeyShare,
    rotations: Sequence[int],
    part: bytes,
    names: dict[int, str],
    receivers: Sequence[int],
    stats: CryptoStats,
) -> None:
    """Steps 2-3 at the combiner: round-2 parts summed and handed out with the public key; rotation keys checked and
    added one index at a time, every party's key of an index before the next (one index of one party held as bytes
    at a time: ~19 MB), each index's joint key handed out as soon as it is summed and then dropped (the combiner does
    not compute with them)."""
    ctx, pk, parties, me = ring.context, ring.public_key, ring.parties, comm.rank
    n, tag = len(parties), pk.tag
    index = {r: i for i, r in enumerate(parties, start=1)}
    parts = {index[r]: part if r == me else recv_patient(comm, r, _TAG, _MAX_KEY) for r in parties}
    head = ks.install(pk, ks.joint_eval_mult(ctx, parts, n, tag)).to_bytes()  # the public key with eval-mult
    del parts
    _hand_out(comm, head, receivers, stats)
    rotation = ks.common_rotations(ctx, ring.seed, rotations)
    for i in rotation.indices:
        common = rotation.element(i)
        total = ks.rotation_keys(share, common, tag)  # its own: made here, so neither serialized nor parsed back
        common.value = None  # only its a towers are needed from here on (to check the others')
        for rank in parties:
            if rank != me:
                theirs = recv_patient(comm, rank, _TAG, _MAX_KEY)
                total = ks.joint_rotations(common, {1: theirs}, 1, tag, {1: names[index[rank]]}, start=total)
                del theirs
        with wire.openfhe_errors("serializing the joint rotation keys"):
            _hand_out(comm, openfhe.Serialize(total, openfhe.BINARY), receivers, stats)
        del total


def _hand_out(comm: Comm, data: bytes, receivers: Sequence[int], stats: CryptoStats) -> None:
    for rank in receivers:
        comm.send_bytes(data, rank, _TAG)
        stats.sent(len(data), 0)


def _receive(comm: Comm, ring: KeyRing, rotations: Sequence[int], combiner: int) -> PublicKey:
    """A receiver (the server): the public key with the joint eval-mult key, then the joint rotation key of each
    index in turn (as the combiner sums them: one ~19 MB message each, parsed first in the isolated helper like any
    evaluation key), installed under the key's tag; the installed set must be exactly the indices asked for."""
    ctx = ring.context
    ctx.cc.ClearEvalAutomorphismKeys()  # a re-key's keys replace the old set (~245 MB), not sit beside it
    public = PublicKey.from_bytes(ctx, recv_patient(comm, combiner, _TAG))
    indices = sorted({int(i) for i in rotations})
    maps = []
    for i in indices:
        data = recv_patient(comm, combiner, _TAG, _MAX_KEY)
        maps.append(
            ctx._parse_isolated(memoryview(data), ks.deserialize_key_map, "eval key map", f"the joint rotation key {i}")
        )
        del data
    public = ks.install(public, None, maps, indices)
    del maps
    with wire.openfhe_errors("checking the joint rotation keys"):
        have = set(ctx.cc.GetExistingEvalAutomorphismKeyIndices(public.tag))
        want = set(ctx.cc.FindAutomorphismIndices(indices))
    if have != want:
        raise CryptoError(
            f"key set-up: the combiner (rank {combiner}) handed out rotation keys for other indices than {indices}"
        )
    return public
