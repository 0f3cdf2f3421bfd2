"""``ps --encrypt ckks``: the server aggregates gradients it cannot read (CKKS through ``trustgrad.crypto``).

Protocol, synchronous schedule (one round per model version):

1. Key set-up at job start (``secure.keys``): the W workers are the key parties (``shared``: one key pair, every
   worker holds the secret; ``threshold``: n-of-n multiparty keys, no secret anywhere in one piece). The server
   receives the context and the joint public key only.
2. Each worker pre-scales its gradient by 1/W and encrypts it under the public key; the payload it pushes is the
   ciphertext bytes (framed and checksummed by ``crypto``).
3. The server validates each ciphertext before OpenFHE parses it (``EncryptedVector.from_bytes`` against the exact
   layout of a fresh encryption of the model's length under the job's key; docs/wire.md). A worker whose push is
   refused is named and excluded, and the run goes on: with shared keys the round's other ciphertexts are aggregated;
   with threshold keys the excluded worker still holds a share every decryption needs, so the survivors re-key (new
   threshold keys among them, as ``ps --proof blind`` does after an exclusion) and push the round's gradient again
   under the new key. Either way the round is the mean of the survivors' gradients, as in a plaintext audit that
   rejects the same worker. The server adds the round's ciphertexts (additive homomorphism: Enc(mean) =
   sum Enc(g_i / W), times W / k when only k of the W workers count) and sends the encrypted mean back as the next
   "model version".
4. Workers decrypt the mean — alone (``shared``) or jointly (``threshold``: every worker's partial decryption goes to
   every other worker, never to the server, and each fuses) — and take the optimizer step locally. All replicas take
   the same step, so the trajectory is the ``allreduce`` one up to CKKS noise (~1e-9 relative). A partial decryption
   that fails validation stops the job with a one-line error naming its sender: it travels between workers, and the
   server, which could exclude, never sees it (docs/wire.md).

The server never holds a plaintext update or model (after W0, which derives from the public seed), so the run's
coordinator (evaluation, records) is worker 0. Asynchronous schedules keep per-worker momentum at the server (DANA),
which needs plaintext: they are refused with encryption.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import torch

from ...comm import Comm
from ...config import RunConfig
from ...crypto import EncryptedVector, aggregate, decrypt, encrypt, fuse, layout, partial_decrypt
from ...crypto.threshold import PartialDecryption
from ...errors import CryptoError, LaunchError
from ...secure import CryptoStats, KeyRing, setup_keys
from ...secure.rogue import behaviour
from .protocol import REPLY, SERVICE

__all__ = ["SecureWorker", "SecureServer", "RefusedPayload", "decode_fresh"]

log = logging.getLogger(__name__)

_TAG = 73  # worker <-> worker partial decryptions
_REPUSH = 74  # worker -> server: the round's gradient again, under the keys made after an exclusion
REKEY = 2  # SERVICE request: new threshold keys among the parties the server names (the value blind uses too)


class RefusedPayload(LaunchError):
    """A worker's push failed validation. The plain encrypted server excludes the worker and goes on; every other
    caller lets it end the job, named (it is a ``LaunchError`` carrying the sender's rank)."""


def _setup(comm: Comm, cfg: RunConfig, stats: CryptoStats) -> KeyRing:
    from .cipher_audit import auditor_rank

    parties = list(range(1, cfg.workers + 1))  # the workers, and the auditor rank when it audits ciphertexts
    auditor = auditor_rank(cfg)
    parties += [auditor] if auditor is not None else []
    return setup_keys(comm, cfg.crypto, parties, [0], stats, behaviour=behaviour(cfg.malicious, comm.rank))


def decode_fresh(keys: KeyRing, payload: bytes, rank: int, length: int, what: str = "ciphertext") -> EncryptedVector:
    """A worker's push: a fresh encryption of ``length`` float64 values under the job's key, zero-padded, else a
    ``RefusedPayload`` naming the worker."""
    try:
        vector = EncryptedVector.from_bytes(
            keys.context, payload, public_key=keys.public_key, length=length, padded=True, dtype="float64", exact=True
        )
        shape = layout.shape_of(vector.ciphertexts[0])
        if vector.mults or shape != layout.fresh_shape(keys.context):
            raise CryptoError(f"expected a fresh encryption, got one at level {shape[0]} after {vector.mults} products")
        return vector
    except CryptoError as exc:
        raise RefusedPayload(
            f"ps: worker {rank - 1} (rank {rank}) pushed an invalid {what}: {exc}", rank=rank
        ) from None


def _max_payload(keys: KeyRing, num_params: int) -> int:
    return (num_params // keys.context.slots + 2) * (8 << 20)  # a ciphertext is ~0.4 MB per 4096 slots


class SecureWorker:
    def __init__(self, comm: Comm, cfg: RunConfig):
        from ...attacks.poisoning import wire_tamper

        self.comm, self.cfg = comm, cfg
        self.stats = CryptoStats()
        self.keys = _setup(comm, cfg, self.stats)
        self.tamper = wire_tamper(cfg.malicious, comm.rank)  # --malicious ...,attack=crafted-*: this rank's bytes
        self.values: np.ndarray | None = None  # the last pushed gradient / W, pushed again after a re-keying

    def encode(self, flat: torch.Tensor) -> bytes:
        values = self.values = flat.detach().double().numpy() / self.cfg.workers
        with self.stats.timing("encrypt"):
            payload = encrypt(self.keys.public_key, values).to_bytes()
        if self.tamper is not None:
            payload = self.tamper("ciphertext", payload)
        self.stats.sent(len(payload), values.size)
        return payload

    def decode_mean(self, payload: bytes, num_params: int) -> torch.Tensor:
        """The round's mean gradient from the server's encrypted sum (step 4)."""
        with self.stats.timing("decrypt"):
            vector = EncryptedVector.from_bytes(
                self.keys.context, payload, length=num_params, padded=True, dtype="float64", exact=True
            )
            shared = self.keys.mode == "shared"
            mean = decrypt(self.keys.secret, vector) if shared else self._joint_decrypt(vector)  # type: ignore[arg-type]
        if len(mean) != num_params:
            raise CryptoError(f"the server sent an aggregate of {len(mean)} values for a model of {num_params}")
        return torch.from_numpy(np.asarray(mean, dtype=np.float32))

    def apply(self, replica: Any, payload: bytes) -> None:
        """Step 4: the round's encrypted mean -> the local optimizer step."""
        replica.set_flat_grad(self.decode_mean(payload, replica.num_params))
        replica.step()

    def serve(self, request: int, count: int, replica: Any) -> None:
        """A SERVICE request: re-keying among the parties the server names, after it excluded a worker."""
        if request != REKEY:
            raise LaunchError(f"ps: the server asked for request {request}, which ps --encrypt does not make")
        data, _ = self.comm.recv_bytes(0, REPLY, max_bytes=1 << 16)
        parties = [int(r) for r in json.loads(data)["parties"]]
        log.info("worker %d: re-keying among ranks %s", self.comm.rank - 1, parties)
        self.keys = setup_keys(self.comm, self.cfg.crypto, parties, [0], self.stats, context=self.keys.context)
        with self.stats.timing("encrypt"):
            payload = encrypt(self.keys.public_key, self.values).to_bytes()
        self.stats.sent(len(payload), self.values.size)  # type: ignore[union-attr]
        self.comm.send_bytes(payload, 0, _REPUSH)

    def max_payload(self, num_params: int) -> int:
        """The most ciphertext bytes an honest aggregate of ``num_params`` values takes (bounds what we allocate)."""
        return _max_payload(self.keys, num_params)

    def _joint_decrypt(self, vector: EncryptedVector) -> np.ndarray:
        mine = partial_decrypt(self.keys.secret, vector)  # type: ignore[arg-type]
        blob, partials = mine.to_bytes(), [mine]
        if self.tamper is not None:
            blob = self.tamper("partial", blob)
        workers = list(self.keys.parties)
        me = workers.index(self.comm.rank)
        for shift in range(1, len(workers)):  # everyone sends its partial to everyone else, in cyclic shifts
            dst, src = workers[(me + shift) % len(workers)], workers[(me - shift) % len(workers)]
            self.stats.sent(len(blob), 0)
            data = self.comm.exchange_bytes(blob, dst, src, _TAG)
            try:
                partials.append(
                    PartialDecryption.from_bytes(
                        self.keys.context, data, length=len(vector), parties=len(workers), padded=vector.padded,
                        dtype=vector.dtype, exact=True,
                    )
                )  # fmt: skip
            except CryptoError as exc:
                raise LaunchError(
                    f"ps: worker {src - 1} (rank {src}) sent an invalid partial decryption: {exc}", rank=src
                ) from None
        return fuse(partials)


class SecureServer:
    #: a refused push excludes its sender and the run goes on (``Server._refuse``)
    excludes_refused = True

    def __init__(self, comm: Comm, cfg: RunConfig):
        self.comm, self.cfg = comm, cfg
        self.stats = CryptoStats()
        self.keys = _setup(comm, cfg, self.stats)
        assert not self.keys.holds_secret  # by construction: the server is not a key party
        self.latest: bytes = b""  # the encrypted mean of the last round
        self.rekey_pending = False  # threshold keys: an excluded worker holds a share; re-key before decrypting
        self.report: dict[str, Any] = {"refused_payloads": [], "rekeys": 0, "rekey_seconds": 0.0}

    def refused(self, rank: int, reason: str) -> None:
        """A push of ``rank`` was refused and the server excluded it (called by ``Server._refuse``)."""
        self.report["refused_payloads"].append({"worker": rank - 1, "reason": reason})
        self.rekey_pending = self.keys.mode == "threshold"

    def rekey(self, survivors: list[int], num_params: int) -> dict[int, EncryptedVector]:
        """New threshold keys among ``survivors`` (the excluded worker's share no longer decrypts anything), and the
        round's pushes again, under them."""
        import time

        started = time.perf_counter()
        if len(survivors) < 2:
            raise LaunchError(
                f"ps: only worker {survivors[0] - 1 if survivors else '-'} is left after excluding a worker; "
                "threshold keys need 2 parties (run with more workers)"
            )
        message = json.dumps({"parties": survivors}).encode()
        for rank in survivors:
            self.comm.send(torch.tensor([SERVICE, REKEY, 1], dtype=torch.int64), rank, REPLY)
            self.comm.send_bytes(message, rank, REPLY)
        self.keys = setup_keys(self.comm, self.cfg.crypto, survivors, [0], self.stats, context=self.keys.context)
        limit = self.max_payload(num_params)
        again = {
            r: decode_fresh(self.keys, self.comm.recv_bytes(r, _REPUSH, limit)[0], r, num_params) for r in survivors
        }
        self.rekey_pending = False
        self.report["rekeys"] += 1
        self.report["rekey_seconds"] += time.perf_counter() - started
        log.info("ps: re-keyed among workers %s", [r - 1 for r in survivors])
        return again

    def key_material(self) -> list[str]:
        """What key material this process holds (for the record: never a secret key or share)."""
        held = ["context", f"public key ({self.keys.mode}, {len(self.keys.parties)} parties)"]
        return held + (["SECRET KEY"] if self.keys.holds_secret else [])

    def max_payload(self, num_params: int) -> int:
        return _max_payload(self.keys, num_params)

    def decode(self, payload: bytes, rank: int, num_params: int) -> EncryptedVector:
        return decode_fresh(self.keys, payload, rank, num_params)

    def aggregate(self, vectors: list[EncryptedVector]) -> EncryptedVector:
        """The sum of the pushes (each pre-scaled by 1/W), times W/k when only k workers count: the survivors' mean."""
        with self.stats.timing("aggregate"):
            k = len(vectors)
            return aggregate(vectors, scale=None if k == self.cfg.workers else self.cfg.workers / k)

    def publish(self, mean: EncryptedVector) -> None:
        self.latest = mean.to_bytes()
