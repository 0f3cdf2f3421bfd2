"""The gate of ``ps --proof blind`` (steps 3, 4 and 6 of :mod:`..codecs.blind`): the checks on ciphertexts, the
verdicts it fuses, and re-keying after an exclusion. It holds what its codec holds: the context, the joint public key
and the evaluation keys, never a share."""

from __future__ import annotations

import logging
import math
import secrets
import time
from typing import Any

import numpy as np
import torch

from ...audit import ClaimChain
from ...blind import EncryptedGradient, judge
from ...blind.profile import blind_breakdown
from ...comm import Comm
from ...crypto import EncryptedVector, fuse
from ...crypto.flooding import FLOODING
from ...crypto.threshold import PartialDecryption
from ...errors import CryptoError, LaunchError
from ...secure.keys import announce_rekey
from ...tags import BLIND, PS_REPLY, SERVICE, VERDICTS
from ..codecs.blind import CT_BYTES, BlindServer, K
from ..codecs.ckks import decode_fresh
from ..slots import Batch, Claim, Gate, Verdict

__all__ = ["BlindAudit"]

log = logging.getLogger(__name__)


class BlindAudit(Gate):
    """Every claim checked on ciphertexts before it is aggregated (steps 3, 4 and 6), with its codec's keys."""

    def __init__(self, comm: Comm, seed: int, ranks: list[int], codec: BlindServer):
        self.comm, self.codec = comm, codec
        self.chains = {r: ClaimChain(seed, r - 1) for r in ranks}
        self.rng = np.random.default_rng(secrets.randbits(128))  # the verdict weights: the server's secret
        self.report: dict[str, Any] = {
            "audited_claims": 0, "rejected_claims": 0, "excluded_workers": [], "rejections": [],
            "discarded_claims": 0, "rekeys": 0, "rekey_seconds": 0.0, "check_seconds": 0.0,
            "verdict_seconds": 0.0, "worst_accepted_distance": 0.0, "verdict_decryptions": 0,
        }  # fmt: skip

    # -- the gate ----------------------------------------------------------------------------------------------------

    def observe(self, claim: Claim) -> None:
        self.chains[claim.rank].extend(claim.step, claim.version, claim.payload)

    def screen(self, batch: Batch) -> Verdict:
        claims, steps = batch.values, batch.steps
        ranks = sorted(claims)
        started, verdict_before = time.perf_counter(), self.report["verdict_seconds"]
        distances = self._check_round(ranks, steps, claims)  # all claims in one evaluation (blind.check_round)
        spent = time.perf_counter() - started - (self.report["verdict_seconds"] - verdict_before)
        self.report["check_seconds"] += spent
        self.report["audited_claims"] += len(ranks)
        rejected = []
        for rank, distance in zip(ranks, distances):
            verdict = judge(distance, self.bound())
            if verdict.accepted:
                self.report["worst_accepted_distance"] = max(self.report["worst_accepted_distance"], abs(distance))
                continue
            rejected.append(rank)
            self.report["rejections"].append(
                {"worker": rank - 1, "step": steps[rank], "distance": distance,
                 "bound": verdict.bound, "reason": verdict.reason}
            )  # fmt: skip
        if not rejected:
            return Verdict.admit_all(claims)
        if len(rejected) == len(ranks) > 1:
            raise LaunchError(
                f"ps --proof blind: every claim of this round failed its check ({[r - 1 for r in ranks]}); a key party "
                "may have corrupted its partial decryptions, which threshold CKKS cannot attribute"
            )
        for rank in rejected:
            self.report["rejected_claims"] += 1
            self.report["excluded_workers"].append(rank - 1)
        self.report["discarded_claims"] += len(ranks) - len(rejected)
        # a round with a rejected claim applies nothing; the survivors re-key once the server excluded the rejected
        return Verdict({}, {rank: "blind verification: its claim is not the gradient" for rank in rejected})

    def after_exclusion(self, survivors: list[int]) -> None:
        self._rekey(survivors)

    def summary(self) -> dict[str, Any]:
        n = max(1, self.report["audited_claims"])
        return {
            **self.report,
            "proof": "blind",
            "audit_rate": 1.0,
            "bound": self.bound(),
            "flooding_sigma": self.flooding_sigma(),
            "check_seconds_per_claim": self.report["check_seconds"] / n,
            "verdict_seconds_per_claim": self.report["verdict_seconds"] / n,
            "setup_seconds": self.codec.setup_seconds,
            "claims": self.report["audited_claims"],
            "blind_breakdown": blind_breakdown(self.report, self.codec.setup_seconds, self.codec.stats.seconds),
        }

    def flooding_sigma(self) -> float:
        """Standard deviation of the flooding noise on a fused verdict (distance units): every key party adds
        ``FLOODING.sigma`` to slot 0, which holds ``gain**2`` times the distance."""
        v = self.codec.verifier
        per_party = FLOODING.sigma(v.context.params.scale_bits)
        return per_party * math.sqrt(len(self.codec.keys.parties)) / v.gain**2

    def bound(self) -> float:
        """The honest bound: CKKS error (``BlindVerifier.bound``) plus 7 standard deviations of the flooding noise
        (a Gaussian beyond 7 sigma: 2.6e-12 per verdict, so flooding adds no measurable false rejection)."""
        return self.codec.verifier.bound + 7.0 * self.flooding_sigma()

    # -- steps 3, 4, 6 ------------------------------------------------------------------------------------------

    def _weights(self) -> np.ndarray:
        return self.rng.uniform(0.5, 1.0, self.codec.layout.slots)

    def _check_round(self, ranks: list[int], steps: dict[int, int], claims: dict[int, Any]) -> list[float]:
        """Steps 3-4 for the round: one packed evaluation, one decryption of the sum of the weighted distances, and
        each claim's own verdict decrypted only if that sum fails (``BlindVerifier.finish_round``)."""
        v = self.codec.verifier
        batches = [self.codec.plan.at(rank - 1, steps[rank]) for rank in ranks]
        weights = [self._weights() for _ in ranks]
        packed = v.check_round(self.codec.store, batches, self.codec.model, [claims[r] for r in ranks],
                               claim_scale=K, weights=weights)  # fmt: skip
        distances = v.finish_round(packed, self._decrypt, self.bound())
        self.report["verdict_decryptions"] += packed.decryptions
        return distances

    def _verdict(self, rank: int, step: int, claim: EncryptedVector) -> EncryptedVector:
        batch = self.codec.plan.at(rank - 1, step)
        v = self.codec.verifier
        gradient = v.recompute(self.codec.store, batch, self.codec.model)
        return v.distance_to(gradient, claim, claim_scale=K, weights=self._weights())

    def _decrypt(self, verdicts: list[EncryptedVector]) -> list[float]:
        """Step 4: every key party's partial decryption of every verdict, fused here."""
        started = time.perf_counter()
        parties = list(self.codec.keys.parties)
        blobs = [v.to_bytes() for v in verdicts]
        for rank in parties:
            self.comm.send(torch.tensor([SERVICE, VERDICTS, len(blobs)], dtype=torch.int64), rank, PS_REPLY)
            for blob in blobs:
                self.comm.send_bytes(blob, rank, PS_REPLY)
        partials: list[list[PartialDecryption]] = [[] for _ in verdicts]
        for rank in parties:
            for i in range(len(verdicts)):
                data, _ = self.comm.recv_bytes(rank, BLIND, max_bytes=CT_BYTES)
                try:
                    partials[i].append(PartialDecryption.from_bytes(self.codec.keys.context, data))
                except CryptoError as exc:
                    raise LaunchError(f"ps: worker {rank - 1} sent an invalid partial decryption: {exc}") from None
        out = []
        for p in partials:
            try:
                out.append(self.codec.verifier.finish(fuse(p)))
            except CryptoError:  # a corrupt partial: the verdict does not decrypt, which judge() rejects
                out.append(float("nan"))
        self.report["verdict_seconds"] += time.perf_counter() - started
        return out

    def _rekey(self, survivors: list[int]) -> None:
        """Step 6: new keys among the survivors, samples again, and the model they all hold, cross-checked."""
        started = time.perf_counter()
        if not survivors:
            return
        announce_rekey(
            self.comm,
            survivors,
            PS_REPLY,
            f"ps --proof blind: only worker {survivors[0] - 1} is left after the exclusion; threshold keys need "
            "2 parties (run with more workers)",
        )
        codec = self.codec
        codec.receive_keys(survivors, codec.keys.context)
        models = []
        for rank in survivors:
            data, _ = self.comm.recv_bytes(rank, BLIND, max_bytes=2 * CT_BYTES)
            models.append(decode_fresh(codec.keys, data, rank, 2 * codec.layout.slots, "model after re-keying"))
        reference = EncryptedGradient(*models[0].ciphertexts, 1)  # at least 2 survivors: checked above
        checks = [codec.verifier.distance_to(reference, other, weights=self._weights()) for other in models[1:]]
        distances = self._decrypt(checks)
        off = [r - 1 for r, d in zip(survivors[1:], distances) if not judge(d, self.bound()).accepted]
        if off:
            raise LaunchError(
                f"ps --proof blind: after re-keying, workers {off} hold another model than worker "
                f"{survivors[0] - 1}; the job cannot tell which is right"
            )
        codec.model = models[0]  # the round published nothing: the server clears the old-key aggregate itself
        self.report["rekeys"] += 1
        self.report["rekey_seconds"] += time.perf_counter() - started
        log.info("ps --proof blind: re-keyed among workers %s in %.1f s", [r - 1 for r in survivors],
                 time.perf_counter() - started)  # fmt: skip
