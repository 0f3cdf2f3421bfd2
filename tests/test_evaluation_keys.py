"""Joint evaluation keys over real processes (``secure.evaluation_keys``, docs/threshold-keys.md steps 9-11): every
contribution on the seed's common elements, relinearisation round 1 committed and summed by every party, rotation
keys checked by the combiner; toy parameters (N = 1024), so a run takes seconds."""

from __future__ import annotations

import dataclasses

import numpy as np

from tests.harness import run_ranks
from trustgrad.comm import Comm
from trustgrad.config import CryptoConfig
from trustgrad.crypto import CKKSParams, Context, EncryptedVector, encrypt, fuse, partial_decrypt
from trustgrad.crypto.flooding import NO_FLOODING
from trustgrad.crypto.threshold import PartialDecryption
from trustgrad.errors import CryptoError
from trustgrad.secure.evaluation_keys import joint_evaluation_keys
from trustgrad.secure.keys import setup_keys
from trustgrad.secure.stats import CryptoStats

SMALL = {"ring_dim": 1024, "security": "none", "allow_insecure": True}
ROTATIONS = [1, 3]
TAG = 5


def _keys(rank_ctx, parties, rogue):
    comm = Comm(rank_ctx, 30.0)
    context = Context(CKKSParams.for_aggregation("threshold", depth=2, **SMALL))
    others = [r for r in range(rank_ctx.world_size) if r not in parties]
    crypto = CryptoConfig(encrypt="ckks", keys="threshold", security="none")
    ring = setup_keys(comm, crypto, parties, others, CryptoStats(), context=context)
    if rank_ctx.rank == rogue:  # its own common elements (as if it had chosen them): its keys sit on other a's
        ring = dataclasses.replace(ring, seed=bytes(32))
    try:
        public = joint_evaluation_keys(comm, ring, ROTATIONS, others, CryptoStats())
    except CryptoError as exc:
        return str(exc)
    if rank_ctx.rank in parties:  # decrypt what the server computed with the joint evaluation keys
        for _ in range(2):
            vector = EncryptedVector.from_bytes(context, comm.recv_bytes(0, TAG)[0])
            comm.send_bytes(partial_decrypt(ring.secret, vector, NO_FLOODING).to_bytes(), 0, TAG)
        return "party"
    x = np.random.default_rng(0).uniform(-1, 1, context.slots)
    ct = encrypt(public, x).ciphertexts[0]
    square = EncryptedVector(context, [context.cc.EvalMult(ct, ct)], context.slots, "float64", public.tag, 1)
    rotated = EncryptedVector(context, [context.cc.EvalRotate(ct, 3)], context.slots, "float64", public.tag, 0)
    errors = []
    for vector, want in ((square, x**2), (rotated, np.roll(x, -3))):
        for rank in parties:
            comm.send_bytes(vector.to_bytes(), rank, TAG)
        got = fuse([PartialDecryption.from_bytes(context, comm.recv_bytes(r, TAG)[0]) for r in parties])
        errors.append(float(np.max(np.abs(got - want))))
    return errors


def test_squares_and_rotations_decrypt_under_keys_every_party_made_on_common_elements():
    server, *parties = run_ranks(_keys, 4, (1, 2, 3), None)
    assert parties == ["party"] * 3
    assert max(server) < 1e-6, server  # relinearised square and rotation by 3, fused from 3 partials


def test_a_party_whose_evaluation_keys_are_not_on_the_common_elements_is_named():
    results = run_ranks(_keys, 3, (0, 1, 2), 1)  # parties only: the set-up stops before anything is handed out
    for rank in (0, 2):
        assert (
            "party 2 (rank 1)'s relinearisation key contribution is not on the common public element" in (results[rank])
        ), results
