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
   the same step, so the trajectory is the ``allreduce`` one up to CKKS noise (~1e-9 relative). With threshold keys
   the joint decryption is settled before the round is answered (``SecureServer.settle``): each worker reports which
   partials it received failed validation; the server asks each accused worker for its partial over the accused's
   own channel and checks it as the workers do. A partial that fails there names and excludes its sender, and the
   survivors re-key and push the round again (step 3); one that passes is relayed to its accusers (a sender that
   showed the server valid bytes but sent others invalid ones, or an accuser that lies, costs a relay, never an honest
   worker's exclusion). The server sees the partials of accused workers only; a worker that accuses everyone while
   colluding with the server hands it a round the worker decrypts anyway, nothing more (docs/wire.md).

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
from ...secure.grid import fixed_point, quantize, snap_mean
from ...secure.keys import announce_rekey
from ...secure.rogue import behaviour
from ...tags import DECRYPT, DECRYPTION_STATUS, PARTIAL_DECRYPTION, REKEY, RELAY, REPUSH, SERVICE, SHOW
from ...tags import PS_REPLY as REPLY
from ..slots import ServerCodec, WorkerCodec

__all__ = [
    "SecureWorker", "SecureServer", "RefusedPayload", "decode_fresh", "check_partial", "parse_decryption_report",
    "max_payload_for",
]  # fmt: skip

log = logging.getLogger(__name__)

MAX_REPORT_BYTES = 1 << 16  # a decryption report names at most every other worker


class RefusedPayload(LaunchError):
    """A worker's push failed validation. The plain encrypted server excludes the worker and goes on; every other
    caller lets it end the job, named (it is a ``LaunchError`` carrying the sender's rank)."""


def _setup(
    comm: Comm,
    cfg: RunConfig,
    parties: list[int],
    stats: CryptoStats,
    exclude_refused: bool = False,
    others: tuple[int, ...] = (0,),
) -> KeyRing:
    """The job's keys among ``parties`` (the workers, and the auditor rank when it audits ciphertexts); ``others``
    receive the public key only (the server; the auditor rank under threshold keys: ``codecs.audited``)."""
    conduct = behaviour(cfg.malicious, comm.rank)
    return setup_keys(comm, cfg.crypto, parties, others, stats, behaviour=conduct, exclude_refused=exclude_refused)


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


def check_partial(keys: KeyRing, aggregate: EncryptedVector, data: bytes, rank: int) -> PartialDecryption:
    """The partial decryption of ``aggregate`` that the party at ``rank`` sent, checked before OpenFHE sees it: the
    exact layout (``PartialDecryption.from_bytes``), this aggregate's identity, the sender's own party index. The
    workers and the server run this same check, so a partial the server passed, every honest worker passes."""
    partial = PartialDecryption.from_bytes(
        keys.context, data, length=len(aggregate), parties=len(keys.parties), padded=aggregate.padded,
        dtype=aggregate.dtype, exact=True,
    )  # fmt: skip
    party = keys.parties.index(rank) + 1
    if partial.index != party:
        raise CryptoError(f"it declares party {partial.index}, its sender is party {party}")
    if (partial.id, partial.tag, partial.mults) != (aggregate.id, aggregate.tag, aggregate.mults):
        raise CryptoError("it is not a partial decryption of this round's aggregate")
    return partial


class _JointRound:
    """A worker's share of one round's joint decryption: the aggregate as the server sent it, the partials that
    passed ``check_partial`` (ours included), and the senders whose did not (with why)."""

    def __init__(self, keys: KeyRing, rank: int, payload: bytes, aggregate: EncryptedVector):
        self.keys, self.payload, self.aggregate = keys, payload, aggregate
        self.partials = {rank: partial_decrypt(keys.secret, aggregate)}  # type: ignore[arg-type]
        self.invalid: dict[int, str] = {}
        self.reported: set[int] = set()  # the senders we reported to the server (the server relays only those)
        self.sent = b""  # the bytes of our partial we sent (a tampering rank's, as tampered)
        self.max_bytes = len(payload) + (1 << 16)  # a partial is one element per ciphertext, the aggregate two

    def accept(self, src: int, data: bytes) -> None:
        try:
            self.partials[src] = check_partial(self.keys, self.aggregate, data, src)
            self.invalid.pop(src, None)
        except CryptoError as exc:
            self.invalid[src] = f"worker {src - 1} (rank {src}) sent an invalid partial decryption: {exc}"

    def fuse(self) -> np.ndarray:
        if self.invalid or len(self.partials) != len(self.keys.parties):
            raise LaunchError(f"ps: the server answered a round whose partials are incomplete: {self.invalid}")
        return fuse(list(self.partials.values()))


def max_payload_for(keys: KeyRing, num_params: int) -> int:
    return (num_params // keys.context.slots + 2) * (8 << 20)  # a ciphertext is ~0.4 MB per 4096 slots


class SecureWorker(WorkerCodec):
    encrypted = True

    def __init__(self, comm: Comm, cfg: RunConfig, parties: list[int]):
        from ...attacks.poisoning import wire_tamper

        self.comm, self.cfg = comm, cfg
        self.stats = CryptoStats()
        self.keys = _setup(comm, cfg, parties, self.stats, others=self.key_receivers(cfg))
        self.tamper = wire_tamper(cfg.malicious, comm.rank)  # --malicious ...,attack=crafted-*: this rank's bytes
        self.values: np.ndarray | None = None  # the last pushed gradient / W, pushed again after a re-keying
        self.joint: _JointRound | None = None  # threshold keys: the round being decrypted jointly

    @staticmethod
    def key_receivers(cfg: RunConfig) -> tuple[int, ...]:
        """The ranks that receive the joint public key without being key parties."""
        return (0,)

    def encode(self, flat: torch.Tensor) -> bytes:
        values = self.values = flat.detach().double().numpy() / self.cfg.workers
        if fixed_point(self.cfg):  # Adam: every party must decrypt the same bits (trustgrad/secure/grid.py)
            values = self.values = quantize(values)
        with self.stats.timing("encrypt"):
            payload = encrypt(self.keys.public_key, values).to_bytes()
        if self.tamper is not None:
            payload = self.tamper("ciphertext", payload)
        self.stats.sent(len(payload), values.size)
        return payload

    def decode_mean(self, payload: bytes, num_params: int) -> torch.Tensor:
        """The round's mean gradient from the server's encrypted sum (step 4): decrypted alone (shared keys) or the
        joint decryption settled before the server answered (threshold keys)."""
        if self.keys.mode == "shared":
            with self.stats.timing("decrypt"):
                mean = decrypt(self.keys.secret, self._aggregate(payload, num_params))  # type: ignore[arg-type]
        elif self.joint is None or self.joint.payload != payload:
            raise LaunchError(f"ps: the server answered worker {self.comm.rank - 1} with a round it never decrypted")
        else:
            with self.stats.timing("decrypt"):
                mean = self.joint.fuse()
            self.joint = None
        if len(mean) != num_params:
            raise CryptoError(f"the server sent an aggregate of {len(mean)} values for a model of {num_params}")
        if fixed_point(self.cfg):
            mean = snap_mean(mean, self.cfg.workers)
        return torch.from_numpy(np.asarray(mean, dtype=np.float32))

    def cost(self) -> dict[str, Any]:
        return self.stats.summary()

    def apply(self, replica: Any, payload: bytes) -> None:
        """Step 4: the round's encrypted mean -> the local optimizer step."""
        replica.set_flat_grad(self.decode_mean(payload, replica.num_params))
        replica.step()

    def serve(self, request: int, count: int, replica: Any) -> None:
        """A SERVICE request: the round's joint decryption (``DECRYPT``, ``SHOW``, ``RELAY``), or re-keying among the
        parties the server names after it excluded a worker (``REKEY``)."""
        handler = {REKEY: self._rekey, DECRYPT: self._decrypt, SHOW: self._show, RELAY: self._relay}.get(request)
        if handler is None or (request != REKEY and self.keys.mode != "threshold"):
            raise LaunchError(f"ps: the server asked for request {request}, which ps --encrypt does not make")
        handler(replica)

    def _aggregate(self, payload: bytes, num_params: int) -> EncryptedVector:
        return EncryptedVector.from_bytes(
            self.keys.context, payload, length=num_params, padded=True, dtype="float64", exact=True
        )

    def _decrypt(self, replica: Any) -> None:
        """``DECRYPT``: our partial of the round's aggregate to every other worker, theirs checked, and the senders
        whose partials failed reported to the server (who settles; nothing is fused before it answers)."""
        payload, _ = self.comm.recv_bytes(0, REPLY, max_bytes=self.max_payload(replica.num_params))
        self.joint = self._exchange(payload, self._aggregate(payload, replica.num_params))
        if self.joint.invalid:
            log.warning("worker %d: invalid partial decryptions: %s", self.comm.rank - 1, self.joint.invalid)
        invalid = sorted(self.joint.invalid)
        if self.tamper is not None:  # --malicious ...,attack=false-report
            invalid = self.tamper.reports(invalid, [r for r in self.keys.parties if r != self.comm.rank])
        self.joint.reported = set(invalid)
        self.comm.send_bytes(json.dumps({"invalid": invalid}).encode(), 0, DECRYPTION_STATUS)

    def _exchange(self, payload: bytes, vector: EncryptedVector) -> _JointRound:
        """Our partial of ``vector`` to every other party and theirs from each, checked (``check_partial``)."""
        with self.stats.timing("decrypt"):
            joint = _JointRound(self.keys, self.comm.rank, payload, vector)
            blob = joint.partials[self.comm.rank].to_bytes()
        joint.sent = self.tamper("partial", blob) if self.tamper is not None else blob
        workers = list(self.keys.parties)
        me = workers.index(self.comm.rank)
        for shift in range(1, len(workers)):  # everyone sends its partial to everyone else, in cyclic shifts
            dst, src = workers[(me + shift) % len(workers)], workers[(me - shift) % len(workers)]
            self.stats.sent(len(joint.sent), 0)
            try:
                data = self.comm.exchange_bytes(joint.sent, dst, src, PARTIAL_DECRYPTION, max_bytes=joint.max_bytes)
            except ValueError as exc:  # an announced size past any partial's: refused before allocating
                joint.invalid[src] = f"worker {src - 1} (rank {src}) sent an invalid partial decryption: {exc}"
                continue
            joint.accept(src, data)
        return joint

    def _joint_decrypt(self, payload: bytes, vector: EncryptedVector) -> np.ndarray:
        """``vector`` decrypted with every other party in one exchange, an invalid partial ending the job named (the
        blind pattern's aggregate; plain ps settles its rounds through the server instead: ``_decrypt``)."""
        joint = self._exchange(payload, vector)
        for src, reason in joint.invalid.items():
            raise LaunchError(f"ps: {reason}", rank=src)
        with self.stats.timing("decrypt"):
            return joint.fuse()

    def _show(self, replica: Any) -> None:
        """``SHOW``: another worker reported our partial invalid; the server checks the one we sent."""
        if self.joint is None:
            raise LaunchError(f"ps: the server asked worker {self.comm.rank - 1} for a partial of no round")
        honest, sent = self.joint.partials[self.comm.rank].to_bytes(), self.joint.sent
        self.comm.send_bytes(self.tamper.shows(honest, sent) if self.tamper is not None else sent, 0, DECRYPTION_STATUS)

    def _relay(self, replica: Any) -> None:
        """``RELAY``: the partial the server checked, of a worker whose partial to us failed."""
        header, _ = self.comm.recv_bytes(0, REPLY, max_bytes=1 << 10)
        data, _ = self.comm.recv_bytes(0, REPLY, max_bytes=self.joint.max_bytes if self.joint else 0)
        try:
            src = int(json.loads(header)["from"])
            if self.joint is None or src not in self.joint.reported:
                raise ValueError("not a partial we reported")
        except (ValueError, TypeError, KeyError):
            raise LaunchError("ps: the server relayed a partial decryption nobody asked for", rank=0) from None
        self.joint.accept(src, data)
        if src in self.joint.invalid:  # the server passed bytes our identical check refuses: it is the liar
            raise LaunchError(f"ps: the server relayed an invalid partial of rank {src}: {self.joint.invalid[src]}")

    def _rekey(self, replica: Any) -> None:
        data, _ = self.comm.recv_bytes(0, REPLY, max_bytes=1 << 16)
        parties = [int(r) for r in json.loads(data)["parties"]]
        log.info("worker %d: re-keying among ranks %s", self.comm.rank - 1, parties)
        self.keys = setup_keys(self.comm, self.cfg.crypto, parties, [0], self.stats, context=self.keys.context)
        with self.stats.timing("encrypt"):
            payload = encrypt(self.keys.public_key, self.values).to_bytes()
        self.stats.sent(len(payload), self.values.size)  # type: ignore[union-attr]
        self.comm.send_bytes(payload, 0, REPUSH)

    def max_payload(self, num_params: int) -> int:
        """The most ciphertext bytes an honest aggregate of ``num_params`` values takes (bounds what we allocate)."""
        return max_payload_for(self.keys, num_params)


class SecureServer(ServerCodec):
    encrypted = True
    #: a refused push excludes its sender and the run goes on (``Server._refuse``)
    excludes_refused = True

    def __init__(self, comm: Comm, cfg: RunConfig, parties: list[int]):
        self.comm, self.cfg = comm, cfg
        self.stats = CryptoStats()
        # threshold keys: a worker whose copy of the joint key fails validation is excluded before the first round
        # (``refused_at_setup``), and the survivors re-key before anything is decrypted
        self.keys = _setup(comm, cfg, parties, self.stats, cfg.crypto.keys == "threshold", self.key_receivers(cfg))
        assert not self.keys.holds_secret  # by construction: the server is not a key party
        self.latest: bytes = b""  # the encrypted mean of the last round
        self.mean: EncryptedVector | None = None  # the same, parsed: what partials of it are checked against
        self.rekey_pending = False  # threshold keys: an excluded worker holds a share; re-key before decrypting
        self._refused_at_setup = dict(self.keys.refused)  # rank -> why; the server excludes them before round 0
        self.report: dict[str, Any] = {
            "refused_payloads": [], "rekeys": 0, "rekey_seconds": 0.0, "partials_relayed": 0, "partials_shown": 0,
        }  # fmt: skip

    key_receivers = staticmethod(SecureWorker.key_receivers)

    def refused_at_setup(self) -> dict[int, str]:
        return self._refused_at_setup

    def cost(self) -> dict[str, Any]:
        return self.stats.summary()

    def decisions(self) -> dict[str, Any]:
        return self.report

    def refused(self, rank: int, reason: str) -> None:
        """A push of ``rank`` was refused and the server excluded it (called by ``Server._refuse``)."""
        self.report["refused_payloads"].append({"worker": rank - 1, "reason": reason})
        self.rekey_pending = self.keys.mode == "threshold"

    def rekey(self, survivors: list[int], num_params: int) -> dict[int, EncryptedVector]:
        """New threshold keys among ``survivors`` (the excluded worker's share no longer decrypts anything), and the
        round's pushes again, under them."""
        import time

        started = time.perf_counter()
        announce_rekey(
            self.comm,
            survivors,
            REPLY,
            f"ps: only worker {survivors[0] - 1 if survivors else '-'} is left after excluding a worker; "
            "threshold keys need 2 parties (run with more workers)",
        )
        self.keys = setup_keys(self.comm, self.cfg.crypto, survivors, [0], self.stats, context=self.keys.context)
        limit = self.max_payload(num_params)
        again = {
            r: decode_fresh(self.keys, self.comm.recv_bytes(r, REPUSH, limit)[0], r, num_params) for r in survivors
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
        return max_payload_for(self.keys, num_params)

    def decode(self, payload: bytes, rank: int, num_params: int) -> EncryptedVector:
        return decode_fresh(self.keys, payload, rank, num_params)

    def combine(self, vectors: list[EncryptedVector]) -> EncryptedVector:
        """The sum of the pushes (each pre-scaled by 1/W), times W/k when only k workers count: the survivors' mean."""
        with self.stats.timing("aggregate"):
            k = len(vectors)
            return aggregate(vectors, scale=None if k == self.cfg.workers else self.cfg.workers / k)

    def publish(self, mean: EncryptedVector) -> None:
        self.mean, self.latest = mean, mean.to_bytes()

    def settle(self, live: list[int]) -> dict[int, str]:
        """Threshold keys: the workers decrypt the round's aggregate jointly before the server answers the round (the
        module docstring, step 4). Returns the workers whose partial decryption failed the check here, with why (they
        are to be excluded, and the survivors re-keyed); ``{}`` once every worker holds every partial."""
        if self.keys.mode != "threshold" or not self.latest:
            return {}
        ask_to_decrypt(self.comm, self.keys, self.latest, live)
        accusers: dict[int, list[int]] = {}  # accused rank -> the ranks that reported its partial invalid
        culprits: dict[int, str] = {}
        for rank in live:
            reported = self._report(rank, live)
            if reported is None:  # a worker that cannot say which partials failed cannot take part in the round
                culprits[rank] = f"ps: worker {rank - 1} (rank {rank}) sent a malformed decryption report"
            for accused in reported or []:
                accusers.setdefault(accused, []).append(rank)
        for accused, by in sorted(accusers.items()):
            if accused in culprits:
                continue
            self.comm.send(torch.tensor([SERVICE, SHOW, 1], dtype=torch.int64), accused, REPLY)
            self.report["partials_shown"] += 1
            try:
                data, _ = self.comm.recv_bytes(accused, DECRYPTION_STATUS, max_bytes=len(self.latest) + (1 << 16))
                check_partial(self.keys, self.mean, data, accused)  # type: ignore[arg-type]
            except (CryptoError, ValueError) as exc:  # ValueError: a size past any partial's, refused unallocated
                who = f"worker {accused - 1} (rank {accused})"
                culprits[accused] = f"ps: {who} showed the server an invalid partial decryption: {exc}"
                continue
            for rank in (r for r in by if r not in culprits):  # valid here, so at every honest worker: relayed
                self.comm.send(torch.tensor([SERVICE, RELAY, 1], dtype=torch.int64), rank, REPLY)
                self.comm.send_bytes(json.dumps({"from": accused}).encode(), rank, REPLY)
                self.comm.send_bytes(data, rank, REPLY)
                self.report["partials_relayed"] += 1
        return culprits

    def _report(self, rank: int, live: list[int]) -> list[int] | None:
        try:
            data, _ = self.comm.recv_bytes(rank, DECRYPTION_STATUS, max_bytes=MAX_REPORT_BYTES)
        except ValueError:  # it announced more than any report takes: refused before allocating
            return None
        return parse_decryption_report(data, rank, live)


def ask_to_decrypt(comm: Comm, keys: KeyRing, aggregate: bytes, live: list[int]) -> None:
    """Send the round's aggregate to every key party for its partial decryption; every party must be live (n-of-n)."""
    if sorted(live) != sorted(keys.parties):
        raise LaunchError(f"ps: the round's workers {live} are not the key's parties {list(keys.parties)}")
    for rank in live:
        comm.send(torch.tensor([SERVICE, DECRYPT, 1], dtype=torch.int64), rank, REPLY)
        comm.send_bytes(aggregate, rank, REPLY)


def parse_decryption_report(data: bytes, rank: int, live: list[int]) -> list[int] | None:
    """The ranks whose partials worker ``rank`` reports invalid: ``{"invalid": [rank, ...]}``, each a live worker other
    than ``rank``; None for anything else (at most ``MAX_REPORT_BYTES``; fuzzed: tests/fuzz/targets)."""
    if len(data) > MAX_REPORT_BYTES:
        return None
    try:
        body = json.loads(data)
        accused = body["invalid"] if isinstance(body, dict) and set(body) == {"invalid"} else None
        if not isinstance(accused, list) or not all(type(r) is int and r in live and r != rank for r in accused):
            return None
        return sorted(set(accused))
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested past the parser's recursion
        return None
