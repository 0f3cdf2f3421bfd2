"""``ps --encrypt ckks --keys threshold --proof blind``: the server verifies every claim on ciphertexts.

The paper's literal proposal, inside training (``logreg-poly`` on features x classes that fit one ciphertext). The
server holds the context, the joint public key and the evaluation keys, never a share; the W workers are the key
parties (n-of-n threshold CKKS) and the data owners. One synchronous round at model version v:

1. Set-up, at job start: threshold keys, then the joint eval-mult and rotation keys of the check
   (``secure.evaluation_keys``); each worker encrypts its own shard once (``blind.encrypt_samples``) and sends it;
   the server keeps the samples in a ``SampleStore`` it cannot read and encrypts W0 itself (it derives from the
   public seed) in the model layout.
2. Push: worker w encrypts its claim ``K * (dW, db)`` in the model layout (``K = 2**10``, below).
3. Check: for each claim the server recomputes the gradient of the PRF batch of (w, step) from the encrypted samples
   and its encrypted model, and the squared distance to ``claim / K``, weighted per slot by secret random weights
   in [0.5, 1] drawn fresh per check (``BlindVerifier.distance_to``).
4. Verdicts: every key party, the prover included, sends its partial decryption of every verdict to the server, which
   fuses them: the server learns one scalar per claim, the parties nothing. Why the prover's own partial cannot help
   it (the weights make the verdict unpredictable) is in :mod:`trustgrad.blind.step_check`.
5. Admit: the accepted claims are summed; the server publishes ``sum / k`` (the workers decrypt it jointly, worker to
   worker as in ``ps --encrypt``, and step) and updates its model ``Enc(w) += (-lr / (K k)) * sum``: one scalar
   product on ciphertexts of level 0, so the model stays at level 1 for the whole run (the check's depth budget).
6. Exclude: a round with a rejected claim applies no update (its accepted claims are discarded and counted); the
   rejected workers are dropped and the survivors **re-key**: new threshold and evaluation keys among them, their
   samples encrypted again, and the model encrypted by every survivor; the server checks that all survivors' models
   agree (the same weighted distance, decrypted by the survivors) before it adopts one.

Why K. Threshold decryption adds a fixed smudging noise of about 2**-20 absolute per value at scale 2**40 (the check's
preset cannot afford 2**50 at N = 16384). Workers track the model by applying decrypted means, so that noise would
move their model away from the server's encrypted one by ~1e-6 per weight and honest claims would miss the 2.3e-10
bound; pushing ``K g`` and dividing after decryption divides the drift by K.

Why re-key. Under n-of-n keys an excluded worker would keep a veto over every later decryption, and could corrupt the
survivors' model with a crafted partial decryption of the aggregate. Re-keying costs a key generation, evaluation
keys and the samples once per exclusion (printed in the summary as ``rekey_seconds``).

Limits (also in docs/proposal.md): a worker that corrupts its partial decryptions makes every verdict of the round fail
and cannot be identified (OpenFHE has no verifiable decryption), so a round in which every claim fails stops the job
instead of excluding everyone; a worker that refuses to answer stalls the job until ``--timeout``; the server is
honest-but-curious (DESIGN 2): the parties cannot tell a verdict ciphertext from any other, so a server that deviated
from the protocol could ask them to decrypt a claim; samples a data owner encrypted with wrong labels verify (PoL binds
claims to the committed data, not the data to the truth).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...audit import ClaimChain
from ...blind import (
    BlindParams,
    BlindVerifier,
    EncryptedGradient,
    EncryptedSamples,
    Layout,
    SampleStore,
    encrypt_claim,
    encrypt_model,
    encrypt_samples,
    judge,
)
from ...comm import Comm
from ...config import RunConfig
from ...crypto import Context, EncryptedVector, fuse, partial_decrypt
from ...crypto.threshold import PartialDecryption
from ...data import BatchPlan, load_dataset
from ...errors import ConfigError, CryptoError, LaunchError
from ...secure import CryptoStats, KeyRing, setup_keys
from ...secure.evaluation_keys import joint_evaluation_keys
from .protocol import REPLY, SERVICE
from .secure import SecureWorker

if TYPE_CHECKING:
    from .server import Server

__all__ = ["BLIND_MODELS", "K", "check_blind_config", "BlindWorker", "BlindServer", "BlindAudit"]

log = logging.getLogger(__name__)

BLIND_MODELS = ("logreg-poly",)  # models whose SGD step the blind check recomputes (trustgrad.blind)
K = 1024.0  # claims are pushed as K * gradient (see the module docstring)
VERDICTS, REKEY = 1, 2  # SERVICE requests: partial decryptions of verdicts; re-keying among the survivors
_TAG = 75  # worker -> server: partial decryptions, samples, models after re-keying
_SLOTS = 8192  # BlindParams.for_check("poly") at 128-bit security: N = 16384
_CT_BYTES = 6 << 20  # generous bound on one serialized ciphertext at N = 16384 (measured ~2.1 MB fresh)


def check_blind_config(cfg: RunConfig) -> Layout:
    """Refuse what blind verification cannot check (one-line ``ConfigError``s); returns the slot layout."""
    if cfg.model.name not in BLIND_MODELS:
        raise ConfigError(
            f"--proof blind checks HE-friendly models whose SGD step it recomputes on ciphertexts: "
            f"{', '.join(BLIND_MODELS)} (logistic regression with a degree-3 polynomial sigmoid); got "
            f"{cfg.model.name!r} (use --proof audit for other models)"
        )
    need = {
        "--encrypt ckks": cfg.crypto.encrypt == "ckks",
        "--keys threshold": cfg.crypto.keys == "threshold",
        "--schedule sync": cfg.pattern.schedule == "sync",
        "--momentum 0": cfg.momentum == 0,
        "--weight-decay 0": cfg.weight_decay == 0,
        "--audit-rate 1": cfg.proof.audit_rate == 1.0,
    }
    missing = [flag for flag, ok in need.items() if not ok]
    if missing:
        raise ConfigError(
            f"--proof blind needs {', '.join(missing)}: the server keeps the model encrypted and updates it with "
            "additions and one scalar product per round (no momentum or decay state), the verdicts are decrypted "
            "by the workers' threshold keys, and every claim is checked before it is aggregated"
        )
    return _layout(cfg, _SLOTS)


def _layout(cfg: RunConfig, slots: int) -> Layout:
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    return Layout(int(np.prod(ds.input_shape)), ds.num_classes, slots)


def _context(cfg: RunConfig) -> tuple[Context, Layout]:
    context = Context(BlindParams.for_check("poly"))
    return context, _layout(cfg, context.slots)


def _split(flat: np.ndarray, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """A flat ``logreg`` vector (Linear weight C x F row-major, then bias C) -> (W, b)."""
    n = layout.classes * layout.features
    return flat[:n].reshape(layout.classes, layout.features), flat[n : n + layout.classes]


def _flat(layout: Layout, slots: np.ndarray) -> np.ndarray:
    """A decrypted model-layout vector (weights, bias ciphertexts) -> the flat ``logreg`` vector."""
    s = layout.slots
    return np.concatenate([layout.unpack_weights(slots[:s]).reshape(-1), layout.unpack_bias(slots[s : 2 * s])])


def _parties(cfg: RunConfig) -> list[int]:
    return list(range(1, cfg.workers + 1))


# ---------------------------------------------------------------------------------------------------------------------
# worker side


class BlindWorker(SecureWorker):
    """A key party and data owner: makes keys, encrypts its shard once, pushes ``K g``, decrypts verdicts."""

    def __init__(self, comm: Comm, cfg: RunConfig, worker: int):
        self.comm, self.cfg, self.worker = comm, cfg, worker
        self.stats = CryptoStats()
        context, self.layout = _context(cfg)
        ds = load_dataset(cfg.dataset, cfg.data_dir)
        self.shard = BatchPlan(len(ds.x_train), cfg.workers, cfg.seed, cfg.batch_size).shards[worker]
        self.x = ds.x_train[torch.from_numpy(self.shard)].reshape(len(self.shard), -1).double().numpy()
        self.y = ds.y_train[torch.from_numpy(self.shard)].long().numpy()
        self.master: np.ndarray | None = None  # the model in float64, exactly as the server's ciphertext holds it
        self.keys = self._make_keys(_parties(cfg), context)

    def _make_keys(self, parties: list[int], context: Context) -> KeyRing:
        ring = setup_keys(self.comm, self.cfg.crypto, parties, [0], self.stats, context=context)
        joint_evaluation_keys(self.comm, ring, self.layout.rotations, [0], self.stats)
        with self.stats.timing("encrypt"):
            samples = encrypt_samples(ring.public_key, self.layout, self.x, self.y, self.shard).to_bytes()
        self.comm.send_bytes(samples, 0, _TAG)
        self.stats.sent(len(samples), self.x.size)
        return ring

    def encode(self, flat: torch.Tensor) -> bytes:
        w, b = _split(flat.detach().double().numpy() * K, self.layout)
        with self.stats.timing("encrypt"):
            payload = encrypt_claim(self.keys.public_key, self.layout, w, b).to_bytes()
        self.stats.sent(len(payload), flat.numel())
        return payload

    def max_payload(self, num_params: int) -> int:
        return 2 * _CT_BYTES

    def apply(self, replica: Any, payload: bytes) -> None:
        """Step 5 at the worker: the published ``sum / k`` of ``K g`` -> the SGD step, kept in float64."""
        if self.master is None:
            self.master = replica.flat_params().double().numpy()
        with self.stats.timing("decrypt"):
            vector = EncryptedVector.from_bytes(self.keys.context, payload)
            if len(vector) != 2 * self.layout.slots:
                raise CryptoError("the server's aggregate is not in the model layout")
            mean = _flat(self.layout, self._joint_decrypt(vector)) / K
        self.master = self.master - self.cfg.lr * mean
        replica.set_flat_params(torch.from_numpy(self.master))

    def serve(self, request: int, count: int, replica: Any) -> None:
        """A SERVICE request from the server, answered before it replies to our push."""
        if request == VERDICTS:
            # receive all before answering: sends block until matched, and the server sends to every party first
            blobs = [self.comm.recv_bytes(0, REPLY, max_bytes=_CT_BYTES)[0] for _ in range(count)]
            for data in blobs:
                vector = EncryptedVector.from_bytes(self.keys.context, data, public_key=self.keys.public_key)
                with self.stats.timing("decrypt"):
                    self.comm.send_bytes(partial_decrypt(self.keys.secret, vector).to_bytes(), 0, _TAG)  # type: ignore[arg-type]
        elif request == REKEY:
            data, _ = self.comm.recv_bytes(0, REPLY, max_bytes=1 << 16)
            parties = [int(r) for r in json.loads(data)["parties"]]
            log.info("worker %d: re-keying among ranks %s", self.worker, parties)
            self.keys = self._make_keys(parties, self.keys.context)
            if self.master is None:
                self.master = replica.flat_params().double().numpy()
            model = encrypt_model(self.keys.public_key, self.layout, *_split(self.master, self.layout)).to_bytes()
            self.comm.send_bytes(model, 0, _TAG)
        else:
            raise LaunchError(f"ps: the server sent an unknown request {request}")


# ---------------------------------------------------------------------------------------------------------------------
# server side


class BlindServer:
    """The server's codec: validates claims, aggregates admitted ones, keeps the model encrypted (steps 1 and 5)."""

    def __init__(self, comm: Comm, cfg: RunConfig, initial: torch.Tensor):
        self.comm, self.cfg = comm, cfg
        self.stats = CryptoStats()
        started = time.perf_counter()
        context, self.layout = _context(cfg)
        self.keys, self.store, self.verifier = self._receive_keys(_parties(cfg), context)
        with self.stats.timing("encrypt"):  # W0 derives from the public seed: the server may encrypt it itself
            self.model = encrypt_model(
                self.keys.public_key, self.layout, *_split(initial.double().numpy(), self.layout)
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
            limit = (len(self._shard(rank)) // self.layout.per_ct + 2) * 2 * _CT_BYTES
            data, _ = self.comm.recv_bytes(rank, _TAG, max_bytes=limit)
            try:
                samples = EncryptedSamples.from_bytes(context, data, public_key=public)
                if sorted(samples.ids) != sorted(int(i) for i in self._shard(rank)):
                    raise CryptoError("they are not the samples of its shard")
                store.add(samples)
            except (CryptoError, ConfigError) as exc:
                raise LaunchError(f"ps: worker {rank - 1} sent invalid encrypted samples: {exc}", rank=rank) from None
        return ring, store, BlindVerifier(public, self.layout, "poly")

    def _shard(self, rank: int) -> np.ndarray:
        ds = load_dataset(self.cfg.dataset, self.cfg.data_dir)
        return BatchPlan(len(ds.x_train), self.cfg.workers, self.cfg.seed, self.cfg.batch_size).shards[rank - 1]

    def key_material(self) -> list[str]:
        held = ["context", f"public key with eval-mult and {len(self.keys.public_key.rotations)} rotation keys "
                f"({self.keys.mode}, {len(self.keys.parties)} parties)"]  # fmt: skip
        return held + (["SECRET KEY"] if self.keys.holds_secret else [])

    def max_payload(self, num_params: int) -> int:
        return 2 * _CT_BYTES

    def decode(self, payload: bytes, rank: int, num_params: int) -> EncryptedVector:
        try:
            vector = EncryptedVector.from_bytes(self.keys.context, payload, public_key=self.keys.public_key)
            if len(vector) != 2 * self.layout.slots or len(vector.ciphertexts) != 2 or vector.mults:
                raise CryptoError("expected a fresh claim in the model layout (2 ciphertexts)")
            return vector
        except CryptoError as exc:
            raise LaunchError(
                f"ps: worker {rank - 1} (rank {rank}) pushed an invalid claim: {exc}", rank=rank
            ) from None

    def aggregate(self, claims: list[EncryptedVector]) -> EncryptedVector:
        """Step 5: the published mean, and the encrypted model's SGD step (both one scalar product of the sum)."""
        cc, k = self.keys.context.cc, len(claims)
        with self.stats.timing("aggregate"):
            total = [cc.EvalAddMany([c.ciphertexts[i] for c in claims]) if k > 1 else claims[0].ciphertexts[i]
                     for i in range(2)]  # fmt: skip
            step = -self.cfg.lr / (K * k)
            cts = [cc.EvalAdd(m, cc.EvalMult(t, step)) for m, t in zip(self.model.ciphertexts, total)]
            self.model = EncryptedVector(self.keys.context, cts, self.model.length, "float64", self.model.tag, 1)
            mean = [cc.EvalMult(t, 1.0 / k) for t in total]
        return EncryptedVector(self.keys.context, mean, self.model.length, "float64", self.model.tag, 1)

    def publish(self, mean: EncryptedVector) -> None:
        self.latest = mean.to_bytes()


class BlindAudit:
    """The server's verification layer (steps 3, 4 and 6), in the place of ``ServerAudit``."""

    def __init__(self, server: Server):
        self.server, self.comm, self.cfg = server, server.comm, server.cfg
        self.codec: BlindServer = server.secure  # type: ignore[assignment]
        self.plan = BatchPlan(len(server.ds.x_train), self.cfg.workers, self.cfg.seed, self.cfg.batch_size)
        self.chains = {r: ClaimChain(self.cfg.seed, r - 1) for r in server.workers}
        self.steps: dict[int, int] = {}
        self.rng = np.random.default_rng(secrets.randbits(128))  # the verdict weights: the server's secret
        self.report: dict[str, Any] = {
            "audited_claims": 0, "rejected_claims": 0, "excluded_workers": [], "rejections": [],
            "discarded_claims": 0, "rekeys": 0, "rekey_seconds": 0.0, "check_seconds": 0.0,
            "verdict_seconds": 0.0, "worst_accepted_distance": 0.0,
        }  # fmt: skip

    # -- the Server's audit interface ---------------------------------------------------------------------------

    def claim(self, rank: int, step: int, version: int, payload: bytes) -> None:
        self.chains[rank].extend(step, version, payload)
        self.steps[rank] = step

    def screen_round(self, claims: dict[int, Any], steps: dict[int, int]) -> dict[int, Any]:
        ranks = sorted(claims)
        started = time.perf_counter()
        verdicts = [self._verdict(rank, claims[rank]) for rank in ranks]
        self.report["check_seconds"] += time.perf_counter() - started
        distances = self._decrypt(verdicts)
        self.report["audited_claims"] += len(ranks)
        rejected = []
        for rank, distance in zip(ranks, distances):
            verdict = judge(distance, self.codec.verifier.bound)
            if verdict.accepted:
                self.report["worst_accepted_distance"] = max(self.report["worst_accepted_distance"], abs(distance))
                continue
            rejected.append(rank)
            self.report["rejections"].append(
                {"worker": rank - 1, "step": self.steps[rank], "distance": distance,
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
            "bound": self.codec.verifier.bound,
            "check_seconds_per_claim": self.report["check_seconds"] / n,
            "verdict_seconds_per_claim": self.report["verdict_seconds"] / n,
            "setup_seconds": self.codec.setup_seconds,
            "claims": self.report["audited_claims"],
        }

    # -- steps 3, 4, 6 ------------------------------------------------------------------------------------------

    def _weights(self) -> np.ndarray:
        return self.rng.uniform(0.5, 1.0, self.codec.layout.slots)

    def _verdict(self, rank: int, claim: EncryptedVector) -> EncryptedVector:
        batch = self.plan.at(rank - 1, self.steps[rank])
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
                data, _ = self.comm.recv_bytes(rank, _TAG, max_bytes=_CT_BYTES)
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
            data, _ = self.comm.recv_bytes(rank, _TAG, max_bytes=2 * _CT_BYTES)
            models.append(codec.decode(data, rank, 0))
        reference = EncryptedGradient(*models[0].ciphertexts, 1)
        if len(models) > 1:
            checks = [codec.verifier.distance_to(reference, other, weights=self._weights()) for other in models[1:]]
            distances = self._decrypt(checks)
            off = [r - 1 for r, d in zip(survivors[1:], distances) if not judge(d, codec.verifier.bound).accepted]
            if off:
                raise LaunchError(
                    f"ps --proof blind: after re-keying, workers {off} hold another model than worker "
                    f"{survivors[0] - 1}; the job cannot tell which is right"
                )
        codec.model = models[0]
        codec.latest = b""
        self.report["rekeys"] += 1
        self.report["rekey_seconds"] += time.perf_counter() - started
        log.info("ps --proof blind: re-keyed among workers %s in %.1f s", [r - 1 for r in survivors],
                 time.perf_counter() - started)  # fmt: skip
