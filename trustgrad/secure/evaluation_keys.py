"""Joint evaluation keys (relinearisation and rotations) for threshold CKKS, made by the key parties over ``Comm``.

What the server needs to *compute* on ciphertexts (blind verification multiplies and rotates) beyond the public key.
Under threshold keys no party can make these alone, and no party may decide them either: every party's keys sit on
common elements derived from the seed the parties flipped at key set-up (:mod:`.keys`,
:mod:`trustgrad.crypto.keyset`), and the server -- the one rank that uses these keys -- combines them:

1. every key party sends the server the seed it holds; the server takes it only if all sent the same one and derives
   the common elements itself;
2. every party makes its relinearisation round-1 key and its rotation keys on the common elements and sends them to
   the server only (no party sees another's, so none can choose its own as a function of the others'); the server
   checks each is on the common elements (naming a party whose is not) and sums them, one at a time;
3. the server sends the joint round-1 key to every party (the same bytes to all); each party sends its round-2 part
   ``s_i * joint_round1``; the server sums them and installs both keys.

Why not every party summing, as for the public key: rotation key sets are ~245 MB each at N = 16384; n of them at
every party exhausted this 2-core, 24 GB machine's memory with 3 parties (OOM-killed), and the server, which runs the
protocol (DESIGN: honest-but-curious) and alone uses these keys, is the natural combiner. What a party could still do
is in docs/threshold-keys.md (residual risks).
"""

from __future__ import annotations

from collections.abc import Sequence

import openfhe

from ..comm import Comm
from ..crypto import KeyShare, PublicKey
from ..crypto import keyset as ks
from ..errors import CryptoError
from .keys import KeyRing
from .stats import CryptoStats

__all__ = ["joint_evaluation_keys"]

_TAG = 72
_MAX_KEYS = 1 << 30  # one party's rotation keys at N = 16384 are ~245 MB; refuse a peer that announces more


def joint_evaluation_keys(
    comm: Comm, ring: KeyRing, rotations: Sequence[int], receivers: Sequence[int], stats: CryptoStats
) -> PublicKey:
    """Run on every key party of ``ring`` and on the one receiver (the server, which combines); the receiver returns
    the public key with the joint eval-mult and rotation keys installed, the parties their plain public key."""
    if len(receivers) != 1:
        raise CryptoError("joint evaluation keys are combined by exactly one receiver (the server)")
    server = receivers[0]
    with stats.timing("keygen"):
        if comm.rank == server:
            return _combine(comm, ring, rotations)
        share = ring.secret
        if not isinstance(share, KeyShare) or not ring.seed:
            raise CryptoError("joint evaluation keys need threshold key shares from the joint key set-up")
        _contribute(comm, ring, share, rotations, server, stats)
        return ring.public_key


def _contribute(
    comm: Comm, ring: KeyRing, share: KeyShare, rotations: Sequence[int], server: int, stats: CryptoStats
) -> None:
    ctx, tag = ring.context, ring.public_key.tag
    comm.send_bytes(ring.seed, server, _TAG)
    r1 = ks.eval_mult_round1(share, ks.common_eval_mult(ctx, ring.seed))
    comm.send_bytes(r1, server, _TAG)
    rot = ks.rotation_contribution(share, ks.common_rotations(ctx, ring.seed, rotations), tag)
    ctx.cc.ClearEvalAutomorphismKeys()  # the throwaway templates' keys: a party evaluates nothing
    comm.send_bytes(rot, server, _TAG)
    stats.sent(len(r1) + len(rot), 0)
    del rot
    joint1, _ = comm.recv_bytes(server, _TAG, max_bytes=_MAX_KEYS)
    round1 = ctx._parse(memoryview(joint1), lambda b: openfhe.DeserializeEvalKeyString(b, openfhe.BINARY), "round 1")
    comm.send_bytes(ks.eval_mult_round2(share, round1, tag), server, _TAG)


def _combine(comm: Comm, ring: KeyRing, rotations: Sequence[int]) -> PublicKey:
    parties, ctx, pk = ring.parties, ring.context, ring.public_key
    n, tag = len(parties), pk.tag
    names = {i + 1: f"party {i + 1} (rank {r})" for i, r in enumerate(parties)}
    seeds = {r: comm.recv_bytes(r, _TAG, max_bytes=64)[0] for r in parties}
    if len(set(seeds.values())) != 1:
        raise CryptoError(f"key set-up: the parties hold different seeds ({sorted(seeds)}); the set-up was not joint")
    seed = seeds[parties[0]]
    common_mult, common_rot = ks.common_eval_mult(ctx, seed), ks.common_rotations(ctx, seed, rotations)
    ctx.cc.ClearEvalAutomorphismKeys()  # the templates' throwaway keys; the joint ones are installed below
    round1, joint_rot = None, None
    for i, rank in enumerate(parties, start=1):  # one party's keys at a time: ~245 MB each
        r1 = comm.recv_bytes(rank, _TAG, max_bytes=_MAX_KEYS)[0]
        one = ks.joint_eval_round1(common_mult, {1: r1}, 1, tag, {1: names[i]})
        round1 = one if round1 is None else ctx.cc.MultiAddEvalKeys(round1, one, tag)
        rot = comm.recv_bytes(rank, _TAG, max_bytes=_MAX_KEYS)[0]
        one = ks.joint_rotations(common_rot, {1: rot}, 1, tag, {1: names[i]})
        joint_rot = one if joint_rot is None else ctx.cc.MultiAddEvalAutomorphismKeys(joint_rot, one, tag)
        del rot, one
    blob = openfhe.Serialize(round1, openfhe.BINARY)
    for rank in parties:
        comm.send_bytes(blob, rank, _TAG)
    parts = {i: comm.recv_bytes(r, _TAG, max_bytes=_MAX_KEYS)[0] for i, r in enumerate(parties, start=1)}
    mult = ks.joint_eval_mult(ctx, parts, n, tag)
    return ks.install(pk, mult, joint_rot, common_rot.indices)
