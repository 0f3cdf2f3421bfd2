"""How many segments to re-execute for a stated soundness, and the exact acceptance probability of a given forgery.

The guarantee is stated for a forger who makes at least a fraction ``f`` of the ``S`` segments wrong (a segment is
wrong when its re-execution from its claimed start does not reproduce its claimed end within the thresholds), and who
knows everything about the verifier except the nonce, which is drawn after the commitment. Such a forger controls
which segments are the largest updates (their checkpoints are its own), so the top-Q replays are counted for nothing
in the bound; it rests on the random draw alone. The verifier draws ``R`` distinct segments uniformly from the
``n`` that are not top-Q; at least ``m = ceil(f S)`` are wrong, and in the worst case all of them hide among those
``n``, so a proof is accepted with probability at most the hypergeometric tail

    P(no wrong segment drawn) = C(n - m, R) / C(n, R)           (0 when m > n: a wrong top-Q segment is replayed)

and the verifier takes the smallest ``R`` that brings this to ``delta`` or below. Every chosen segment is replayed
together with the segment before it, so each checked checkpoint is checked from both sides: its momentum buffers must
follow from the replay of its predecessor (a decoy that inflates one segment's update to make it the top-Q fails
there). The predecessors only add detection; the bound above does not count them.

>>> random_draws(segments=100, pool=90, f=0.1, delta=0.01)
32
>>> round(miss_probability(pool=90, wrong=10, draws=32), 4)
0.0091
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "Soundness",
    "random_draws",
    "miss_probability",
    "plan",
    "exact_acceptance",
    "wrong_at_least",
]


@dataclass(frozen=True)
class Soundness:
    """What a verification with these settings guarantees, and what it costs (``verdict.soundness``)."""

    segments: int  # S
    forged_fraction: float  # f
    wrong_at_least: int  # m = ceil(f S)
    max_forgery_acceptance: float  # delta asked for
    pool: int  # n: segments the random draw chooses from (not top-Q)
    random: int  # R
    acceptance_bound: float  # C(n - m, R) / C(n, R): what is guaranteed (<= delta unless R was forced lower)
    replayed_segments: int  # distinct segments re-executed (top-Q, random, and the predecessor of each)
    replayed_steps: int
    all_segments: bool
    top: tuple[int, ...] = ()  # indices of the top-Q segments (always replayed)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def statement(self) -> str:
        """One sentence for people: the guarantee and its cost."""
        if self.all_segments:
            return f"every segment re-executed ({self.segments}): a proof with any wrong segment is rejected"
        return (
            f"a proof with >= {self.forged_fraction:g} of its {self.segments} segments wrong "
            f"(>= {self.wrong_at_least}) "
            f"is accepted with probability <= {self.acceptance_bound:.3g} (asked: <= {self.max_forgery_acceptance:g}); "
            f"cost: {self.random} random + top-Q segments and their predecessors, {self.replayed_segments} of "
            f"{self.segments} segments, {self.replayed_steps} steps re-executed"
        )


def wrong_at_least(segments: int, f: float) -> int:
    """m = ceil(f S), at least 1: the fewest wrong segments a proof with a fraction f of them wrong has."""
    return max(1, math.ceil(f * segments - 1e-9))


def miss_probability(pool: int, wrong: int, draws: int) -> float:
    """C(pool - wrong, draws) / C(pool, draws): ``draws`` distinct uniform picks all miss ``wrong`` marked items."""
    if wrong > pool:
        wrong = pool
    if draws > pool - wrong:
        return 0.0
    return math.comb(pool - wrong, draws) / math.comb(pool, draws)


def random_draws(segments: int, pool: int, f: float, delta: float) -> int:
    """The smallest R with ``miss_probability(pool, m, R) <= delta`` (m = ceil(f S); 0 when m exceeds the pool)."""
    m = wrong_at_least(segments, f)
    if m > pool:  # at least one wrong segment is a top-Q one, which is always replayed
        return 0
    for r in range(pool + 1):
        if miss_probability(pool, m, r) <= delta:
            return r
    return pool


def plan(top: Iterable[int], pool: list[int], picks: Iterable[int]) -> list[tuple[int, str]]:
    """Segments to re-execute, each once: (index, why) for the top-Q, the random picks, and every predecessor."""
    chosen: dict[int, str] = {}
    for why, group in (("top-q", top), ("random", (pool[i] for i in picks))):
        for i in sorted(group):
            chosen.setdefault(i, why)
    for i in sorted(chosen):
        if i > 0:
            chosen.setdefault(i - 1, "predecessor")
    return sorted(chosen.items())


def exact_acceptance(wrong: set[int], top: Iterable[int], pool: list[int], draws: int) -> float:
    """The probability that this verifier accepts a proof whose wrong segments are exactly ``wrong``.

    Computed from the sampling rule, given every segment's replay outcome (``--all``): the top-Q and their
    predecessors are always replayed; each random pick i catches the forgery when i or i - 1 is wrong.
    """
    if any(i in wrong or i - 1 in wrong for i in top):
        return 0.0
    catching = sum(1 for i in pool if i in wrong or i - 1 in wrong)
    return miss_probability(len(pool), catching, draws)
