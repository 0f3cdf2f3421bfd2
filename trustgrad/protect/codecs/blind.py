"""``ps --encrypt ckks --keys threshold --proof blind``: the server verifies every claim on ciphertexts.

The paper's literal proposal, inside training (``logreg-poly`` on features x classes that fit one ciphertext). The
server holds the context, the joint public key and the evaluation keys, never a share; the W workers are the key
parties (n-of-n threshold CKKS) and the data owners. This module is the codec: the workers' side, the shared
definitions and the server's side (``BlindServer``); the checks are the gate :mod:`trustgrad.protect.gates.blind`.
One synchronous round at model version v:

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
honest-but-curious (docs/architecture.md §1): the parties cannot tell a verdict ciphertext from any other, so a server
that deviated from the protocol could ask them to decrypt a claim; samples a data owner encrypted with wrong labels
verify (PoL binds claims to the committed data, not the data to the truth).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np
import torch

from ...attacks.poisoning import owner_labels, wire_tamper
from ...blind import (
    BlindParams,
    BlindVerifier,
    EncryptedSamples,
    Layout,
    SampleStore,
    encrypt_claim,
    encrypt_model,
)
from ...blind.step_check import encrypt_samples_bytes, to_last_level
from ...comm import Comm
from ...config import RunConfig
from ...crypto import Context, EncryptedVector, partial_decrypt
from ...data import BatchPlan, load_dataset
from ...errors import ConfigError, CryptoError, LaunchError
from ...secure import CryptoStats, KeyRing, setup_keys
from ...secure.evaluation_keys import joint_evaluation_keys
from ...secure.rogue import behaviour
from ...tags import BLIND, REKEY, VERDICTS
from ...tags import PS_REPLY as REPLY
from ..slots import ServerCodec
from .ckks import SecureWorker, decode_fresh

__all__ = ["BLIND_MODELS", "K", "check_blind_config", "check_threads", "BlindWorker", "BlindServer"]

log = logging.getLogger(__name__)

BLIND_MODELS = ("logreg-poly",)  # models whose SGD step the blind check recomputes (trustgrad.blind)
K = 1024.0  # claims are pushed as K * gradient (see the module docstring)


def check_threads() -> int:
    """``--server-threads`` for a blind job: the server checks while every worker waits for the round, so its checks
    can use the machine's idle cores (OpenFHE parallelises over the ~9 RNS limbs: more than 8 threads idle). Measured
    on 2 cores: 2.1 s per check on one thread, 1.3 s on two when the machine is quiet; at load 6.5, a round's three
    checks took 49.7 s on two threads and 11.8 s on one (OpenMP's barriers wait on threads the kernel descheduled).
    So only the cores the load average leaves idle, at least one."""
    cores = os.cpu_count() or 1
    busy = int(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, min(8, cores - busy))


_SLOTS = 8192  # BlindParams.for_check("poly") at 128-bit security: N = 16384
CT_BYTES = 6 << 20  # generous bound on one serialized ciphertext at N = 16384 (measured ~2.1 MB fresh)


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


def blind_context(cfg: RunConfig) -> tuple[Context, Layout]:
    context = Context(BlindParams.for_check("poly"))
    return context, _layout(cfg, context.slots)


def split_flat(flat: np.ndarray, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """A flat ``logreg`` vector (Linear weight C x F row-major, then bias C) -> (W, b)."""
    n = layout.classes * layout.features
    return flat[:n].reshape(layout.classes, layout.features), flat[n : n + layout.classes]


def _flat(layout: Layout, slots: np.ndarray) -> np.ndarray:
    """A decrypted model-layout vector (weights, bias ciphertexts) -> the flat ``logreg`` vector."""
    s = layout.slots
    return np.concatenate([layout.unpack_weights(slots[:s]).reshape(-1), layout.unpack_bias(slots[s : 2 * s])])


def key_parties(cfg: RunConfig) -> list[int]:
    return list(range(1, cfg.workers + 1))


# ---------------------------------------------------------------------------------------------------------------------
# worker side


class BlindWorker(SecureWorker):
    """A key party and data owner: makes keys, encrypts its shard once, pushes ``K g``, decrypts verdicts."""

    def __init__(self, comm: Comm, cfg: RunConfig, worker: int, initial: torch.Tensor):
        self.comm, self.cfg, self.worker = comm, cfg, worker
        self.stats = CryptoStats()
        context, self.layout = blind_context(cfg)
        ds = load_dataset(cfg.dataset, cfg.data_dir)
        self.shard = BatchPlan(len(ds.x_train), cfg.workers, cfg.seed, cfg.batch_size).shards[worker]
        self.x = ds.x_train[torch.from_numpy(self.shard)].reshape(len(self.shard), -1).double().numpy()
        labels = ds.y_train[torch.from_numpy(self.shard)].long()
        self.y = owner_labels(cfg.malicious, comm.rank, labels, ds.num_classes).numpy()  # what this owner holds
        self.master = initial.double().numpy()  # the model in float64, exactly as the server's ciphertext holds it
        self.tamper = wire_tamper(cfg.malicious, comm.rank)  # as SecureWorker's: --malicious ...,attack=crafted-*
        self.keys = self._make_keys(key_parties(cfg), context)

    def _make_keys(self, parties: list[int], context: Context) -> KeyRing:
        conduct = behaviour(self.cfg.malicious, self.comm.rank)
        ring = setup_keys(self.comm, self.cfg.crypto, parties, [0], self.stats, context=context, behaviour=conduct)
        joint_evaluation_keys(self.comm, ring, self.layout.rotations, [0], self.stats)
        with self.stats.timing("encrypt"):
            samples = encrypt_samples_bytes(ring.public_key, self.layout, self.x, self.y, self.shard)
        self.comm.send_bytes(samples, 0, BLIND)
        self.stats.sent(len(samples), self.x.size)
        return ring

    def encode(self, flat: torch.Tensor) -> bytes:
        w, b = split_flat(flat.detach().double().numpy() * K, self.layout)
        with self.stats.timing("encrypt"):
            payload = encrypt_claim(self.keys.public_key, self.layout, w, b).to_bytes()
        self.stats.sent(len(payload), flat.numel())
        return payload

    def max_payload(self, num_params: int) -> int:
        return 2 * CT_BYTES

    def apply(self, replica: Any, payload: bytes) -> None:
        """Step 5 at the worker: the published ``sum / k`` of ``K g`` -> the SGD step, kept in float64."""
        with self.stats.timing("decrypt"):
            vector = EncryptedVector.from_bytes(self.keys.context, payload)
            if len(vector) != 2 * self.layout.slots:
                raise CryptoError("the server's aggregate is not in the model layout")
            mean = _flat(self.layout, self._joint_decrypt(payload, vector)) / K
        self.master = self.master - self.cfg.lr * mean
        replica.set_flat_params(torch.from_numpy(self.master))

    def serve(self, request: int, count: int, replica: Any) -> None:
        """A SERVICE request from the server, answered before it replies to our push."""
        if request == VERDICTS:
            # receive all before answering: sends block until matched, and the server sends to every party first
            blobs = [self.comm.recv_bytes(0, REPLY, max_bytes=CT_BYTES)[0] for _ in range(count)]
            for data in blobs:
                vector = EncryptedVector.from_bytes(self.keys.context, data, public_key=self.keys.public_key)
                with self.stats.timing("decrypt"):
                    self.comm.send_bytes(partial_decrypt(self.keys.secret, vector).to_bytes(), 0, BLIND)  # type: ignore[arg-type]
        elif request == REKEY:
            data, _ = self.comm.recv_bytes(0, REPLY, max_bytes=1 << 16)
            parties = [int(r) for r in json.loads(data)["parties"]]
            log.info("worker %d: re-keying among ranks %s", self.worker, parties)
            self.keys = self._make_keys(parties, self.keys.context)
            model = encrypt_model(self.keys.public_key, self.layout, *split_flat(self.master, self.layout)).to_bytes()
            self.comm.send_bytes(model, 0, BLIND)
        else:
            raise LaunchError(f"ps: the server sent an unknown request {request}")


# ---------------------------------------------------------------------------------------------------------------------
# server side (steps 1 and 5; the checks, steps 3, 4 and 6, are the gate ``protect.gates.blind``)


class BlindServer(ServerCodec):
    encrypted = True

    """The server's codec: validates claims, aggregates admitted ones, keeps the model encrypted (steps 1 and 5)."""

    def __init__(self, comm: Comm, cfg: RunConfig, initial: torch.Tensor):
        self.comm, self.cfg = comm, cfg
        self.stats = CryptoStats()
        started = time.perf_counter()
        context, self.layout = blind_context(cfg)
        ds = load_dataset(cfg.dataset, cfg.data_dir)
        self.plan = BatchPlan(len(ds.x_train), cfg.workers, cfg.seed, cfg.batch_size)  # shards and PRF batches
        self.receive_keys(key_parties(cfg), context)
        with self.stats.timing("encrypt"):  # W0 derives from the public seed: the server may encrypt it itself
            self.model = encrypt_model(
                self.keys.public_key, self.layout, *split_flat(initial.double().numpy(), self.layout)
            )
        self.setup_seconds = time.perf_counter() - started
        self.latest: bytes = b""

    def receive_keys(self, parties: list[int], context: Context) -> None:
        """Keys among ``parties`` (at set-up, and after an exclusion), their evaluation keys and encrypted samples."""
        for old in ("store", "verifier"):  # a re-key replaces every sample (~190 MB per owner): drop the old ones
            if hasattr(self, old):  # before the new arrive, not after (they are under the old keys: useless now)
                delattr(self, old)
        self.keys, self.store, self.verifier = self._receive(parties, context)

    def _receive(self, parties: list[int], context: Context) -> tuple[KeyRing, SampleStore, BlindVerifier]:
        ring = setup_keys(self.comm, self.cfg.crypto, parties, [0], self.stats, context=context)
        assert not ring.holds_secret  # by construction: the server is not a key party
        public = joint_evaluation_keys(self.comm, ring, self.layout.rotations, [0], self.stats)
        ring = KeyRing(ring.mode, ring.context, public, None, ring.parties)
        store = SampleStore(self.layout)
        for rank in parties:
            shard = self.plan.shards[rank - 1]
            limit = (len(shard) // self.layout.per_ct + 2) * 2 * CT_BYTES
            data, _ = self.comm.recv_bytes(rank, BLIND, max_bytes=limit, copy=False)
            try:
                samples = EncryptedSamples.from_bytes(context, data, public_key=public)
                if sorted(samples.ids) != sorted(int(i) for i in shard):
                    raise CryptoError("they are not the samples of its shard")
                store.add(samples)
                del data, samples  # the store holds the ciphertexts; the bytes go before the next owner's arrive
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

    def combine(self, claims: list[EncryptedVector]) -> EncryptedVector:
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

    def cost(self) -> dict[str, Any]:
        return self.stats.summary()
