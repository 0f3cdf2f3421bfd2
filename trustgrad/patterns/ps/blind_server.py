"""The server's side of ``ps --proof blind`` (steps 1 and 3-6 of :mod:`.blind`): the encrypted model, the checks,
the verdicts it fuses, and re-keying after an exclusion. It holds the context, the joint public key and the
evaluation keys, never a share."""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...audit import ClaimChain
from ...blind import BlindVerifier, EncryptedGradient, EncryptedSamples, SampleStore, encrypt_model, judge
from ...blind.profile import blind_breakdown
from ...blind.step_check import to_last_level
from ...comm import Comm
from ...config import RunConfig
from ...crypto import Context, EncryptedVector, fuse
from ...crypto.flooding import FLOODING
from ...crypto.threshold import PartialDecryption
from ...data import BatchPlan, load_dataset
from ...errors import ConfigError, CryptoError, LaunchError
from ...secure import CryptoStats, KeyRing, setup_keys
from ...secure.evaluation_keys import joint_evaluation_keys
from .blind import CT_BYTES, REKEY, TAG, VERDICTS, K, blind_context, key_parties, split_flat
from .protocol import REPLY, SERVICE
from .secure import decode_fresh

if TYPE_CHECKING:
    from .server import Server

__all__ = ["BlindServer", "BlindAudit"]

log = logging.getLogger(__name__)


class BlindServer:
    """The server's codec: validates claims, aggregates admitted ones, keeps the model encrypted (steps 1 and 5)."""

    def __init__(self, comm: Comm, cfg: RunConfig, initial: torch.Tensor):
        self.comm, self.cfg = comm, cfg
        self.stats = CryptoStats()
        started = time.perf_counter()
        context, self.layout = blind_context(cfg)
        ds = load_dataset(cfg.dataset, cfg.data_dir)
        self.plan = BatchPlan(len(ds.x_train), cfg.workers, cfg.seed, cfg.batch_size)  # shards and PRF batches
        self.keys, self.store, self.verifier = self._receive_keys(key_parties(cfg), context)
        with self.stats.timing("encrypt"):  # W0 derives from the public seed: the server may encrypt it itself
            self.model = encrypt_model(
                self.keys.public_key, self.layout, *split_flat(initial.double().numpy(), self.layout)
            )
        self.setup_seconds = time.perf_counter() - started
        self.latest: bytes = b""

    def _receive_keys(self, parties: list[int], context: Context) -> tuple[KeyRing, SampleStore, BlindVerifier]:
        ring = setup_keys(self.comm, self.cfg.crypto, parties, [0], self.stats, context=context)
        assert not ring.holds_secret  # by construction: the server is not a key party
        public = joint_evaluation_keys(self.comm, ring, self.layout.rotations, [0], self.stats)
        ring = KeyRing(ring.mode, ring.context, public, None, ring.parties)
        store = SampleStore(self.layout)
        for rank in parties:
            shard = self.plan.shards[rank - 1]
            limit = (len(shard) // self.layout.per_ct + 2) * 2 * CT_BYTES
            data, _ = self.comm.recv_bytes(rank, TAG, max_bytes=limit)
            try:
                samples = EncryptedSamples.from_bytes(context, data, public_key=public)
                if sorted(samples.ids) != sorted(int(i) for i in shard):
                    raise CryptoError("they are not the samples of its shard")
                store.add(samples)
            except (CryptoError, ConfigError) as exc:
                raise LaunchError(f"ps: worker {rank - 1} sent invalid encrypted samples: {exc}", rank=rank) from None
        return ring, store, BlindVerifier(public, self.layout, "poly")

    def key_material(self) -> list[str]:
        held = ["context", f"public key with eval-mult and {len(self.keys.public_key.rotations)} rotation keys "
                f"({self.keys.mode}, {len(self.keys.parties)} parties)"]  # fmt: skip
        return held + (["SECRET KEY"] if self.keys.holds_secret else [])

    def max_payload(self, num_params: int) -> int:
        return 2 * CT_BYTES

    def decode(self, payload: bytes, rank: int, num_params: int) -> EncryptedVector:
        """A claim: a fresh encryption in the model layout (weights and bias ciphertexts)."""
        return decode_fresh(self.keys, payload, rank, 2 * self.layout.slots, "claim")

    def aggregate(self, claims: list[EncryptedVector]) -> EncryptedVector:
        """Step 5: the published mean, and the encrypted model's SGD step (both one scalar product of the sum)."""
        cc, k = self.keys.context.cc, len(claims)
        with self.stats.timing("aggregate"):
            total = [cc.EvalAddMany([c.ciphertexts[i] for c in claims]) if k > 1 else claims[0].ciphertexts[i]
                     for i in range(2)]  # fmt: skip
            step = -self.cfg.lr / (K * k)
            cts = [cc.EvalAdd(m, cc.EvalMult(t, step)) for m, t in zip(self.model.ciphertexts, total)]
            self.model = EncryptedVector(self.keys.context, cts, self.model.length, "float64", self.model.tag, 1)
            depth = self.keys.context.params.depth  # only decrypted: sent with the fewest towers (4x fewer bytes)
            mean = to_last_level(cc, [cc.EvalMult(t, 1.0 / k) for t in total], depth - 1)
        return EncryptedVector(self.keys.context, mean, self.model.length, "float64", self.model.tag, depth)

    def publish(self, mean: EncryptedVector) -> None:
        self.latest = mean.to_bytes()


class BlindAudit:
    """The server's verification layer (steps 3, 4 and 6), in the place of ``ServerAudit``."""

    def __init__(self, server: Server):
        self.server, self.comm, self.cfg = server, server.comm, server.cfg
        self.codec: BlindServer = server.secure  # type: ignore[assignment]
        self.chains = {r: ClaimChain(self.cfg.seed, r - 1) for r in server.workers}
        self.rng = np.random.default_rng(secrets.randbits(128))  # the verdict weights: the server's secret
        self.report: dict[str, Any] = {
            "audited_claims": 0, "rejected_claims": 0, "excluded_workers": [], "rejections": [],
            "discarded_claims": 0, "rekeys": 0, "rekey_seconds": 0.0, "check_seconds": 0.0,
            "verdict_seconds": 0.0, "worst_accepted_distance": 0.0, "verdict_decryptions": 0,
        }  # fmt: skip

    # -- the Server's audit interface ---------------------------------------------------------------------------

    def claim(self, rank: int, step: int, version: int, payload: bytes) -> None:
        self.chains[rank].extend(step, version, payload)

    def screen_round(self, claims: dict[int, Any], steps: dict[int, int]) -> dict[int, Any]:
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
            return claims
        if len(rejected) == len(ranks) > 1:
            raise LaunchError(
                f"ps --proof blind: every claim of this round failed its check ({[r - 1 for r in ranks]}); a key party "
                "may have corrupted its partial decryptions, which threshold CKKS cannot attribute"
            )
        for rank in rejected:
            self.report["rejected_claims"] += 1
            self.report["excluded_workers"].append(rank - 1)
            self.server.exclude(self.server.workers[rank], "blind verification: its claim is not the gradient")
        self.report["discarded_claims"] += len(ranks) - len(rejected)
        self._rekey()
        return {}

    def applied_round(self, shares: dict[int, Any]) -> None:
        """Every claim is checked before aggregation: nothing unverified is applied, nothing to roll back."""

    def published(self, aggregate: bytes) -> None:
        pass

    def close(self) -> None:
        pass

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

    def _live(self) -> list[int]:
        return [r for r, w in sorted(self.server.workers.items()) if not w.dropped and not w.done]

    def _decrypt(self, verdicts: list[EncryptedVector]) -> list[float]:
        """Step 4: every key party's partial decryption of every verdict, fused here."""
        started = time.perf_counter()
        parties = list(self.codec.keys.parties)
        blobs = [v.to_bytes() for v in verdicts]
        for rank in parties:
            self.comm.send(torch.tensor([SERVICE, VERDICTS, len(blobs)], dtype=torch.int64), rank, REPLY)
            for blob in blobs:
                self.comm.send_bytes(blob, rank, REPLY)
        partials: list[list[PartialDecryption]] = [[] for _ in verdicts]
        for rank in parties:
            for i in range(len(verdicts)):
                data, _ = self.comm.recv_bytes(rank, TAG, max_bytes=CT_BYTES)
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

    def _rekey(self) -> None:
        """Step 6: new keys among the survivors, samples again, and the model they all hold, cross-checked."""
        started = time.perf_counter()
        survivors = self._live()
        if not survivors:
            return
        if len(survivors) < 2:
            raise LaunchError(
                f"ps --proof blind: only worker {survivors[0] - 1} is left after the exclusion; threshold keys need "
                "2 parties (run with more workers)"
            )
        message = json.dumps({"parties": survivors}).encode()
        for rank in survivors:
            self.comm.send(torch.tensor([SERVICE, REKEY, 1], dtype=torch.int64), rank, REPLY)
            self.comm.send_bytes(message, rank, REPLY)
        codec = self.codec
        codec.keys, codec.store, codec.verifier = codec._receive_keys(survivors, codec.keys.context)
        models = []
        for rank in survivors:
            data, _ = self.comm.recv_bytes(rank, TAG, max_bytes=2 * CT_BYTES)
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
