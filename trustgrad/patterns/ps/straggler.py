"""Straggler injection for experiments: ``--straggler rank=1,prob=0.1,slowdown=6[,step-ms=20]``.

A straggling step lasts ``slowdown`` times as long as a normal one: the worker sleeps around its gradient computation.
Which steps straggle is a PRF of the run's seed, the worker and the step, so every schedule of an experiment meets the
same slow steps. ``rank`` is a worker's process rank (1..W; rank 0 serves) or ``all`` (transient stragglers
everywhere). ``step-ms`` makes every worker's step last at least that long, a stand-in for compute that keeps a 2-core
machine's scheduling noise small against the injected delays (docs/architecture.md §6: 4 ranks oversubscribe it).

>>> Straggler.parse("rank=all,prob=0.1,slowdown=6", workers=4).ranks
(1, 2, 3, 4)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ...errors import ConfigError
from ...seeding import rng

__all__ = ["Straggler"]

_KEYS = ("rank", "prob", "slowdown", "step-ms")


@dataclass(frozen=True)
class Straggler:
    ranks: tuple[int, ...]
    prob: float
    slowdown: float
    step_ms: float = 0.0

    @classmethod
    def parse(cls, spec: str, workers: int) -> Straggler:
        fields: dict[str, str] = {}
        for part in spec.split(","):
            key, sep, value = part.strip().partition("=")
            if not sep or key not in _KEYS:
                raise ConfigError(f"--straggler {spec!r}: expected key=value pairs with keys {', '.join(_KEYS)}")
            fields[key] = value.strip()
        if "rank" not in fields:
            raise ConfigError(f"--straggler {spec!r}: rank= is required (a worker rank 1..{workers}, or all)")
        try:
            ranks = tuple(range(1, workers + 1)) if fields["rank"] == "all" else (int(fields["rank"]),)
            prob, slowdown = float(fields.get("prob", "1")), float(fields.get("slowdown", "2"))
            step_ms = float(fields.get("step-ms", "0"))
        except ValueError:
            raise ConfigError(f"--straggler {spec!r}: rank must be an integer or all; prob, slowdown numbers") from None
        if any(not 1 <= r <= workers for r in ranks):
            raise ConfigError(f"--straggler {spec!r}: rank must be a worker rank 1..{workers} (rank 0 serves) or all")
        if not 0.0 <= prob <= 1.0 or not slowdown >= 1.0 or not step_ms >= 0.0:
            raise ConfigError(f"--straggler {spec!r}: need 0 <= prob <= 1, slowdown >= 1, step-ms >= 0")
        return cls(ranks, prob, slowdown, step_ms)

    def straggles(self, seed: int, rank: int, step: int) -> bool:
        return rank in self.ranks and rng(seed, "straggler", rank, step).random() < self.prob

    def pad(self, seed: int, rank: int, step: int, compute_seconds: float) -> bool:
        """Sleep so this step lasts its nominal time (times ``slowdown`` if it straggles); returns whether it did."""
        nominal = max(compute_seconds, self.step_ms / 1000.0)
        slow = self.straggles(seed, rank, step)
        delay = nominal * (self.slowdown if slow else 1.0) - compute_seconds
        if delay > 0:
            time.sleep(delay)
        return slow
