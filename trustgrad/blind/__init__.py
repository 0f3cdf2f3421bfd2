"""Blind verification: the server checks a worker's gradient claim on ciphertexts and decrypts only a distance.

The paper's proposal (Rorat & Niyomufasha 2022) made concrete for HE-friendly models (``logreg`` with the degree-3
polynomial sigmoid, and a linear/MSE variant): data owners encrypt their samples once; the server recomputes the
gradient of one SGD step from the encrypted samples the PRF names and the encrypted model version, compares it with
the encrypted claim, and only ``||dW - dW_claim||^2 + ||db - db_claim||^2`` is decrypted. The protocol, its numbered
steps with the depth budget, and what a prover could do with its own partial decryption are in
:mod:`trustgrad.blind.step_check`; the slot layout in :mod:`trustgrad.blind.packing`; parameters in
:mod:`trustgrad.blind.params`; joint (threshold) rotation keys in :mod:`trustgrad.crypto.rotation`.

Usage (shared key; threshold: build the joint key with ``threshold_keygen``, ``joint_eval_mult_*`` and
``joint_rotation_*``, decrypt with every party's ``partial_decrypt`` and ``fuse``)::

    ctx = Context(BlindParams.for_check("poly"))                  # N=16384, depth 7, 128-bit
    lay = Layout(features=64, classes=10, slots=ctx.slots)
    pk, sk = keygen(ctx, eval_mult=True, rotations=lay.rotations)  # the server gets pk only
    store = SampleStore(lay); store.add(encrypt_samples(pk, lay, x, y, ids))        # data owners, once
    verifier = BlindVerifier(pk, lay, "poly")                                       # server
    verdict = verifier.distance(store, batch_ids, encrypt_model(pk, lay, W, b), encrypt_claim(pk, lay, dW, db))
    judge(verifier.finish(decrypt(sk, verdict)), verifier.bound).accepted

Measured (OpenFHE 1.6.1, N=16384, 1 OpenMP thread on a shared, loaded 2-core machine; ``trustgrad bench blind``,
batch 32 x 64 features x 10 classes, 256 digits at setup; plaintext numpy recomputation 1e-4 s):

=========  =====  ==================================  ==========  =========  =================  ==========
kind       depth  check (recompute + distance)        honest err  1e-4 tamp  public key (eval)  claim
=========  =====  ==================================  ==========  =========  =================  ==========
linear     5      2.15 s (2.02 + 0.13)                4.1e-11     1.0e-8     90 MB              3.1 MB
poly       7      2.94 s (2.84 + 0.10)                4.1e-11     1.0e-8     266 MB             4.2 MB
=========  =====  ==================================  ==========  =========  =================  ==========

3-party threshold keys (joint eval-mult and rotation keys): honest distances <= 8.4e-11 (poly) and 4.2e-11 (linear),
1e-4 tampering 0.99e-8 to 1.01e-8; three partial decryptions plus fusion of the verdict 0.03-0.04 s. Setup: 0.4-0.5
MB of ciphertext per sample (J = 8 samples per X/Y ciphertext pair). About 6.7 groups per batch of 32 (greedy, no
rotation placement); each group costs one product, 6 rotations and (poly) two more products, so the check is
dominated by ~40 key switchings in step 2. A further 35 % is available by rotating colliding samples into free
positions (4 groups) at the cost of 3 more rotation keys.

A round's claims in one evaluation (``verifier.check_round(store, batches, model, claims)``, then
``verifier.finish_round(packed, decrypt_distances)``): one decryption per round, per-claim verdicts only when the
sum fails; the per-phase breakdown against a raw-OpenFHE anchor is ``trustgrad bench blind`` (docs/proposal.md).
"""

from __future__ import annotations

import importlib
from typing import Any

# Names load on first use: the isolated parser (crypto/sandbox_helper.py) imports ``trustgrad.blind.params`` to
# rebuild a blind context, and importing every submodule here pulled torch into each rank's helper (~0.4 GB
# resident and seconds of imports per helper, one per rank, for a process that only parses OpenFHE bytes).
_LAZY = {
    "poly_bce": "models", "reference_gradient": "models", "squared_distance": "models",
    "Layout": "packing",
    "BlindParams": "params", "context_from_bytes": "params",
    "BlindVerifier": "step_check", "EncryptedGradient": "step_check", "EncryptedSamples": "step_check",
    "RoundCheck": "step_check", "SampleStore": "step_check", "Verdict": "step_check", "encrypt_claim": "step_check",
    "encrypt_model": "step_check", "encrypt_samples": "step_check", "judge": "step_check",
}  # fmt: skip

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'trustgrad.blind' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
