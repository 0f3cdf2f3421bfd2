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
on ciphertexts. Threshold keys would need every worker's partial decryption of each claim for the auditor; not built.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ...audit import Auditor, ClaimChain
from ...comm import Comm
from ...config import RunConfig
from ...crypto import EncryptedVector, decrypt, encrypt
from ...data import load_dataset
from ...models import build_model
from ...replica import Replica, optimizer_for
from ...secure.grid import fixed_point, quantize, snap
from ...tags import CIPHER_AUDIT as _TAG
from ..codecs.ckks import SecureWorker
from ..slots import Batch, Claim, Gate, Verdict

__all__ = ["RemoteAudit", "CiphertextAuditor"]

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
