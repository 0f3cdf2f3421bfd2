"""``ps --encrypt ckks --keys threshold --proof audit``: audited claims, aggregated under threshold keys.

Under shared keys the auditor rank decrypts each claim with the shared secret (``gates/cipher_audit.py``). Under
threshold keys no rank can decrypt a claim alone, and asking every key holder for a flooded partial of every claim
would cost W partial decryptions per claim and put flooding noise (~2e-4) into every replay comparison. Instead the
auditor, the data owners' verifier, which already sees every claim in the shared-key design, receives the claims
in plaintext and is the one that encrypts them (docs/audits.md, docs/threshold-keys.md). Protocol, one synchronous
round (W workers are the key parties; the server and the auditor rank receive the joint public key only):

1. Each worker sends its gradient (float32, exact bits) and a fresh salt to the auditor over their own channel and
   pushes only its salted digest (BLAKE2b-256, :func:`claim_digest`) to the server, which chains it as the claim.
2. When the round is complete the server forwards every (rank, step, version, digest) to the auditor, which checks
   each claim against its digest and replays it (``trustgrad.audit.Auditor``, the plaintext threshold: exact).
3. A rejected worker still holds a share of the key: the survivors re-key (the auditor receives the new joint key)
   before anything of the round is encrypted. The auditor encrypts each admitted claim as ``g / W`` under the joint
   public key and sends the ciphertexts to the server, which validates them as it validates a worker's push.
4. The server aggregates the ciphertexts (times W / k for k survivors) and sends the encrypted mean to every worker
   and the auditor. Every worker sends the auditor its flooded partial decryption; the auditor checks each
   (``check_partial``), fuses them once and sends the fused mean, as float32, to every worker. Every worker and the
   auditor take their optimizer step on those same bits, so Adam's replicas cannot drift apart: two fusions of the
   same partials differ (OpenFHE's decoding adds fresh noise, ~5e-12 here), one fusion used by all does not. One
   fusion is not enough for runs to repeat, though: the flooding noise differs from run to run and Adam turns it
   into steps of about lr. So the auditor encrypts the claims on a grid of its own (``secure/grid.GainedGrid``:
   scaled by a power of two, rounded to steps 32 flooding sigmas wide) and rounds the fused sum back to it, which
   recovers exactly the integer sum it encrypted; a different sum stops the job (docs/threshold-keys.md).
5. A partial that fails the auditor's check names its sender: the server excludes it, the survivors re-key, the
   auditor encrypts the round's admitted claims again under the new key, and step 4 runs again.

The server never holds a key share or a plaintext claim (digests, and ciphertexts under the joint key), nor any
partial decryption. The auditor sees what the shared-key auditor sees (every claim, every mean) and holds no share.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from typing import Any

import numpy as np
import torch

from ...comm import Comm
from ...config import RunConfig
from ...crypto import EncryptedVector, fuse
from ...crypto import partial_decrypt as _partial_decrypt
from ...errors import CryptoError, LaunchError
from ...secure import setup_keys
from ...secure.keys import announce_rekey
from ...tags import AUDIT_CLAIM, AUDIT_MEAN, DECRYPT, REKEY
from ...tags import CIPHER_AUDIT as _AUDITOR
from ...tags import PS_REPLY as REPLY
from .ckks import RefusedPayload, SecureServer, SecureWorker, ask_to_decrypt, check_partial, decode_fresh

__all__ = ["AuditedWorker", "AuditedServer", "claim_digest", "DIGEST_BYTES", "REKEY_CMD", "ENCRYPT_CMD", "DECRYPT_CMD"]

log = logging.getLogger(__name__)

DIGEST_BYTES = 32
#: commands of the server to the auditor rank besides a round's claim count (>= 0) and the goodbye (-1)
REKEY_CMD, ENCRYPT_CMD, DECRYPT_CMD = -2, -3, -4


def claim_digest(claim: torch.Tensor, salt: bytes) -> bytes:
    """What a worker commits to at the server: BLAKE2b-256 of a fresh secret salt and its claim's float32 bytes (shape
    and dtype fixed by the model, so the raw bytes are the whole claim). The salt, which only the auditor receives,
    keeps the digest from confirming a guess: unsalted, a server that knows the model (W0 is public) could test a
    guessed batch of a worker's data against it."""
    data = claim.detach().to(torch.float32).contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES, key=salt, person=b"trustgrad-claim").digest()


def auditor_rank(cfg: RunConfig) -> int:
    return cfg.workers + 1


class AuditedWorker(SecureWorker):
    """A worker's side: the claim to the auditor, its digest to the server; partials to the auditor, which fuses."""

    @staticmethod
    def key_receivers(cfg: RunConfig) -> tuple[int, ...]:
        return (0, auditor_rank(cfg))

    def __init__(self, comm: Comm, cfg: RunConfig, parties: list[int]):
        super().__init__(comm, cfg, parties)
        self.auditor = auditor_rank(cfg)
        self.sending: list[tuple[Any, torch.Tensor]] = []  # the claim and its salt on their way to the auditor
        self.mean: tuple[bytes, torch.Tensor] | None = None  # (aggregate, the auditor's fused mean of it)

    def encode(self, flat: torch.Tensor) -> bytes:
        claim = flat.detach().to(torch.float32).contiguous().clone()
        salt = secrets.token_bytes(DIGEST_BYTES)
        self._sent()
        # not blocking sends: the auditor receives claims only once the server has the whole round
        tensors = [claim, torch.frombuffer(bytearray(salt), dtype=torch.uint8)]
        self.sending = [(self.comm.isend(t, self.auditor, AUDIT_CLAIM), t) for t in tensors]
        self.stats.sent(claim.numel() * 4 + DIGEST_BYTES, 0)
        digest = claim_digest(claim, salt)
        return self.tamper("digest", digest) if self.tamper is not None else digest  # --malicious ...split-claim

    def _sent(self) -> None:
        for work, _ in self.sending:
            self.comm.wait(work)
        self.sending = []

    def serve(self, request: int, count: int, replica: Any) -> None:
        """``REKEY`` (after an exclusion; nothing is pushed again: the auditor holds the claims) or ``DECRYPT``."""
        handler = {REKEY: self._rekey, DECRYPT: self._decrypt}.get(request)
        if handler is None:
            raise LaunchError(f"ps: the server asked for request {request}, which audited threshold ps does not make")
        self._sent()  # the auditor received the round's claims before any key work of the round
        handler(replica)

    def _rekey(self, replica: Any) -> None:
        data, _ = self.comm.recv_bytes(0, REPLY, max_bytes=1 << 16)
        parties = [int(r) for r in json.loads(data)["parties"]]
        log.info("worker %d: re-keying among ranks %s", self.comm.rank - 1, parties)
        receivers = self.key_receivers(self.cfg)
        self.keys = setup_keys(self.comm, self.cfg.crypto, parties, receivers, self.stats, context=self.keys.context)

    def _decrypt(self, replica: Any) -> None:
        """Step 4: our flooded partial of the round's aggregate to the auditor, and the fused mean back."""
        n = replica.num_params
        payload, _ = self.comm.recv_bytes(0, REPLY, max_bytes=self.max_payload(n))
        with self.stats.timing("decrypt"):
            blob = _partial_decrypt(self.keys.secret, self._aggregate(payload, n)).to_bytes()  # type: ignore[arg-type]
        sent = self.tamper("partial", blob) if self.tamper is not None else blob
        self.comm.send_bytes(sent, self.auditor, AUDIT_CLAIM)
        self.stats.sent(len(sent), 0)
        fused = torch.zeros(1, dtype=torch.int64)
        self.comm.recv(fused, self.auditor, AUDIT_MEAN)
        if not fused.item():  # a partial failed the auditor's check: the server excludes its sender and asks again
            self.mean = None
            return
        mean = torch.empty(n, dtype=torch.float32)
        self.comm.recv(mean, self.auditor, AUDIT_MEAN)
        self.mean = (payload, mean)

    def decode_mean(self, payload: bytes, num_params: int) -> torch.Tensor:
        if self.mean is None or self.mean[0] != payload:
            raise LaunchError(f"ps: the server answered worker {self.comm.rank - 1} with a round it never decrypted")
        mean, self.mean = self.mean[1], None
        return mean


class AuditedServer(SecureServer):
    """The server's side: digests in, the auditor's ciphertexts aggregated, the joint decryption settled by the
    auditor (step 4); the server itself never holds a plaintext claim, a partial or a share."""

    key_receivers = staticmethod(AuditedWorker.key_receivers)

    def __init__(self, comm: Comm, cfg: RunConfig, parties: list[int]):
        super().__init__(comm, cfg, parties)
        self.auditor = auditor_rank(cfg)
        self.digests: dict[int, bytes] = {}  # the round's pushes
        self.admitted: list[int] = []  # the round's claims the auditor admitted (and encrypts on request)

    def decode(self, payload: bytes, rank: int, num_params: int) -> bytes:
        if len(payload) != DIGEST_BYTES:
            raise RefusedPayload(
                f"ps: worker {rank - 1} (rank {rank}) pushed {len(payload)} bytes, not a {DIGEST_BYTES}-byte claim "
                "digest",
                rank=rank,
            )
        self.digests[rank] = payload
        return payload

    def rekey(self, survivors: list[int], num_params: int) -> dict[int, Any]:
        """New keys among ``survivors``; once the auditor admitted the round, its claims again under them (step 5),
        else the round's digests as they were pushed (the round is still to be screened)."""
        self.rekey_keys(survivors)
        if self.admitted:
            return self.fetch([r for r in self.admitted if r in survivors], num_params)
        return {r: self.digests[r] for r in survivors}

    def rekey_keys(self, survivors: list[int]) -> None:
        """Step 3: the excluded worker's share must no longer decrypt anything; the auditor receives the new key."""
        import time

        started = time.perf_counter()
        announce_rekey(
            self.comm, survivors, REPLY,
            f"ps: only worker {survivors[0] - 1 if survivors else '-'} is left after excluding a worker; "
            "threshold keys need 2 parties (run with more workers)",
        )  # fmt: skip
        self.comm.send(torch.tensor([REKEY_CMD], dtype=torch.int64), self.auditor, _AUDITOR)
        self.comm.send_bytes(json.dumps({"parties": survivors}).encode(), self.auditor, _AUDITOR)
        receivers = self.key_receivers(self.cfg)
        self.keys = setup_keys(self.comm, self.cfg.crypto, survivors, receivers, self.stats, context=self.keys.context)
        self.rekey_pending = False
        self.report["rekeys"] += 1
        self.report["rekey_seconds"] += time.perf_counter() - started
        log.info("ps: re-keyed among workers %s", [r - 1 for r in survivors])

    def fetch(self, ranks: list[int], num_params: int) -> dict[int, EncryptedVector]:
        """Step 3: the auditor's encryptions of the admitted claims of ``ranks``, validated as pushes are."""
        self.admitted = list(ranks)
        self.comm.send(torch.tensor([ENCRYPT_CMD], dtype=torch.int64), self.auditor, _AUDITOR)
        self.comm.send(torch.tensor([len(ranks)], dtype=torch.int64), self.auditor, _AUDITOR)
        if ranks:
            self.comm.send(torch.tensor(ranks, dtype=torch.int64), self.auditor, _AUDITOR)
        limit = self.max_payload(num_params)
        vectors = {}
        for rank in ranks:
            data, _ = self.comm.recv_bytes(self.auditor, _AUDITOR, max_bytes=limit)
            try:
                vectors[rank] = decode_fresh(self.keys, data, rank, num_params, what="ciphertext (from the auditor)")
            except RefusedPayload as exc:  # the auditor's bytes, not the worker's: nobody to exclude
                raise LaunchError(f"ps: the auditor sent an invalid ciphertext: {exc}", rank=self.auditor) from None
        return vectors

    def settle(self, live: list[int]) -> dict[int, str]:
        """Step 4: every worker's partial to the auditor, which fuses once; returns the senders of partials that
        failed its check (to exclude, then re-key: step 5), ``{}`` once every worker holds the fused mean."""
        if not self.latest:
            self.admitted = []
            return {}
        ask_to_decrypt(self.comm, self.keys, self.latest, live)
        self.comm.send(torch.tensor([DECRYPT_CMD], dtype=torch.int64), self.auditor, _AUDITOR)
        self.comm.send_bytes(self.latest, self.auditor, _AUDITOR)
        data, _ = self.comm.recv_bytes(self.auditor, _AUDITOR, max_bytes=1 << 16)
        invalid = {int(r): str(why) for r, why in json.loads(data)["invalid"].items()}
        if not invalid:
            self.admitted = []
        return {r: f"ps: {why}" for r, why in invalid.items() if r in live}


def fuse_checked(keys: Any, aggregate: EncryptedVector, partials: dict[int, bytes]) -> tuple[np.ndarray | None, dict]:
    """The auditor's step 4: each party's partial checked (``check_partial``), then one fusion; the senders whose
    partial failed, with why, and no mean if any did."""
    checked, invalid = [], {}
    for rank, data in sorted(partials.items()):
        try:
            checked.append(check_partial(keys, aggregate, data, rank))
        except CryptoError as exc:
            invalid[rank] = f"worker {rank - 1} (rank {rank}) sent the auditor an invalid partial decryption: {exc}"
    if invalid:
        return None, invalid
    return fuse(checked), {}
