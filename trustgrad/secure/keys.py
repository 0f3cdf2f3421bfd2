"""CKKS key material made at job start by the workers themselves, over torch.distributed.

Two modes (``--keys``):

- ``shared`` (the model NVIDIA FLARE uses): the first key party generates one key pair and sends the secret key to
  the other key parties; any one of them colluding with the server decrypts everyone.
- ``threshold`` (n-of-n multiparty CKKS; OpenFHE's ``MultipartyKeyGen``): party 1 generates a key pair, party i
  extends the previous party's public key with its own secret share, the last party's public key is the joint key.
  No secret exists in one place: decrypting needs every party's partial decryption.

Non-parties (a parameter server) receive the context and the joint public key only — never a secret key or share.
Every rank rebuilds the context from the same parameters, so only public keys travel.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from ..comm import Comm
from ..config import CryptoConfig
from ..crypto import CKKSParams, Context, KeyShare, PublicKey, SecretKey, keygen, threshold_keygen
from .stats import CryptoStats

__all__ = ["KeyRing", "setup_keys"]

log = logging.getLogger(__name__)

_TAG = 71  # point-to-point tag for key set-up traffic


@dataclass
class KeyRing:
    """What one rank holds: the context, the (joint) public key and, for key parties only, its secret or share."""

    mode: str
    context: Context
    public_key: PublicKey
    secret: SecretKey | KeyShare | None
    parties: tuple[int, ...]

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
) -> KeyRing:
    """Run the key set-up on every rank of ``parties`` (key holders) and ``others`` (public key only); ``context``
    overrides the one ``crypto`` describes (every rank must pass the same parameters)."""
    parties = tuple(parties)
    context = context or Context(CKKSParams.from_config(crypto))
    me = comm.rank
    with stats.timing("keygen"):
        if crypto.keys == "shared":
            public, secret = _shared(comm, context, parties, me)
        else:
            public, secret = _threshold(comm, context, parties, me)
        # the last party holds the final public key: hand it to everyone else
        last = parties[-1]
        if me == last:
            payload = public.to_bytes()
            for rank in [*parties[:-1], *others]:
                comm.send_bytes(payload, rank, _TAG)
        else:
            data, _ = comm.recv_bytes(last, _TAG)
            public = PublicKey.from_bytes(context, data)
    log.info("rank %d: %s keys ready (%s)", me, crypto.keys, "secret held" if secret is not None else "public only")
    return KeyRing(crypto.keys, context, public, secret if me in parties else None, parties)


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


def _threshold(
    comm: Comm, context: Context, parties: tuple[int, ...], me: int
) -> tuple[PublicKey | None, KeyShare | None]:
    if me not in parties:
        return None, None
    position = parties.index(me)
    previous = None
    if position > 0:
        data, _ = comm.recv_bytes(parties[position - 1], _TAG)
        previous = PublicKey.from_bytes(context, data)
    public, share = threshold_keygen(context, len(parties), previous)
    if position + 1 < len(parties):
        comm.send_bytes(public.to_bytes(), parties[position + 1], _TAG)
    return public, share
