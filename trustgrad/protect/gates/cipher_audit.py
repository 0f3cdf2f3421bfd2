"""``ps --encrypt ckks --keys shared --proof audit``: claims audited on ciphertexts by an auditor the server is not.

The server sees ciphertexts only; the auditor is the data owners' verifier (docs/architecture.md §1): a separate rank
(the last one) that holds the training data and, as a key party, the shared secret key. Protocol, one synchronous round:

1. The server chains each worker's claim (its ciphertext bytes) and forwards the round's claims to the auditor.
2. The auditor decrypts each claim (workers encrypt g / W, so it multiplies by W), replays the worker's step on the
   PRF batch at its own copy of the model version, and answers a verdict per claim (``trustgrad.audit.Auditor``:
   relative l2 within 10x the CKKS round-trip error the auditor measures at start, ~1e-6 at 2^40). This binds
   every ciphertext the server aggregates to a verified computation.
3. The server excludes rejected workers and aggregates only admitted ciphertexts; it sends the published aggregate to
   the auditor too, which decrypts it and takes the same optimizer step as the workers, so its model copy stays the
   version the next claims are computed on.

Every claim is audited (``--audit-rate 1``): a rejected claim never reaches the model, so nothing has to be rolled back
on ciphertexts. Under threshold keys nobody can decrypt a claim alone: workers send the auditor their claims in
plaintext and the auditor encrypts the admitted ones (``ThresholdRemoteAudit``, ``ThresholdAuditor``; the protocol is
``protect/codecs/audited.py``).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import numpy as np
import torch

from ...audit import Auditor, ClaimChain
from ...audit.auditor import ClaimCheck
from ...comm import Comm
from ...config import RunConfig
from ...crypto import EncryptedVector, decrypt, encrypt
from ...crypto.flooding import FLOODING
from ...data import load_dataset
from ...errors import CryptoError, LaunchError
from ...models import build_model
from ...replica import Replica, optimizer_for
from ...secure import CryptoStats, setup_keys
from ...secure.grid import GainedGrid, fixed_point, quantize, snap
from ...tags import AUDIT_CLAIM, AUDIT_MEAN
from ...tags import CIPHER_AUDIT as _TAG
from ..codecs.audited import (
    DECRYPT_CMD,
    DIGEST_BYTES,
    ENCRYPT_CMD,
    REKEY_CMD,
    AuditedServer,
    AuditedWorker,
    claim_digest,
    fuse_checked,
)
from ..codecs.ckks import SecureWorker, max_payload_for
from ..slots import Batch, Claim, Gate, Verdict

__all__ = ["RemoteAudit", "CiphertextAuditor", "ThresholdRemoteAudit", "ThresholdAuditor"]

log = logging.getLogger(__name__)


class RemoteAudit(Gate):
    """The server's side: chain claims, ask the auditor rank (``peer``), exclude the rejected."""

    def __init__(self, comm: Comm, seed: int, workers: int, peer: int):
        self.comm, self.peer = comm, peer
        self.chains = {r: ClaimChain(seed, r - 1) for r in range(1, workers + 1)}
        self.payloads: dict[int, tuple[int, int, bytes]] = {}

    def observe(self, claim: Claim) -> None:
        self.chains[claim.rank].extend(claim.step, claim.version, claim.payload)
        self.payloads[claim.rank] = (claim.step, claim.version, claim.payload)

    def screen(self, batch: Batch) -> Verdict:
        grads = batch.values
        ranks = sorted(grads)
        self.comm.send(torch.tensor([len(ranks)], dtype=torch.int64), self.peer, _TAG)  # type: ignore[arg-type]
        for rank in ranks:
            step, version, payload = self.payloads.pop(rank)
            self.comm.send(torch.tensor([rank, step, version], dtype=torch.int64), self.peer, _TAG)  # type: ignore[arg-type]
            self.comm.send_bytes(payload, self.peer, _TAG)  # type: ignore[arg-type]
        verdicts = torch.zeros(len(ranks), dtype=torch.int64)
        self.comm.recv(verdicts, self.peer, _TAG)
        admitted, excluded = {}, {}
        for rank, ok in zip(ranks, verdicts.tolist()):
            if ok:
                admitted[rank] = grads[rank]
            else:
                excluded[rank] = "audit: its claim did not reproduce (see the auditor)"
        return Verdict(admitted, excluded)

    def published(self, aggregate: bytes) -> None:
        self.comm.send_bytes(aggregate, self.peer, _TAG)  # type: ignore[arg-type]

    def close(self) -> None:
        self.comm.send(torch.tensor([-1], dtype=torch.int64), self.peer, _TAG)  # type: ignore[arg-type]

    def summary(self) -> dict[str, Any]:
        return {}  # the auditor rank reports


class CiphertextAuditor:
    """The auditor rank's loop (steps 2 and 3)."""

    def __init__(self, comm: Comm, cfg: RunConfig, parties: list[int]):
        self.cfg, self.comm = cfg, comm
        self.secure = SecureWorker(comm, cfg, parties)  # a key party: it decrypts claims and aggregates
        self.ds = load_dataset(cfg.dataset, cfg.data_dir)
        model = build_model(cfg.model.name, self.ds.input_shape, self.ds.num_classes, cfg.seed, cfg.model)
        self.replica = Replica(model, optimizer_for(model, cfg))
        # claims arrive through CKKS: the calibration measures what an encrypt/decrypt round trip adds
        self.auditor = Auditor(cfg, self.ds, cfg.workers, channel=self._round_trip)

    def _round_trip(self, grad: torch.Tensor) -> torch.Tensor:
        """An honest gradient as this auditor receives it: encrypted as g / W by a worker, decrypted, times W."""
        keys, w = self.secure.keys, self.cfg.workers
        values = grad.detach().double().numpy() / w
        vector = encrypt(keys.public_key, quantize(values) if fixed_point(self.cfg) else values)
        return torch.from_numpy(self._decrypt(vector)).float() * w

    def _decrypt(self, vector: EncryptedVector) -> Any:
        """A claim's ``g / W``; on the grid where workers put it (Adam: trustgrad/secure/grid.py)."""
        values = decrypt(self.secure.keys.secret, vector)  # type: ignore[arg-type]
        return snap(values) if fixed_point(self.cfg) else values

    def serve(self) -> dict[str, Any]:
        n = self.replica.num_params
        while True:
            count = torch.zeros(1, dtype=torch.int64)
            self.comm.recv(count, 0, _TAG)
            if int(count.item()) < 0:
                break
            verdicts = [self._check_one(n) for _ in range(int(count.item()))]
            self.auditor.report.claims += len(verdicts)
            self.comm.send(torch.tensor(verdicts, dtype=torch.int64), 0, _TAG)
            aggregate, _ = self.comm.recv_bytes(0, _TAG, max_bytes=self.secure.max_payload(n))
            if aggregate:  # the version every worker moves to
                self.replica.set_flat_grad(self.secure.decode_mean(aggregate, n))
                self.replica.step()
        report = self.auditor.report.summary()
        calibration = self.auditor.calibration.summary()
        return {
            "stats": {**report, **calibration, "audit_rate": 1.0, "auditor": "separate rank, shared key, data access"}
        }

    def _check_one(self, n: int) -> int:
        header = torch.zeros(3, dtype=torch.int64)
        self.comm.recv(header, 0, _TAG)
        rank, step, version = (int(v) for v in header.tolist())
        payload, _ = self.comm.recv_bytes(0, _TAG, max_bytes=self.secure.max_payload(n))
        vector = EncryptedVector.from_bytes(self.secure.keys.context, payload)
        claimed = torch.from_numpy(self._decrypt(vector)).float() * self.cfg.workers
        check = self.auditor.check(rank - 1, step, version, self.replica.flat_params(), claimed)
        if not check.ok:
            self.auditor.report.excluded.append(rank - 1)  # the server excludes it on this verdict
        return int(check.ok)


class ThresholdRemoteAudit(RemoteAudit):
    """The server's side under threshold keys (``codecs/audited.py``, steps 2-3): the round's digests to the auditor,
    its verdicts back; a re-keying among the survivors when it rejected someone; its ciphertexts of the admitted."""

    def __init__(self, comm: Comm, seed: int, workers: int, peer: int, codec: AuditedServer, num_params: int):
        super().__init__(comm, seed, workers, peer)
        self.codec, self.num_params = codec, num_params

    def screen(self, batch: Batch) -> Verdict:
        verdict = super().screen(batch)  # the payloads the server chained are the claims' digests
        survivors = sorted(verdict.admitted)
        if verdict.excluded and survivors:  # a rejected worker holds a share: nothing of the round under its key
            self.codec.rekey_keys(survivors)
        return Verdict(self.codec.fetch(survivors, self.num_params) if survivors else {}, verdict.excluded)

    def published(self, aggregate: bytes) -> None:
        """Nothing to send: the auditor receives the aggregate when the round is decrypted (``codec.settle``)."""


class ThresholdAuditor:
    """The auditor rank under threshold keys (``codecs/audited.py``, steps 2-5): plaintext claims, no key share."""

    def __init__(self, comm: Comm, cfg: RunConfig, parties: list[int]):
        self.cfg, self.comm = cfg, comm
        self.stats = CryptoStats()
        self.keys = setup_keys(comm, cfg.crypto, parties, AuditedWorker.key_receivers(cfg), self.stats)
        self.ds = load_dataset(cfg.dataset, cfg.data_dir)
        model = build_model(cfg.model.name, self.ds.input_shape, self.ds.num_classes, cfg.seed, cfg.model)
        self.replica = Replica(model, optimizer_for(model, cfg))
        self.auditor = Auditor(cfg, self.ds, cfg.workers)  # claims arrive as exact bits: the plaintext threshold
        self.claims: dict[int, torch.Tensor] = {}  # the round's admitted claims (rank -> float32 gradient)
        self.encrypted: list[int] = []  # the ranks whose claims the round's aggregate holds
        self.grid = GainedGrid(1.0, 1.0)  # the round's (``secure/grid.py``), and the sum of its encrypted counts
        self.total = np.zeros(0)
        self.gains: list[float] = []
        self.noise_steps = 0.0  # the largest fused flooding noise over the run, in steps of the grid (rounds at 0.5)

    def serve(self) -> dict[str, Any]:
        handlers = {REKEY_CMD: self._rekey, ENCRYPT_CMD: self._encrypt, DECRYPT_CMD: self._decrypt}
        while True:
            command = torch.zeros(1, dtype=torch.int64)
            self.comm.recv(command, 0, _TAG)
            code = int(command.item())
            if code == -1:
                break
            if code >= 0:
                self._round(code)
            elif code in handlers:
                handlers[code]()
            else:
                raise LaunchError(f"ps: the server sent the auditor an unknown command {code}", rank=0)
        report, calibration = self.auditor.report.summary(), self.auditor.calibration.summary()
        role = "separate rank, threshold keys: plaintext claims, encrypts the admitted, fuses the mean, no key share"
        gains = {"encryption_gain_min": min(self.gains, default=1.0)}
        gains["encryption_gain_max"] = max(self.gains, default=1.0)
        extra = {"audit_rate": 1.0, "auditor": role, "fused_noise_max_steps": self.noise_steps, **gains}
        return {"stats": {**report, **calibration, **extra, **self.stats.summary()}}

    def _round(self, count: int) -> None:
        """Step 2: each claim of the round against the digest its worker pushed, then replayed."""
        if count > self.cfg.workers:
            raise LaunchError(f"ps: the server announced {count} claims for {self.cfg.workers} workers", rank=0)
        self.claims = {}
        verdicts = [self._check_one() for _ in range(count)]
        self.auditor.report.claims += count
        self.comm.send(torch.tensor(verdicts, dtype=torch.int64), 0, _TAG)

    def _check_one(self) -> int:
        header = torch.zeros(3, dtype=torch.int64)
        self.comm.recv(header, 0, _TAG)
        rank, step, version = (int(v) for v in header.tolist())
        if not 1 <= rank <= self.cfg.workers:
            raise LaunchError(f"ps: the server forwarded a claim of rank {rank}, which is not a worker", rank=0)
        digest, _ = self.comm.recv_bytes(0, _TAG, max_bytes=64)
        claim = torch.empty(self.replica.num_params, dtype=torch.float32)
        salt = torch.empty(DIGEST_BYTES, dtype=torch.uint8)
        self.comm.recv(claim, rank, AUDIT_CLAIM)
        self.comm.recv(salt, rank, AUDIT_CLAIM)
        # what the server chained is not what we were sent: the sender lies
        if claim_digest(claim, salt.numpy().tobytes()) != digest:
            why = "its claim to the auditor is not the one whose digest it pushed to the server"
            self.auditor.report.rejections.append(ClaimCheck(rank - 1, step, version, math.nan, 1.0, False, why))
            check_ok = False
        else:
            check_ok = self.auditor.check(rank - 1, step, version, self.replica.flat_params(), claim).ok
        if check_ok:
            self.claims[rank] = claim
        else:
            self.auditor.report.excluded.append(rank - 1)  # the server excludes it on this verdict
        return int(check_ok)

    def _rekey(self) -> None:
        data, _ = self.comm.recv_bytes(0, _TAG, max_bytes=1 << 16)
        parties = [int(r) for r in json.loads(data)["parties"]]
        receivers = AuditedWorker.key_receivers(self.cfg)
        self.keys = setup_keys(self.comm, self.cfg.crypto, parties, receivers, self.stats, context=self.keys.context)

    def _encrypt(self) -> None:
        """Step 3: each admitted claim the server asks for, as ``g / W`` under the joint public key."""
        count = torch.zeros(1, dtype=torch.int64)
        self.comm.recv(count, 0, _TAG)
        ranks = torch.zeros(int(count.item()), dtype=torch.int64)
        if not 0 <= len(ranks) <= self.cfg.workers:
            raise LaunchError(f"ps: the server asked the auditor for {len(ranks)} ciphertexts", rank=0)
        if len(ranks):
            self.comm.recv(ranks, 0, _TAG)
        self.encrypted = [int(r) for r in ranks.tolist()]
        if any(rank not in self.claims for rank in self.encrypted):
            raise LaunchError(f"ps: the server asked to encrypt claims {self.encrypted} nobody admitted", rank=0)
        sigma = FLOODING.sigma(self.keys.context.params.scale_bits)
        self.grid = GainedGrid.for_round([self.claims[r] for r in self.encrypted], sigma, len(self.keys.parties))
        self.total = np.zeros(self.replica.num_params)
        for rank in self.encrypted:
            counts = self.grid.counts(self.claims[rank], self.cfg.workers)
            self.total += counts
            with self.stats.timing("encrypt"):
                values = counts * self.grid.step
                payload = encrypt(self.keys.public_key, values).to_bytes()
            self.stats.sent(len(payload), values.size)
            self.comm.send_bytes(payload, 0, _TAG)

    def _mean(self, fused: np.ndarray) -> torch.Tensor:
        """The fused ``(W / k) * sum`` back to whole steps of the grid: exactly the sum of the counts we encrypted, or
        the server aggregated something else. The mean of those counts is what every replica steps on."""
        k, w = len(self.encrypted), self.cfg.workers
        got = self.grid.decode(fused, w, k)
        noise = np.abs(np.asarray(fused) * (k / w) - self.total * self.grid.step)
        self.noise_steps = max(self.noise_steps, float(noise.max()) / self.grid.step if noise.size else 0.0)
        self.gains.append(self.grid.gain)
        wrong = np.flatnonzero(got != self.total)
        if wrong.size:
            i = int(wrong[0])
            raise LaunchError(
                f"ps: the decrypted aggregate is not the sum of the {k} claims the auditor encrypted ({wrong.size} "
                f"values differ, e.g. value {i} by {got[i] - self.total[i]:g} steps): the server aggregated something "
                "else, or a partial decryption carried wrong values (not attributable: docs/threshold-keys.md)",
                rank=0,
            )
        return torch.from_numpy(np.asarray(self.grid.mean(self.total, w, k), dtype=np.float32))

    def _decrypt(self) -> None:
        """Step 4: every party's partial of the aggregate checked and fused once, rounded back to the grid
        (``_mean``); the same bits to every worker and to our own optimizer step."""
        n = self.replica.num_params
        payload, _ = self.comm.recv_bytes(0, _TAG, max_bytes=max_payload_for(self.keys, n))
        try:
            vector = EncryptedVector.from_bytes(
                self.keys.context, payload, length=n, padded=True, dtype="float64", exact=True
            )
        except CryptoError as exc:
            raise LaunchError(f"ps: the server sent the auditor an invalid aggregate: {exc}", rank=0) from None
        partials, limit = {}, len(payload) + (1 << 16)
        for rank in self.keys.parties:
            try:
                partials[rank] = self.comm.recv_bytes(rank, AUDIT_CLAIM, max_bytes=limit)[0]
            except ValueError as exc:  # an announced size past any partial's: refused before allocating
                partials[rank] = b""
                log.warning("auditor: rank %d's partial refused: %s", rank, exc)
        with self.stats.timing("decrypt"):
            fused, invalid = fuse_checked(self.keys, vector, partials)
        mean = None if fused is None else self._mean(fused)
        for rank in self.keys.parties:
            self.comm.send(torch.tensor([int(mean is not None)], dtype=torch.int64), rank, AUDIT_MEAN)
            if mean is not None:
                self.comm.send(mean, rank, AUDIT_MEAN)
        if mean is not None:
            self.replica.set_flat_grad(mean)
            self.replica.step()
        report = {"invalid": {str(r): why for r, why in invalid.items()}}
        self.comm.send_bytes(json.dumps(report).encode(), 0, _TAG)
