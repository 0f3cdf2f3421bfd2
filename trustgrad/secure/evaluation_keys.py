"""Joint evaluation keys (relinearisation and rotations) for threshold CKKS, made by the key parties over ``Comm``.

What the server needs to *compute* on ciphertexts (blind verification multiplies and rotates) beyond the public key.
Under threshold keys no party can make these alone; the rounds of :mod:`trustgrad.crypto.threshold` (eval-mult) and
:mod:`trustgrad.crypto.rotation` (rotations) run here over point-to-point messages:

1. eval-mult round 1 passes along the parties in order; the last party hands the complete round-1 key to the others;
2. party 1 sends its rotation keys (the common reference) to the others;
3. every party sends its eval-mult round-2 part and (parties >= 2) its rotation part to the last party, the combiner,
   which finishes both keys and sends the public key with them to the receivers (the server).

Only public evaluation material travels; the key parties keep the plain public key (they encrypt, never evaluate).

Not yet the joint set-up of the public key (:mod:`.keys`): here party 1's keys are the common element of the
rotation keys and round 1 is a chain, so a rogue party 1 chooses the ``a``'s and the last party combines. The
commit-reveal version on the seed's common elements is built and unit-tested (:mod:`trustgrad.crypto.keyset`,
``common_eval_mult`` / ``common_rotations``); run over the network it was OOM-killed with every party summing
~245 MB rotation key sets, and the server-combined variant did not finish its one trial run in time
(docs/threshold-keys.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..comm import Comm
from ..crypto import KeyShare, PublicKey
from ..crypto.rotation import joint_rotation_base, joint_rotation_finish, joint_rotation_part
from ..crypto.threshold import joint_eval_mult_finish, joint_eval_mult_round1, joint_eval_mult_round2
from .keys import KeyRing
from .stats import CryptoStats

__all__ = ["joint_evaluation_keys"]

_TAG = 72


def joint_evaluation_keys(
    comm: Comm, ring: KeyRing, rotations: Sequence[int], receivers: Sequence[int], stats: CryptoStats
) -> PublicKey:
    """Run on every key party of ``ring`` and every receiver; receivers get (and return) the public key with the
    joint eval-mult and rotation keys installed, key parties return theirs unchanged."""
    parties, me, pk = ring.parties, comm.rank, ring.public_key
    first, last = parties[0], parties[-1]
    with stats.timing("keygen"):
        if me not in parties:
            data, _ = comm.recv_bytes(last, _TAG)
            return PublicKey.from_bytes(ring.context, data)
        share = ring.secret
        assert isinstance(share, KeyShare), "evaluation keys need threshold key shares"
        pos = parties.index(me)
        previous = comm.recv_bytes(parties[pos - 1], _TAG)[0] if pos else None
        round1 = joint_eval_mult_round1(share, pk, previous)
        if me != last:
            comm.send_bytes(round1, parties[pos + 1], _TAG)
            round1 = comm.recv_bytes(last, _TAG)[0]
        else:
            for rank in parties[:-1]:
                comm.send_bytes(round1, rank, _TAG)
        round2 = joint_eval_mult_round2(share, pk, round1)
        if me == first:
            base = joint_rotation_base(share, pk, rotations)
            for rank in parties[1:]:
                comm.send_bytes(base, rank, _TAG)
        else:
            base = comm.recv_bytes(first, _TAG)[0]
        part = joint_rotation_part(share, pk, base) if me != first else b""
        if me != last:
            comm.send_bytes(round2, last, _TAG)
            comm.send_bytes(part, last, _TAG)
            return pk
        rounds2, parts = [round2], [part]
        for rank in parties[:-1]:
            rounds2.append(comm.recv_bytes(rank, _TAG)[0])
            parts.append(comm.recv_bytes(rank, _TAG)[0])
        full = joint_rotation_finish(joint_eval_mult_finish(pk, rounds2), base, [p for p in parts if p])
        blob = full.to_bytes()
        for rank in receivers:
            comm.send_bytes(blob, rank, _TAG)
            stats.sent(len(blob), 0)
        return pk
