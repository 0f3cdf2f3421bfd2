"""Who talks to whom in decentralized training: one gossip graph per round, agreed on without a coordinator.

A topology maps ``(rank, world, round, seed)`` to this rank's :class:`Peers` for that round: the ranks it pushes its
parameters to and the ranks it receives from. Every rank evaluates the same pure function, so peers agree on the graph
with no message exchanged (the random matching comes from the run's committed seed through ``seeding.derive_seed``).

>>> exponential(0, 8, 2, seed=0)  # round 2 of 8 ranks: the peer 2^2 = 4 hops away
Peers(out=(4,), inn=(4,))
>>> ring(3, 4, 0, seed=0)
Peers(out=(0, 2), inn=(0, 2))
>>> {random_pairs(r, 4, 7, seed=1).out[0] for r in range(4)} == {0, 1, 2, 3}  # a perfect matching
True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..registry import Registry
from ..seeding import rng

__all__ = ["Peers", "TOPOLOGIES", "ring", "exponential", "random_pairs"]


@dataclass(frozen=True)
class Peers:
    out: tuple[int, ...]  # ranks this rank sends to this round
    inn: tuple[int, ...]  # ranks this rank receives from this round


#: ``--topology NAME`` -> ``fn(rank, world, round, seed) -> Peers``
TOPOLOGIES: Registry[Callable[..., Peers]] = Registry("topology")


@TOPOLOGIES.register("ring")
def ring(rank: int, world: int, round_: int, seed: int) -> Peers:
    """Undirected ring, the same every round: both neighbours (D-PSGD's example graph, Lian et al. 2017)."""
    nbrs = tuple(sorted({(rank - 1) % world, (rank + 1) % world} - {rank}))
    return Peers(nbrs, nbrs)


@TOPOLOGIES.register("exponential")
def exponential(rank: int, world: int, round_: int, seed: int) -> Peers:
    """Directed time-varying exponential graph of Stochastic Gradient Push (Assran et al. 2019, Sec. 5).

    Round t sends to the peer 2^(t mod L) hops ahead and receives from the one as far behind, cycling over
    2^0 .. 2^(L-1) < world: one message per round, and with a power-of-two world every replica holds the exact
    average after L rounds of pure mixing.
    """
    if world == 1:
        return Peers((), ())
    hop = 1 << (round_ % (world - 1).bit_length())
    return Peers(((rank + hop) % world,), ((rank - hop) % world,))


@TOPOLOGIES.register("random-pairs")
def random_pairs(rank: int, world: int, round_: int, seed: int) -> Peers:
    """A fresh random perfect matching each round (randomized gossip, Boyd et al. 2006), from PRF(seed, round).

    With an odd world the rank drawn last sits the round out.
    """
    perm = rng(seed, "gossip", "random-pairs", round_).permutation(world).tolist()
    partner = perm.index(rank) ^ 1
    if partner >= world:
        return Peers((), ())
    return Peers((perm[partner],), (perm[partner],))
