"""The ring's codec: CKKS ciphertexts under threshold keys, so no peer ever sees another's gradient.

Two protocols (``--ring-ciphertexts``, docs/wire.md, "The encrypted ring's protocols"):

* ``gather`` (the default): every round is steps 7-10 below, from the first. Every member decrypts only the sum it
  computed itself from bytes every member holds alike, so no member can make the others decrypt a ciphertext of its
  choice. Each member sends (W-1) whole encrypted vectors a round instead of the ring's 2 (W-1)/W.
* ``reduce-scatter``: steps 1-6, the bandwidth-optimal ring on ciphertexts (``patterns/ring.ring_all_reduce`` fills
  them through ``encode``, ``exchange`` + ``combine``, ``reveal``), with steps 7-10 only for a round in which a member
  refused a payload, and every round after it. Private only against honest-but-curious members: in step 3 nothing
  ties the ciphertext an owner sends to the real sum, so a malicious owner can send a fresh ciphertext of another
  member (a chunk it relayed in step 2) and collect every member's partial decryption of it: that member's chunk.

Protocol, for W members that each hold a share of an n-of-n threshold key (``secure.keys``) and a flat vector cut into
W chunks (chunk j is *owned* by the member at position j-1, the rank that finishes reducing it in a plaintext ring):

1. Encrypt: every member encrypts each of its W chunks under the joint public key.
2. Reduce-scatter on ciphertexts, W-1 steps: at step s the member at position p sends ciphertext chunk (p - s) to the
   next and adds the ciphertext chunk (p - s - 1) it receives (homomorphic addition). It ends with Enc(sum of chunk
   p+1); what it saw on the way were ciphertexts only.
3. Distribute the reduced ciphertexts: each owner sends Enc(sum of its chunk) to every other member.
4. Partial decryption: every member computes its decryption share of every reduced chunk and sends the share of chunk
   j only to chunk j's owner (OpenFHE's advice: partials go to the party that fuses, never broadcast).
5. The owner fuses the W shares into the plaintext sum of its chunk (all W are required: one missing share fails).
6. Agree, then all-gather: every member contributes a fixed-size status (whom it refused this round, and whether it
   could not finish) to the engine's all-gather, so every member learns every complaint alike. None: the plaintext
   sums go around the ring and every member learns the sum, which is what all-reduce is for, and nothing else.
7. Gather (every round by default; in reduce-scatter mode the round of a complaint, done again, and every later
   one), with the engine's collectives. Every member encrypts its whole vector and all-gathers the bytes: every
   member validates the same bytes of every sender, so every honest member refuses exactly the same senders, and no
   sender can show different bytes to different members.
8. No refusal: every member adds all the vectors itself (the same sum, in member order), computes its flooded
   partial decryption of that sum and all-gathers it; again every member validates the same bytes.
9. Every member fuses the W partials: the sum. What a peer saw: ciphertexts of each vector, and partials of the
   sum it learns anyway.
10. A refusal in 7 or 8: its senders are excluded by every honest member alike, the survivors form a new group and a
   new n-of-n key among themselves (``secure.keys.setup_keys``, a fresh seed), and the round starts again at 7 with
   the survivors' fresh encryptions. An excluded rank is never sent to or read from again. Fewer survivors than
   ``--min-replicas`` (or than 2, which threshold keys need) stop the job with one line.

Every ciphertext and partial decryption a rank receives is validated before OpenFHE parses it, against what the
receiver knows: the length, the joint key, the layout of a fresh or summed encryption, the sum's identity and the
sender's party index (docs/wire.md). A complaint in steps 2-5 costs the round's redo and never excludes anyone by
itself: only bytes that every member holds alike do.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ...comm import Comm
from ...config import CryptoConfig, RunConfig
from ...crypto import EncryptedVector, encrypt, fuse, partial_decrypt
from ...crypto.threshold import PartialDecryption
from ...errors import CryptoError, LaunchError
from ...secure import CryptoStats, KeyRing, setup_keys
from ...secure.rogue import Honest
from ...tags import RING_CIPHERTEXT as _TAG
from .ckks import check_partial

__all__ = ["RingCodec"]

log = logging.getLogger(__name__)

_SLACK = 1 << 16  # frame metadata: what a sender's payload may exceed an honest one of the same kind by


class RingCodec:
    """One rank's side of the encrypted ring: every member a key party of the job's threshold key."""

    encrypted = True

    def __init__(
        self,
        comm: Comm,
        keys: KeyRing,
        stats: CryptoStats,
        tamper: Callable[[str, bytes], bytes] | None = None,
        crypto: CryptoConfig | None = None,
        conduct: Honest | None = None,
        min_members: int = 2,
    ):
        self.comm, self.keys, self.stats = comm, keys, stats
        self.tamper = tamper or (lambda kind, payload: payload)  # --malicious ...,attack=crafted-*: what we send
        # --malicious ...,attack=false-report: whom it says it refused (as SecureWorker's report to the ps server)
        self.reports = getattr(tamper, "reports", None)
        # --malicious ...,attack=equivocate-partial: crafted to its peers, honest when everyone looks (gather steps)
        self.shows = getattr(tamper, "shows", None)
        self.crypto = crypto or CryptoConfig(encrypt="ckks", keys="threshold")
        self.conduct = conduct  # this rank as a key party when the survivors re-key
        self.min_members = max(2, min_members)
        self.members = list(keys.parties)
        self.started = len(self.members)
        self.group: Any = None  # the members' process group (None: the job's)
        # settle rounds with steps 7-10: from the first (gather), or once a round was disputed (reduce-scatter)
        self.gathers = self.crypto.ring_ciphertexts == "gather"
        self.disputed = False
        self.round = -1
        self.refusals: dict[int, str] = {}  # this round's complaints: sender -> why
        self.unfinished = False  # this rank could not fuse its chunk this round
        # dispute_*: rounds settled by gather because of a complaint (reduce-scatter mode only); decrypted_*: what this
        # rank partially decrypted (docs/wire.md: in gather mode only sums it computed itself, the same at every member)
        self.report: dict[str, Any] = {
            "ring_protocol": self.crypto.ring_ciphertexts, "exclusions": [], "complaints": [], "gather_rounds": 0,
            "gather_seconds": 0.0, "dispute_rounds": 0, "dispute_seconds": 0.0, "dispute_round_seconds": [],
            "rekeys": 0, "rekey_seconds": 0.0, "decrypted_own_sums": 0, "decrypted_received": 0, "decrypted_digest": "",
        }  # fmt: skip

    @classmethod
    def for_job(cls, comm: Comm, cfg: RunConfig) -> RingCodec:
        """Key set-up among every rank of the job (collective), with this rank's conduct under ``--malicious``."""
        from ...attacks.poisoning import wire_tamper
        from ...secure.rogue import behaviour

        stats = CryptoStats()
        conduct = behaviour(cfg.malicious, comm.rank)  # a rogue key party, in tests of the set-up
        keys = setup_keys(comm, cfg.crypto, range(comm.world_size), (), stats, None, conduct)
        least = cfg.pattern.min_replicas or cfg.workers // 2 + 1  # as gossip's default: a majority
        return cls(comm, keys, stats, wire_tamper(cfg.malicious, comm.rank), cfg.crypto, conduct, least)

    # ------------------------------------------------------------------ steps 1-5: the ring
    def begin_round(self) -> list[int]:
        """A new all-reduce: its members (an excluded rank no longer is one)."""
        self.round += 1
        self.refusals, self.unfinished = {}, False
        return self.members

    def encode(self, chunks: list[torch.Tensor]) -> list[EncryptedVector]:
        """Step 1: every chunk encrypted under the joint public key."""
        with self.stats.timing("encrypt"):
            return [encrypt(self.keys.public_key, c.detach().cpu().numpy().astype(np.float64)) for c in chunks]

    def exchange(self, chunk: EncryptedVector, dst: int, src: int, length: int) -> tuple[bytes, EncryptedVector | None]:
        """Step 2's message: ``chunk`` to ``dst``; ``src``'s chunk of ``length`` values back, validated (None:
        refused, and the round flagged)."""
        payload = self.tamper("ciphertext", chunk.to_bytes())
        self.stats.sent(len(payload), len(chunk))
        received = self.comm.exchange_bytes(payload, dst, src, _TAG)
        return received, self._vector(received, src, length)

    def combine(self, vectors: list[EncryptedVector]) -> EncryptedVector:
        """Homomorphic addition."""
        with self.stats.timing("aggregate"):
            total = vectors[0]
            for v in vectors[1:]:
                total = total + v
            return total

    def reveal(self, reduced: EncryptedVector, mine: int, bounds: list[int]) -> torch.Tensor | None:
        """Steps 3-5: this rank's reduced chunk ``mine`` to every member, every member's partial decryption of each
        chunk to that chunk's owner, fused here: the plaintext sum of chunk ``mine`` (float32); None when a payload
        was refused or missing (the round is flagged; step 6 settles it). A rank that refused a chunk sends its owner
        an empty share, so that nobody waits for a message that will not come."""
        comm, members = self.comm, self.members
        world, pos = len(members), members.index(comm.rank)
        chunks: dict[int, EncryptedVector] = {mine: reduced}
        blob = self.tamper("ciphertext", reduced.to_bytes())
        for shift in range(1, world):  # 3. every member gets every reduced chunk
            dst, src = members[(pos + shift) % world], members[(pos - shift) % world]
            self.stats.sent(len(blob), bounds[mine + 1] - bounds[mine])
            j = (pos - shift + 1) % world  # the chunk ``src`` owns
            got = self._vector(comm.exchange_bytes(blob, dst, src, _TAG), src, bounds[j + 1] - bounds[j])
            if got is not None:
                chunks[j] = got
        # 4. shares of chunk j go to its owner; every chunk but ours came from its owner, unverifiable here
        shares = {j: self._share(c, own=j == mine) for j, c in chunks.items()}
        collected = [shares[mine]]
        for shift in range(1, world):
            dst, src = members[(pos + shift) % world], members[(pos - shift) % world]
            share = shares.get((pos + shift + 1) % world)
            payload = self.tamper("partial", share.to_bytes()) if share is not None else b""
            self.stats.sent(len(payload), 0)
            data = comm.exchange_bytes(payload, dst, src, _TAG, max_bytes=len(blob) + _SLACK)
            partial = self._partial(data, src, reduced) if data else None
            if partial is not None:
                collected.append(partial)
        if len(collected) < world:  # a share refused or withheld: the round is settled again (step 7)
            self.unfinished = True
            return None
        with self.stats.timing("decrypt"):  # 5. fuse
            try:
                return torch.from_numpy(np.asarray(fuse(collected), dtype=np.float32))
            except CryptoError as exc:  # well-formed shares that do not fuse: not attributable here
                log.warning("rank %d: round %d's chunk did not fuse: %s", comm.rank, self.round, exc)
                self.unfinished = True
                return None

    # ------------------------------------------------------------------ step 6: agree
    def agree(self) -> bool:
        """Step 6: every member's complaints, through the engine's all-gather (a fixed-size status each, so nobody
        waits for a message that may not come); True when nobody flagged the round. Any flag settles this round
        and every later one with steps 7-10."""
        members, me = self.members, self.comm.rank
        accused = sorted(self.refusals)
        if self.reports is not None:
            accused = self.reports(accused, [m for m in members if m != me])
        status = torch.zeros(len(members) + 1, dtype=torch.int64)
        for rank in accused:
            status[members.index(rank)] = 1
        status[-1] = int(self.unfinished)
        rows = self.comm.all_gather(status, self.group)
        for by, row in zip(members, rows):
            against = [m for m, flag in zip(members, row[:-1].tolist()) if flag]
            if against or int(row[-1]):
                self.report["complaints"].append({"round": self.round, "by": by, "against": against})
        self.disputed = any(bool(row.any()) for row in rows)
        self.gathers = self.gathers or self.disputed
        return not self.disputed

    # ------------------------------------------------------------------ steps 7-10: gather
    def gather_sum(self, flat: torch.Tensor, observe: Callable[[str, Any], None] | None = None) -> torch.Tensor:
        """Steps 7-10: the sum of the members' ``flat`` (in place), with every payload all-gathered, excluding (and
        re-keying without) every sender whose bytes fail validation. On an excluded rank ``flat`` is left as is.
        ``observe(kind, payload)`` is shown the previous member's gathered ciphertext, as the ring shows its own."""
        started = time.perf_counter()
        self.report["gather_rounds"] += 1
        self.report["dispute_rounds"] += int(self.disputed)
        while True:
            total, refused = self._gather_round(flat, observe)
            if not refused:
                break
            self._exclude(refused)
            if self.comm.rank not in self.members:
                return flat
        flat.copy_(total.to(flat.dtype))
        seconds = time.perf_counter() - started
        self.report["gather_seconds"] += seconds
        if self.disputed:
            self.report["dispute_seconds"] += seconds
            self.report["dispute_round_seconds"].append(round(seconds, 3))  # a round with an exclusion: with re-key
        return flat

    def _gather_round(self, flat: torch.Tensor, observe: Callable | None) -> tuple[torch.Tensor, dict[int, str]]:
        """One try of steps 7-9 among the current members: (the sum, {}) or (nothing, the refused senders)."""
        n = flat.numel()
        with self.stats.timing("encrypt"):
            own = encrypt(self.keys.public_key, flat.detach().cpu().numpy().astype(np.float64))
        payload = self._shown("ciphertext", own.to_bytes())
        vectors, refused = {}, {}
        gathered = self._gather_bytes(payload, n)
        if observe is not None:  # what a peer sees of its neighbour (--record-server-view keeps the first)
            previous = self.members[(self.members.index(self.comm.rank) - 1) % len(self.members)]
            observe("ciphertext", (gathered[previous], previous))
        for rank, data in gathered.items():  # 7. every member validates the same bytes
            try:
                vectors[rank] = _vector(self.keys, data, n)
            except CryptoError as exc:
                refused[rank] = f"sent an invalid ciphertext: {exc}"
        if refused:
            return torch.empty(0), refused
        total = self.combine([vectors[m] for m in self.members])  # 8. the same sum at every member
        # named by the bytes it sums, so every member's partials are of one vector, and of this round's only
        total.id = hashlib.blake2b(b"".join(gathered[m] for m in self.members), digest_size=8).hexdigest()
        share = self._share(total, own=True)  # the sum this rank computed: the only ciphertext it decrypts here
        partials = {}
        for rank, data in self._gather_bytes(self._shown("partial", share.to_bytes()), 0).items():
            try:
                partials[rank] = check_partial(self.keys, total, data, rank)
            except CryptoError as exc:
                refused[rank] = f"sent an invalid partial decryption: {exc}"
        if refused:
            return torch.empty(0), refused
        with self.stats.timing("decrypt"):  # 9. every member fuses
            try:
                values = fuse([partials[m] for m in self.members])
            except CryptoError as exc:
                raise LaunchError(
                    f"ring: round {self.round}'s sum does not decrypt although every ciphertext and partial "
                    f"decryption passed validation ({exc}); a well-formed encryption of noise or a wrong share cannot "
                    "be attributed without verifiable decryption"
                ) from None
        return torch.from_numpy(np.asarray(values, dtype=np.float32)), {}

    def _share(self, ciphertext: EncryptedVector, own: bool) -> PartialDecryption:
        """This rank's partial decryption of ``ciphertext``, counted as a sum it computed itself (``own``) or one it
        received, and chained into ``decrypted_digest``: members that decrypted byte-identical ciphertexts in the
        same order end with the same digest (tests/test_wire_attacks.py checks that gather mode closes the oracle)."""
        self.report["decrypted_own_sums" if own else "decrypted_received"] += 1
        digest = hashlib.blake2b(ciphertext.to_bytes(), digest_size=16).hexdigest()
        chained = hashlib.blake2b((self.report["decrypted_digest"] + digest).encode(), digest_size=16)
        self.report["decrypted_digest"] = chained.hexdigest()
        with self.stats.timing("decrypt"):
            return partial_decrypt(self.keys.secret, ciphertext)  # type: ignore[arg-type]

    def _shown(self, kind: str, honest: bytes) -> bytes:
        """What this rank hands the all-gather: what it sends, or (a rank that equivocates) what it shows when every
        member sees the same bytes, as ``SecureWorker`` shows the ps server."""
        sent = self.tamper(kind, honest)
        return self.shows(honest, sent) if self.shows is not None else sent

    def _gather_bytes(self, payload: bytes, values: int) -> dict[int, bytes]:
        """Every member's ``payload``, through the engine's all-gather: the same bytes of each sender at every
        member. A sender that announces more than an honest payload of this kind (ours, plus ``_SLACK``) is given
        no room (its bytes are cut to that size and refused by validation). ``values``: plaintext values carried."""
        sizes = [int(s) for s in self.comm.all_gather(torch.tensor([len(payload)], dtype=torch.int64), self.group)]
        cap = len(payload) + _SLACK
        room = max(s for s in sizes if 0 <= s <= cap) if any(0 <= s <= cap for s in sizes) else 0
        buf = torch.zeros(room, dtype=torch.uint8)
        own = payload[:room]
        if own:
            buf[: len(own)] = torch.frombuffer(bytearray(own), dtype=torch.uint8)
        self.stats.sent((len(self.members) - 1) * room, values)
        rows = self.comm.all_gather(buf, self.group)
        return {m: row.numpy().tobytes()[: max(0, min(size, room))] for m, row, size in zip(self.members, rows, sizes)}

    def _exclude(self, refused: dict[int, str]) -> None:
        """Step 10: every honest member excludes the same senders (it validated the same bytes), then the survivors
        form their own group and key; fewer than the job's minimum stop it."""
        for rank, why in sorted(refused.items()):
            reason = f"ring: rank {rank} {why}"
            self.report["exclusions"].append({"rank": rank, "round": self.round, "reason": reason})
            log.warning("rank %d: %s; excluded at round %d", self.comm.rank, reason, self.round)
        survivors = [m for m in self.members if m not in refused]
        if self.comm.rank in refused:  # this rank's own bytes failed: it is out, and takes no further part
            self.members = survivors
            return
        if len(survivors) < self.min_members:
            first = self.report["exclusions"][-len(refused)]["reason"]
            raise LaunchError(
                f"{first}; excluded at round {self.round}: {len(survivors)} of {self.started} ranks remain, fewer "
                f"than --min-replicas {self.min_members}"
            )
        started = time.perf_counter()
        self.group = self.comm.new_group(survivors)
        self.keys = setup_keys(self.comm, self.crypto, survivors, (), self.stats, self.keys.context, self.conduct)
        self.members = survivors
        self.report["rekeys"] += 1
        self.report["rekey_seconds"] += time.perf_counter() - started

    # ------------------------------------------------------------------ receivers
    def _vector(self, data: bytes, sender: int, length: int) -> EncryptedVector | None:
        """A chunk from ``sender`` (step 2 or 3), or None: refused, the round flagged."""
        try:
            return _vector(self.keys, data, length)
        except CryptoError as exc:
            self.refusals.setdefault(sender, f"ring: rank {sender} sent an invalid ciphertext: {exc}")
            log.warning("rank %d: %s", self.comm.rank, self.refusals[sender])
            return None

    def _partial(self, data: bytes, sender: int, chunk: EncryptedVector) -> PartialDecryption | None:
        """``sender``'s share of the chunk this rank owns (step 4), or None: refused, the round flagged."""
        try:
            return check_partial(self.keys, chunk, data, sender)
        except CryptoError as exc:
            self.refusals.setdefault(sender, f"ring: rank {sender} sent an invalid partial decryption: {exc}")
            log.warning("rank %d: %s", self.comm.rank, self.refusals[sender])
            return None

    def cost(self) -> dict[str, Any]:
        excluded = {e["rank"]: e["reason"] for e in self.report["exclusions"]}
        out = {**self.stats.summary(), **self.report, "excluded_ranks": sorted(excluded)}
        if excluded:  # the run's replica report (``run._replica_report``): a ring's worker index is its rank
            out["dropped_reasons"] = {str(r): why for r, why in sorted(excluded.items())}
        return out


def _vector(keys: KeyRing, data: bytes, length: int) -> EncryptedVector:
    """``length`` zero-padded float64 values under the joint key, in the exact layout of an honest encryption."""
    return EncryptedVector.from_bytes(
        keys.context, data, public_key=keys.public_key, length=length, padded=True, dtype="float64", exact=True
    )
