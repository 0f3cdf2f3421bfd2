"""CKKS key material made at job start by the workers themselves, over torch.distributed.

Two modes (``--keys``):

- ``shared`` (the model NVIDIA FLARE uses): the first key party generates one key pair and sends the secret key to
  the other key parties; any one of them colluding with the server decrypts everyone.
- ``threshold`` (n-of-n multiparty CKKS; :mod:`trustgrad.crypto.keyset`, docs/threshold-keys.md): no party decides
  the joint key. The parties flip a seed (commit, reveal), derive a common public element from it, make their shares
  on it, commit to them, reveal them only once every commitment is in, and each sums all of them itself; the joint
  keys' digests (and each party's view of what everyone sent) are compared before anyone encrypts. A party whose
  reveal does not open its commitment, whose share is not on the common element, or who was seen differently by
  different parties is named in a one-line ``CryptoError`` and the set-up stops.

Non-parties (a parameter server) receive the context and the joint public key from every party, compare them (a
party whose key differs from the others' is named) and hold public material only — never a secret key or share.
Every rank rebuilds the context from the same parameters, so only public keys travel.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..comm import Comm
from ..config import CryptoConfig
from ..crypto import CKKSParams, Context, KeyShare, PublicKey, SecretKey, keygen
from ..crypto.keyset import (
    SEED_BYTES,
    commitment,
    common_public_key,
    joint_public_key,
    joint_seed,
    key_digest,
    threshold_share,
)
from ..errors import CryptoError, LaunchError
from ..tags import KEY_SETUP, REKEY, SERVICE
from .rogue import Honest
from .stats import CryptoStats

__all__ = [
    "announce_rekey",
    "KeyRing", "setup_keys", "all_to_all", "check_openings", "compare_views", "receive_agreed", "receive_checked",
    "recv_patient",
]  # fmt: skip

log = logging.getLogger(__name__)

_TAG = KEY_SETUP  # point-to-point tag for key set-up traffic (trustgrad.tags)
_SMALL = 1 << 16  # commitments, seeds, digests and views


@dataclass
class KeyRing:
    """What one rank holds: the context, the (joint) public key and, for key parties only, its secret or share.

    ``seed`` (threshold mode) is the jointly flipped seed of the common elements, which the evaluation keys reuse."""

    mode: str
    context: Context
    public_key: PublicKey
    secret: SecretKey | KeyShare | None
    parties: tuple[int, ...]
    seed: bytes = b""
    #: non-parties with ``exclude_refused``: the parties whose copy of the joint key failed validation, with why
    refused: dict[int, str] = field(default_factory=dict)

    @property
    def holds_secret(self) -> bool:
        return self.secret is not None


def setup_keys(
    comm: Comm,
    crypto: CryptoConfig,
    parties: Sequence[int],
    others: Sequence[int],
    stats: CryptoStats,
    context: Context | None = None,
    behaviour: Honest | None = None,
    exclude_refused: bool = False,
) -> KeyRing:
    """Run the key set-up on every rank of ``parties`` (key holders) and ``others`` (public key only); ``context``
    overrides the one ``crypto`` describes (every rank must pass the same parameters); ``behaviour`` is this rank's
    conduct as a key party (honest unless a test or ``--malicious`` makes it a rogue, :mod:`.rogue`).
    ``exclude_refused`` (a non-party that can go on without a party, and re-key: the ps server): a party whose copy of
    the joint key fails validation is listed in ``KeyRing.refused`` instead of ending the set-up."""
    parties = tuple(parties)
    context = context or Context(CKKSParams.from_config(crypto))
    me, seed, refused = comm.rank, b"", {}
    rogue = behaviour or Honest()
    with stats.timing("keygen"):
        if crypto.keys == "shared":
            public, secret = _shared(comm, context, parties, me)
            public = _hand_out_last(comm, context, parties, others, public)
        elif me in parties:
            public, secret, seed = _threshold(comm, context, parties, me, rogue)
            hand_out(comm, context, parties, others, public, "joint public key", rogue.hands_out(public.to_bytes()))
        else:
            secret = None
            public, refused = receive_checked(comm, context, parties, "joint public key")
            if refused and not exclude_refused:
                raise CryptoError(next(iter(refused.values())))
    log.info("rank %d: %s keys ready (%s)", me, crypto.keys, "secret held" if secret is not None else "public only")
    return KeyRing(crypto.keys, context, public, secret if me in parties else None, parties, seed, refused)


def _hand_out_last(
    comm: Comm, context: Context, parties: tuple[int, ...], others: Sequence[int], public: PublicKey | None
) -> PublicKey:
    """Shared mode: the last party holds the public key and hands it to everyone else."""
    last = parties[-1]
    if comm.rank == last:
        payload = public.to_bytes()  # type: ignore[union-attr]
        for rank in [*parties[:-1], *others]:
            comm.send_bytes(payload, rank, _TAG)
        return public  # type: ignore[return-value]
    data, _ = comm.recv_bytes(last, _TAG)
    return PublicKey.from_bytes(context, data)


def _shared(
    comm: Comm, context: Context, parties: tuple[int, ...], me: int
) -> tuple[PublicKey | None, SecretKey | None]:
    first = parties[0]
    if me == first:
        public, secret = keygen(context)
        blob = secret.to_bytes(include_secret=True)  # shared mode: the key parties all hold it, by definition
        for rank in parties[1:]:
            comm.send_bytes(blob, rank, _TAG)
        if parties[-1] != first:
            comm.send_bytes(public.to_bytes(), parties[-1], _TAG)
        return public, secret
    if me in parties:
        data, _ = comm.recv_bytes(first, _TAG)
        secret = SecretKey.from_bytes(context, data)
        if me == parties[-1]:
            data, _ = comm.recv_bytes(first, _TAG)
            return PublicKey.from_bytes(context, data), secret
        return None, secret
    return None, None


# -- threshold mode: commit, reveal, sum, compare -------------------------------------------------------------------


def _threshold(
    comm: Comm, context: Context, parties: tuple[int, ...], me: int, rogue: Honest
) -> tuple[PublicKey | None, KeyShare | None, bytes]:
    if me not in parties:
        return None, None, b""
    n, index = len(parties), parties.index(me) + 1
    peers = [r for r in parties if r != me]
    party = {r: parties.index(r) + 1 for r in parties}
    names = {party[r]: f"party {party[r]} (rank {r})" for r in parties}

    mine_r = secrets.token_bytes(SEED_BYTES)  # 1. the seed of the common element, flipped together
    c1 = all_to_all(comm, peers, lambda p, seen: commitment(mine_r), _SMALL)
    o1 = all_to_all(comm, peers, lambda p, seen: mine_r, _SMALL)
    check_openings(c1, o1, party, names, "seed contribution")
    seed = joint_seed({**{party[p]: o1[p] for p in peers}, index: mine_r})

    common = common_public_key(context, seed)  # 2. shares on it, 3. committed before any is revealed
    mine, share = threshold_share(common, index=index, parties=n)
    data = rogue.contribution(mine, common, share)
    c2 = all_to_all(comm, peers, lambda p, seen: commitment(rogue.for_peer(data, p)), _SMALL)
    limit = 2 * common.size + _SMALL
    o2 = all_to_all(comm, peers, lambda p, seen: rogue.reveal(data, p, seen, common), limit, rogue.sees_first)
    check_openings(c2, o2, party, names, "public key share")
    contributions = {**{party[p]: o2[p] for p in peers}, index: data}
    joint = joint_public_key(common, contributions, n, names)  # 4. summed by this party itself

    sent = {p: c1[p] + o1[p] + c2[p] + o2[p] for p in peers}  # 5. everyone holds the same key, from the same bytes
    own = commitment(mine_r) + mine_r + commitment(data) + data
    compare_views(comm, peers, party, names, key_digest(joint), {**sent, me: own})
    log.info("rank %d: joint key of %d parties agreed (%s)", me, n, joint.tag)
    return joint, share, seed


def all_to_all(
    comm: Comm,
    peers: Sequence[int],
    payload: Callable[..., bytes],
    max_bytes: int,
    sees_first: bool = False,
) -> dict[int, bytes]:
    """Send ``payload(peer, seen)`` to every peer and receive one message from each.

    Sends are posted before any receive, so the round needs no order. ``sees_first`` is how a rogue would like to
    play (receive everything, then choose what to send: ``payload(peer, seen)``); an honest party only sends what it
    committed to, so seeing first gains it nothing, and the commitments are what make it gain a rogue nothing."""
    if sees_first:
        got = {p: comm.recv_bytes(p, _TAG, max_bytes=max_bytes)[0] for p in peers}
        works = _post(comm, {p: payload(p, got) for p in peers})
    else:
        works = _post(comm, {p: payload(p, {}) for p in peers})
        got = {p: comm.recv_bytes(p, _TAG, max_bytes=max_bytes)[0] for p in peers}
    for work, _keep in works:
        comm.wait(work)
    return got


def _post(comm: Comm, messages: Mapping[int, bytes]) -> list:
    works, bodies = [], {}  # one buffer per distinct payload: an honest party sends the same bytes to everyone
    for peer, data in messages.items():
        header = torch.tensor([len(data)], dtype=torch.int64)
        works.append((comm.isend(header, peer, _TAG), header))  # keep the tensors alive until sent
        if data:
            if id(data) not in bodies:
                bodies[id(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            body = bodies[id(data)]
            works.append((comm.isend(body, peer, _TAG), body))
    return works


def check_openings(
    commitments: Mapping[int, bytes],
    reveals: Mapping[int, bytes],
    party: Mapping[int, int],
    names: Mapping[int, str],
    what: str,
) -> None:
    """Refuse, naming the sender, any reveal that does not open the commitment the same sender made before."""
    for rank, revealed in reveals.items():
        if commitment(revealed) != commitments[rank]:
            raise CryptoError(
                f"key set-up: {names[party[rank]]} revealed a {what} that does not open its commitment "
                "(it changed its contribution after seeing the others')"
            )


def compare_views(
    comm: Comm,
    peers: Sequence[int],
    party: Mapping[int, int],
    names: Mapping[int, str],
    digest: bytes,
    received: Mapping[int, bytes],
) -> None:
    """Exchange the joint-key digest and a digest of what each party received from each; refuse on any difference.

    Who differs is named. Without signatures, a party seen differently by two others either sent them different
    messages or one of them misreports: the message says both (docs/threshold-keys.md, residual risks)."""
    views = {str(party[r]): hashlib.blake2b(m, digest_size=16).hexdigest() for r, m in received.items()}
    mine = json.dumps({"digest": digest.hex(), "views": views}).encode()
    reports = {
        party[p]: _report(data, names[party[p]])
        for p, data in all_to_all(comm, peers, lambda p, seen: mine, _SMALL).items()
    }
    reports[party[comm.rank]] = (digest.hex(), views)
    seen_differently = sorted(i for i in names if len({r[1].get(str(i)) for r in reports.values()}) > 1)
    other_keys = sorted(i for i, r in reports.items() if r[0] != digest.hex())
    if seen_differently or other_keys:
        who = ", ".join(names[i] for i in seen_differently) or "none"
        raise CryptoError(
            f"key set-up: the parties do not hold the same joint key (different at {[names[i] for i in other_keys]}); "
            f"seen differently by different parties: {who}"
        )


def _report(data: bytes, who: str) -> tuple[str, dict[str, str]]:
    try:
        report = json.loads(data)
        digest, views = report["digest"], report["views"]
        if not isinstance(digest, str) or not isinstance(views, dict) or len(views) > 4096:
            raise ValueError("fields")
        return digest, {str(k): str(v) for k, v in views.items()}
    except (ValueError, KeyError, TypeError, RecursionError):
        raise CryptoError(f"key set-up: {who} sent a malformed key digest report") from None


def hand_out(
    comm: Comm,
    context: Context,
    parties: tuple[int, ...],
    others: Sequence[int],
    public: PublicKey | None,
    what: str,
    payload: bytes | None = None,
) -> PublicKey:
    """Every party sends the agreed key (``payload``: its bytes, if already serialized) to every non-party; a
    non-party takes it only if all parties sent the same."""
    if comm.rank in parties:
        payload = payload if payload is not None else public.to_bytes()  # type: ignore[union-attr]
        for rank in others:
            comm.send_bytes(payload, rank, _TAG)
        return public  # type: ignore[return-value]
    return receive_agreed(comm, context, parties, what)


# A receiver waits while the parties run the whole set-up (rotation keys at N = 16384: 1-2 minutes on a loaded
# 2-core machine, most of it generating keys); every party's own steps stay under the ordinary timeout.
_PATIENCE = 5


def recv_patient(comm: Comm, src: int, tag: int = _TAG, max_bytes: int = 1 << 31) -> bytes:
    """``comm.recv_bytes(copy=False)`` that waits ``_PATIENCE`` times the job's timeout for the message to start."""
    header = torch.zeros(1, dtype=torch.int64)
    comm.wait(comm.irecv(header, src, tag), comm.timeout * _PATIENCE)
    size = int(header.item())
    if not 0 <= size <= max_bytes:
        raise CryptoError(f"key set-up: rank {src} announced a key of {size} bytes (limit {max_bytes})")
    body = bytearray(size)  # received in place: a key of hundreds of MB is held once, not twice
    if size:
        comm.wait(comm.irecv(torch.frombuffer(body, dtype=torch.uint8), src, tag))
    return body  # type: ignore[return-value]


def receive_agreed(comm: Comm, context: Context, parties: Sequence[int], what: str) -> PublicKey:
    """The key every party sent this non-party; any copy that fails validation or differs ends the set-up, named."""
    public, refused = receive_checked(comm, context, parties, what)
    if refused:
        raise CryptoError(next(iter(refused.values())))
    return public


def receive_checked(
    comm: Comm, context: Context, parties: Sequence[int], what: str
) -> tuple[PublicKey, dict[int, str]]:
    """The key every party sent this non-party, and the parties whose copy failed validation (``PublicKey.from_bytes``:
    the exact layout, before OpenFHE parses a byte), with why. Each copy came over its sender's own channel, so a copy
    that fails is its sender's doing. Valid copies that differ cannot be told apart here (which party holds the key
    the others agreed on is their set-up's question): that ends the set-up, naming both sides."""
    groups: dict[bytes, tuple[bytes, list[int]]] = {}  # digest -> (one copy, its senders): keys can be hundreds of MB
    for rank in parties:
        data = recv_patient(comm, rank)
        groups.setdefault(hashlib.blake2b(data, digest_size=32).digest(), (data, []))[1].append(rank)
    valid: list[tuple[PublicKey, list[int]]] = []
    refused: dict[int, str] = {}
    for data, ranks in groups.values():
        try:
            valid.append((PublicKey.from_bytes(context, data), ranks))
        except CryptoError as exc:
            refused.update({r: f"key set-up: rank {r} sent an invalid {what}: {exc}" for r in ranks})
    if len(valid) != 1:
        sides = " vs ".join(str(sorted(ranks)) for _, ranks in valid) or "none valid"
        raise CryptoError(f"key set-up: the parties sent different valid copies of the {what} ({sides}); refusing all")
    return valid[0][0], refused


def announce_rekey(comm: Comm, survivors: list[int], reply_tag: int, too_few: str) -> None:
    """The server tells each survivor of an exclusion to re-key among ``survivors`` (a SERVICE REKEY request and the
    party list); threshold keys need 2 parties, so fewer is ``LaunchError(too_few)``."""
    if len(survivors) < 2:
        raise LaunchError(too_few)
    message = json.dumps({"parties": survivors}).encode()
    for rank in survivors:
        comm.send(torch.tensor([SERVICE, REKEY, 1], dtype=torch.int64), rank, reply_tag)
        comm.send_bytes(message, rank, reply_tag)
