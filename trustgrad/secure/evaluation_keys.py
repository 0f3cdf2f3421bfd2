"""Joint evaluation keys (relinearisation and rotations) for threshold CKKS, made by the key parties over ``Comm``.

What the server needs to *compute* on ciphertexts (blind verification multiplies and rotates) beyond the public key.
Under threshold keys no party can make these alone, and no party may decide them either: they are built like the
joint public key (:mod:`.keys`, :mod:`trustgrad.crypto.keyset`), on common elements derived from the seed the parties
flipped at key set-up:

1. every party makes its relinearisation round-1 key and its rotation keys on the common elements, commits to both,
   and reveals them once every commitment is in; each party checks every reveal against its commitment and the
   common elements (naming a party that fails) and sums them itself;
2. every party makes its round-2 part from the joint round-1 key, commits, reveals; each sums the parts itself;
3. the parties compare the digests of the resulting key (and their views of who sent what) and every party sends it
   to the receivers (the server), which take it only if all parties sent the same bytes.

Only public evaluation material travels.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..comm import Comm
from ..crypto import KeyShare, PublicKey
from ..crypto import keyset as ks
from ..errors import CryptoError
from .keys import KeyRing, all_to_all, check_openings, compare_views, hand_out
from .stats import CryptoStats

__all__ = ["joint_evaluation_keys"]

_MAX_KEYS = 1 << 30  # one party's rotation keys at N = 16384 are ~100 MB; refuse a peer that announces more


def joint_evaluation_keys(
    comm: Comm, ring: KeyRing, rotations: Sequence[int], receivers: Sequence[int], stats: CryptoStats
) -> PublicKey:
    """Run on every key party of ``ring`` and every receiver; everyone returns the public key with the joint
    eval-mult and rotation keys installed in its process."""
    parties, me = ring.parties, comm.rank
    with stats.timing("keygen"):
        if me not in parties:
            return hand_out(comm, ring.context, parties, receivers, None, "public key with evaluation keys")
        share = ring.secret
        if not isinstance(share, KeyShare) or not ring.seed:
            raise CryptoError("joint evaluation keys need threshold key shares from the joint key set-up")
        full, blob = _make(comm, ring, share, rotations)
        stats.sent(len(blob) * len(receivers), 0)
        hand_out(comm, ring.context, parties, receivers, full, "public key with evaluation keys", blob)
        # a party encrypts and decrypts, never evaluates: drop the evaluation keys from its OpenFHE key store
        ring.context.cc.ClearEvalAutomorphismKeys()
        return ring.public_key


def _make(comm: Comm, ring: KeyRing, share: KeyShare, rotations: Sequence[int]) -> tuple[PublicKey, bytes]:
    parties, me, pk, n = ring.parties, comm.rank, ring.public_key, len(ring.parties)
    peers = [r for r in parties if r != me]
    party = {r: parties.index(r) + 1 for r in parties}
    names = {party[r]: f"party {party[r]} (rank {r})" for r in parties}
    ctx, tag = ring.context, pk.tag

    common_mult = ks.common_eval_mult(ctx, ring.seed)  # 1. round 1 and rotations, on common elements
    common_rot = ks.common_rotations(ctx, ring.seed, rotations)
    ctx.cc.ClearEvalAutomorphismKeys()  # the throwaway templates' keys (a party holds no rotation keys of its own)
    r1, rot = ks.eval_mult_round1(share, common_mult), ks.rotation_contribution(share, common_rot, tag)
    c_own = ks.commitment(r1) + ks.commitment(rot)
    c1 = all_to_all(comm, peers, lambda p, seen: c_own, 1 << 16)
    got_r1 = all_to_all(comm, peers, lambda p, seen: r1, _MAX_KEYS)
    got_rot = all_to_all(comm, peers, lambda p, seen: rot, _MAX_KEYS)
    check_openings({p: c[:32] for p, c in c1.items()}, got_r1, party, names, "relinearisation round-1 key")
    check_openings({p: c[32:] for p, c in c1.items()}, got_rot, party, names, "rotation key set")
    joint1 = ks.joint_eval_round1(common_mult, {**{party[p]: got_r1[p] for p in peers}, party[me]: r1}, n, tag, names)
    rots = {**{party[p]: got_rot.pop(p) for p in peers}, party[me]: rot}
    joint_rot = ks.joint_rotations(common_rot, rots, n, tag, names)
    del rots, common_rot.value  # hundreds of MB each; the joint key is what is left

    r2 = ks.eval_mult_round2(share, joint1, tag)  # 2. round 2 on the joint round-1 key
    c2 = all_to_all(comm, peers, lambda p, seen: ks.commitment(r2), 1 << 16)
    got_r2 = all_to_all(comm, peers, lambda p, seen: r2, _MAX_KEYS)
    check_openings(c2, got_r2, party, names, "relinearisation round-2 part")
    mult = ks.joint_eval_mult(ctx, {**{party[p]: got_r2[p] for p in peers}, party[me]: r2}, n, tag)
    full = ks.install(pk, mult, joint_rot, common_rot.indices)
    del joint_rot

    sent = {p: c1[p] + c2[p] for p in peers}  # 3. the same key everywhere
    own = c_own + ks.commitment(r2)
    blob = full.to_bytes()  # serialized once: hundreds of MB with the rotation keys
    compare_views(comm, peers, party, names, ks.digest(blob), {**sent, me: own})
    return full, blob
