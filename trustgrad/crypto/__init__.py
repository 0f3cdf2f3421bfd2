"""CKKS homomorphic encryption for trustgrad: numpy in, numpy out, over OpenFHE (no torch here).

Shared key (one key pair, every worker holds the secret key; the server gets context + public key only)::

    ctx = Context(CKKSParams.for_aggregation("shared"))
    pk, sk = keygen(ctx)
    mean = decrypt(sk, aggregate([encrypt(pk, g) for g in grads], scale=1 / len(grads)))

Threshold keys (n-of-n; see :mod:`trustgrad.crypto.threshold` for the protocol): shares on a common element,
committed and summed by every party (:mod:`trustgrad.crypto.keyset`; ``threshold_keys`` runs every party in one
process), ``partial_decrypt`` per party (flooded, :mod:`trustgrad.crypto.flooding`), ``fuse``.
Everything that crosses a process boundary has ``to_bytes`` /
``from_bytes``, validated before OpenFHE parses it (:mod:`trustgrad.crypto.wire`).
"""

from trustgrad.crypto.context import Context, PublicKey, SecretKey, keygen
from trustgrad.crypto.flooding import FLOODING, NO_FLOODING, Flooding
from trustgrad.crypto.keyset import threshold_keys
from trustgrad.crypto.params import CKKSParams
from trustgrad.crypto.threshold import (
    KeyShare,
    PartialDecryption,
    fuse,
    joint_eval_mult_finish,
    joint_eval_mult_round1,
    joint_eval_mult_round2,
    partial_decrypt,
    threshold_keygen,
)
from trustgrad.crypto.vector import EncryptedVector, aggregate, decrypt, encrypt

__all__ = [
    "CKKSParams",
    "Context",
    "PublicKey",
    "SecretKey",
    "KeyShare",
    "EncryptedVector",
    "PartialDecryption",
    "keygen",
    "encrypt",
    "decrypt",
    "aggregate",
    "threshold_keygen",
    "threshold_keys",
    "Flooding",
    "FLOODING",
    "NO_FLOODING",
    "joint_eval_mult_round1",
    "joint_eval_mult_round2",
    "joint_eval_mult_finish",
    "partial_decrypt",
    "fuse",
]
