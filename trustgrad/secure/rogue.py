"""Rogue key parties: the attacks on threshold key set-up that :mod:`trustgrad.secure.keys` must detect and name.

A key party decides what it commits to, what it reveals, and to whom; each behaviour below overrides those choices
of the honest one and nothing else (docs/architecture.md §3). ``--malicious rank=R,attack=rogue-key-...`` selects one
for a run.

- ``rogue-key-chain``: contributes a complete key it built alone (OpenFHE's chain of n parties, run by itself);
  under the old chained set-up its key became the joint key. Stopped by: not on the common element.
- ``rogue-key-cancel``: commits honestly, then waits for every other contribution and reveals
  ``b_own - sum(b_others)``, so that the joint key's secret would be its own share alone. Stopped by: the reveal
  does not open its commitment.
- ``rogue-key-equivocate``: sends different (each correctly committed) contributions to different parties, so they
  would hold different joint keys. Stopped by: the joint-key digests differ, and the parties' views show who was
  seen differently.
- ``crafted-key``: takes part honestly, then hands the non-parties (the ps server) a crafted copy of the joint key
  (one OpenFHE modulus changed, valid CRC). Stopped by: the receiver's layout check, over the sender's own channel;
  ``ps --encrypt ckks`` excludes it and the survivors re-key before any round is decrypted.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import openfhe

from ..crypto.crs import CommonElement, towers
from ..crypto.keyset import threshold_share
from ..crypto.threshold import KeyShare, threshold_keygen

__all__ = ["KEY_ATTACKS", "Honest", "behaviour", "cancel_others"]


class Honest:
    """An honest key party: one contribution, committed and revealed to everyone alike."""

    sees_first = False  # reveal only after receiving everyone's reveal (what a rogue would like to do)

    def contribution(self, mine: bytes, common: CommonElement, share: KeyShare) -> bytes:
        return mine

    def for_peer(self, data: bytes, peer: int) -> bytes:
        """What this party sends to ``peer`` as its contribution (commitment rounds hash this)."""
        return data

    def reveal(self, data: bytes, peer: int, seen: Mapping[int, bytes], common: CommonElement) -> bytes:
        return self.for_peer(data, peer)

    def hands_out(self, key: bytes) -> bytes:
        """What this party sends the non-parties as the agreed joint key."""
        return key


class OwnChain(Honest):
    def contribution(self, mine: bytes, common: CommonElement, share: KeyShare) -> bytes:
        ctx, pk = common.context, None
        for _ in range(share.parties):  # the whole chain, alone: every share of this key is the rogue's
            pk, _share = threshold_keygen(ctx, share.parties, pk)
        return openfhe.Serialize(pk._pk, openfhe.BINARY)


class Cancel(Honest):
    sees_first = True

    def reveal(self, data: bytes, peer: int, seen: Mapping[int, bytes], common: CommonElement) -> bytes:
        return cancel_others(common, data, list(seen.values()))


class Equivocate(Honest):
    def __init__(self) -> None:
        self._other: bytes | None = None
        self._victim: int | None = None  # the first peer it sends to gets the other contribution

    def contribution(self, mine: bytes, common: CommonElement, share: KeyShare) -> bytes:
        self._other = threshold_share(common, index=share.index, parties=share.parties)[0]
        return mine

    def for_peer(self, data: bytes, peer: int) -> bytes:
        if self._other is None:
            return data
        self._victim = peer if self._victim is None else self._victim
        return self._other if peer == self._victim else data


class CraftedKey(Honest):
    def hands_out(self, key: bytes) -> bytes:
        from ..attacks.poisoning import craft_modulus

        return craft_modulus(key)


KEY_ATTACKS: dict[str, type[Honest]] = {
    "crafted-key": CraftedKey,
    "rogue-key-chain": OwnChain,
    "rogue-key-cancel": Cancel,
    "rogue-key-equivocate": Equivocate,
}


def behaviour(malicious: tuple[str, ...], rank: int) -> Honest:
    """The key-party behaviour of ``rank`` under ``--malicious`` specs (honest unless one names a key attack)."""
    from ..attacks.specs import parse_malicious

    for text in malicious:
        spec = parse_malicious(text)
        if spec.rank == rank and spec.attack in KEY_ATTACKS:
            return KEY_ATTACKS[spec.attack]()
    return Honest()


def cancel_others(common: CommonElement, own: bytes, others: list[bytes]) -> bytes:
    """``own`` with its key part replaced by ``b_own - sum(b_others)`` (mod each tower's modulus), same ``a``."""
    n = common.context.ring_dim
    t = towers(own, n)
    out = bytearray(own)
    for k, (offset, q) in enumerate(zip(t.offsets, t.moduli)):
        if k in common.shared:
            continue
        acc = np.frombuffer(own, dtype="<u8", count=n, offset=offset).copy()
        for other in others:
            o = np.frombuffer(other, dtype="<u8", count=n, offset=towers(other, n).offsets[k])
            acc = (acc + np.uint64(q) - o) % np.uint64(q)
        out[offset : offset + 8 * n] = acc.astype("<u8").tobytes()
    return bytes(out)
