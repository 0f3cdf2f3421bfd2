"""``ps --encrypt ckks``: the server aggregates gradients it cannot read (CKKS through ``trustgrad.crypto``).

Protocol, synchronous schedule (one round per model version):

1. Key set-up at job start (``secure.keys``): the W workers are the key parties (``shared``: one key pair, every
   worker holds the secret; ``threshold``: n-of-n multiparty keys, no secret anywhere in one piece). The server
   receives the context and the joint public key only.
2. Each worker pre-scales its gradient by 1/W and encrypts it under the public key; the payload it pushes is the
   ciphertext bytes (framed and checksummed by ``crypto``).
3. The server validates each ciphertext (``EncryptedVector.from_bytes``: a tampered or truncated one is a clean
   error naming the worker), adds the round's W ciphertexts (additive homomorphism: Enc(mean) = sum Enc(g_i / W)) and
   sends the encrypted mean back as the next "model version".
4. Workers decrypt the mean — alone (``shared``) or jointly (``threshold``: every worker's partial decryption goes to
   every other worker, never to the server, and each fuses) — and take the optimizer step locally. All replicas take
   the same step, so the trajectory is the ``allreduce`` one up to CKKS noise (~1e-9 relative).

The server never holds a plaintext update or model (after W0, which derives from the public seed), so the run's
coordinator (evaluation, records) is worker 0. Asynchronous schedules keep per-worker momentum at the server (DANA),
which needs plaintext: they are refused with encryption.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...comm import Comm
from ...config import RunConfig
from ...crypto import EncryptedVector, aggregate, decrypt, encrypt, fuse, partial_decrypt
from ...crypto.threshold import PartialDecryption
from ...errors import CryptoError, LaunchError
from ...secure import CryptoStats, KeyRing, setup_keys
from ...secure.rogue import behaviour

__all__ = ["SecureWorker", "SecureServer", "decode_fresh"]

_TAG = 73  # worker <-> worker partial decryptions


def _setup(comm: Comm, cfg: RunConfig, stats: CryptoStats) -> KeyRing:
    from .cipher_audit import auditor_rank

    parties = list(range(1, cfg.workers + 1))  # the workers, and the auditor rank when it audits ciphertexts
    auditor = auditor_rank(cfg)
    parties += [auditor] if auditor is not None else []
    return setup_keys(comm, cfg.crypto, parties, [0], stats, behaviour=behaviour(cfg.malicious, comm.rank))


def decode_fresh(keys: KeyRing, payload: bytes, rank: int, length: int, what: str = "ciphertext") -> EncryptedVector:
    """A worker's push: a fresh encryption of ``length`` values under the job's key, else a LaunchError naming it."""
    try:
        vector = EncryptedVector.from_bytes(keys.context, payload, public_key=keys.public_key)
        if len(vector) != length or vector.mults:
            raise CryptoError(f"expected a fresh encryption of {length} values, got {len(vector)}")
        return vector
    except CryptoError as exc:
        raise LaunchError(f"ps: worker {rank - 1} (rank {rank}) pushed an invalid {what}: {exc}", rank=rank) from None


def _max_payload(keys: KeyRing, num_params: int) -> int:
    return (num_params // keys.context.slots + 2) * (8 << 20)  # a ciphertext is ~0.4 MB per 4096 slots


class SecureWorker:
    def __init__(self, comm: Comm, cfg: RunConfig):
        self.comm, self.cfg = comm, cfg
        self.stats = CryptoStats()
        self.keys = _setup(comm, cfg, self.stats)

    def encode(self, flat: torch.Tensor) -> bytes:
        values = flat.detach().double().numpy() / self.cfg.workers
        with self.stats.timing("encrypt"):
            payload = encrypt(self.keys.public_key, values).to_bytes()
        self.stats.sent(len(payload), values.size)
        return payload

    def decode_mean(self, payload: bytes, num_params: int) -> torch.Tensor:
        """The round's mean gradient from the server's encrypted sum (step 4)."""
        with self.stats.timing("decrypt"):
            vector = EncryptedVector.from_bytes(self.keys.context, payload)
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
        raise LaunchError(f"ps: the server asked for request {request}, which ps --encrypt does not make")

    def max_payload(self, num_params: int) -> int:
        """The most ciphertext bytes an honest aggregate of ``num_params`` values takes (bounds what we allocate)."""
        return _max_payload(self.keys, num_params)

    def _joint_decrypt(self, vector: EncryptedVector) -> np.ndarray:
        mine = partial_decrypt(self.keys.secret, vector)  # type: ignore[arg-type]
        blob, partials = mine.to_bytes(), [mine]
        workers = list(self.keys.parties)
        me = workers.index(self.comm.rank)
        for shift in range(1, len(workers)):  # everyone sends its partial to everyone else, in cyclic shifts
            dst, src = workers[(me + shift) % len(workers)], workers[(me - shift) % len(workers)]
            self.stats.sent(len(blob), 0)
            data = self.comm.exchange_bytes(blob, dst, src, _TAG)
            partials.append(PartialDecryption.from_bytes(self.keys.context, data))
        return fuse(partials)


class SecureServer:
    def __init__(self, comm: Comm, cfg: RunConfig):
        self.comm, self.cfg = comm, cfg
        self.stats = CryptoStats()
        self.keys = _setup(comm, cfg, self.stats)
        assert not self.keys.holds_secret  # by construction: the server is not a key party
        self.latest: bytes = b""  # the encrypted mean of the last round

    def key_material(self) -> list[str]:
        """What key material this process holds (for the record: never a secret key or share)."""
        held = ["context", f"public key ({self.keys.mode}, {len(self.keys.parties)} parties)"]
        return held + (["SECRET KEY"] if self.keys.holds_secret else [])

    def max_payload(self, num_params: int) -> int:
        return _max_payload(self.keys, num_params)

    def decode(self, payload: bytes, rank: int, num_params: int) -> EncryptedVector:
        return decode_fresh(self.keys, payload, rank, num_params)

    def aggregate(self, vectors: list[EncryptedVector]) -> EncryptedVector:
        with self.stats.timing("aggregate"):
            return aggregate(vectors)

    def publish(self, mean: EncryptedVector) -> None:
        self.latest = mean.to_bytes()
