"""Robust aggregators as *gates*: claims in, a verdict out (admitted, excluded, the update); never the server's state.

A gate sees one round of flattened updates with the ranks that sent them and returns a :class:`Verdict`. It validates
what it is given before any arithmetic: rows that are not finite are excluded with a reason (they are certainly
Byzantine, so the rule's f shrinks by as many), and a round too small for the rule's f is a reasoned verdict that
falls back to the coordinate-wise median of the finite rows. Centered clipping keeps one piece of state, its center
(the previous aggregate); everything else is a pure function of the round (``rules``).

The rules and their parameters (``--aggregate NAME[,key=value...]``):

| name | parameters | needs |
|---|---|---|
| ``mean`` | | the plain average: no defence |
| ``krum`` | ``f`` | n >= 2f + 3 |
| ``multi-krum`` | ``f``, ``m`` (0: n - f) | n >= 2f + 3 |
| ``median`` | | n >= 1 |
| ``trimmed-mean`` | ``trim`` (ratio of n cut at each end, floor) | n > 2 floor(trim n) |
| ``bulyan`` | ``f`` | n >= 4f + 3 |
| ``centered-clipping`` | ``tau`` (radius), ``iters``, ``beta`` (worker momentum) | n >= 1 |

Every rule runs on the rounds of ``ps --schedule sync``. Centered clipping alone could run per push (n = 1 against
its running center), but it is not wired into the asynchronous schedules yet: they are a config error for every rule.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError
from ..registry import Registry
from . import rules

__all__ = ["Verdict", "Gate", "GATES", "parse_aggregate", "MAX_SPEC_CHARS"]

log = logging.getLogger(__name__)

#: a spec longer than this is refused before it is split (it comes from flags, TOML and experiment arguments)
MAX_SPEC_CHARS = 256


@dataclass(frozen=True)
class Verdict:
    """What a gate decided about one round: the update to apply and which senders it kept whole or refused."""

    update: torch.Tensor  # float32, the aggregate the server applies
    admitted: tuple[int, ...]  # senders whose update the rule kept whole (every sender for coordinate-wise rules)
    excluded: tuple[int, ...]  # senders the rule left out of the update
    reasons: dict[int, str] = field(default_factory=dict)  # why a sender was refused before the rule ran


@dataclass(frozen=True)
class Mean:
    """No defence: the plain average (the sync ps default)."""

    name = "mean"

    def needs(self, n: int) -> str | None:
        return None

    def __call__(self, g: torch.Tensor, center: torch.Tensor | None) -> tuple[torch.Tensor, list[int]]:
        return g.double().mean(0), list(range(len(g)))


@dataclass(frozen=True)
class Krum:
    f: int = 1
    name = "krum"

    def needs(self, n: int) -> str | None:
        return None if n >= 2 * self.f + 3 else f"krum with f={self.f} needs n >= 2f + 3 = {2 * self.f + 3} updates"

    def __call__(self, g: torch.Tensor, center: torch.Tensor | None) -> tuple[torch.Tensor, list[int]]:
        return rules.krum(g, self.f)


@dataclass(frozen=True)
class MultiKrum(Krum):
    m: int = 0  # 0: n - f
    name = "multi-krum"

    def __call__(self, g: torch.Tensor, center: torch.Tensor | None) -> tuple[torch.Tensor, list[int]]:
        return rules.multi_krum(g, self.f, self.m or len(g) - self.f)

    def needs(self, n: int) -> str | None:
        if self.m > n:
            return f"multi-krum m={self.m} exceeds the {n} updates of a round"
        return super().needs(n)


@dataclass(frozen=True)
class Median:
    name = "median"

    def needs(self, n: int) -> str | None:
        return None

    def __call__(self, g: torch.Tensor, center: torch.Tensor | None) -> tuple[torch.Tensor, list[int]]:
        return rules.median(g)


@dataclass(frozen=True)
class TrimmedMean:
    trim: float = 0.25
    name = "trimmed-mean"

    def __post_init__(self) -> None:
        if not 0.0 <= self.trim < 0.5:
            raise ConfigError(f"trimmed-mean trim must be in [0, 0.5), got {self.trim}")

    def cut(self, n: int) -> int:
        return math.floor(self.trim * n)

    def needs(self, n: int) -> str | None:
        return None if n > 2 * self.cut(n) else f"trimmed-mean trim={self.trim} leaves nothing of {n} updates"

    def __call__(self, g: torch.Tensor, center: torch.Tensor | None) -> tuple[torch.Tensor, list[int]]:
        return rules.trimmed_mean(g, self.cut(len(g)))


@dataclass(frozen=True)
class Bulyan:
    f: int = 1
    name = "bulyan"

    def needs(self, n: int) -> str | None:
        return None if n >= 4 * self.f + 3 else f"bulyan with f={self.f} needs n >= 4f + 3 = {4 * self.f + 3} updates"

    def __call__(self, g: torch.Tensor, center: torch.Tensor | None) -> tuple[torch.Tensor, list[int]]:
        return rules.bulyan(g, self.f)


@dataclass(frozen=True)
class CenteredClipping:
    tau: float = 1.0
    iters: int = 1
    # worker momentum, kept per sender at the gate (Karimireddy et al. clip momenta, not raw gradients: the averaging
    # over rounds shrinks honest variance so tau can be small); 0 clips the pushed gradients themselves. With beta > 0
    # the server should step without momentum of its own (--momentum 0), as in the paper.
    beta: float = 0.0
    name = "centered-clipping"

    def __post_init__(self) -> None:
        if not 0.0 < self.tau < math.inf:
            raise ConfigError(f"centered-clipping tau must be a finite number > 0, got {self.tau}")
        if not 1 <= self.iters <= 100:
            raise ConfigError(f"centered-clipping iters must be in [1, 100], got {self.iters}")
        if not 0.0 <= self.beta < 1.0:
            raise ConfigError(f"centered-clipping beta must be in [0, 1), got {self.beta}")

    def needs(self, n: int) -> str | None:
        return None

    def __call__(self, g: torch.Tensor, center: torch.Tensor | None) -> tuple[torch.Tensor, list[int]]:
        start = center if center is not None else torch.zeros(g.shape[1], dtype=torch.float64)
        return rules.centered_clipping(g, start, self.tau, self.iters)


#: ``--aggregate`` name -> rule class (its dataclass fields are the spec's keys)
GATES: Registry[type] = Registry("aggregation rule")
for _cls in (Mean, Krum, MultiKrum, Median, TrimmedMean, Bulyan, CenteredClipping):
    GATES.register(_cls.name)(_cls)


def parse_aggregate(spec: str) -> Any:
    """``NAME[,key=value...]`` -> the rule, validated; any problem is a one-line ``ConfigError``.

    >>> parse_aggregate("krum,f=2")
    Krum(f=2)
    >>> parse_aggregate("median,f=1")
    Traceback (most recent call last):
    ...
    trustgrad.errors.ConfigError: --aggregate median takes no options (got 'f')
    """
    if not isinstance(spec, str) or not spec.strip() or len(spec) > MAX_SPEC_CHARS or not spec.isprintable():
        raise ConfigError(f"--aggregate wants NAME[,key=value...] of at most {MAX_SPEC_CHARS} printable characters")
    name, *parts = [p.strip() for p in spec.split(",")]
    cls = GATES.get(name)
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for part in parts:
        key, sep, value = (s.strip() for s in part.partition("="))
        if not types:
            raise ConfigError(f"--aggregate {name} takes no options (got {key!r})")
        if not sep or key not in types:
            raise ConfigError(
                f"--aggregate {name}: expected key=value with key one of {', '.join(types)}; got {part!r}"
            )
        if key in kwargs:
            raise ConfigError(f"--aggregate {name}: {key!r} given twice")
        kwargs[key] = _number(name, key, value, int if types[key] in (int, "int") else float)
    for key in ("f", "m"):
        if kwargs.get(key, 0) < 0 or kwargs.get(key, 0) > 10_000:
            raise ConfigError(f"--aggregate {name}: {key} must be in [0, 10000], got {kwargs[key]}")
    return cls(**kwargs)


def _number(name: str, key: str, text: str, kind: type) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"--aggregate {name}: {key} must be {'an integer' if kind is int else 'a number'}, "
                          f"got {text[:32]!r}") from None  # fmt: skip
    if not math.isfinite(value):
        raise ConfigError(f"--aggregate {name}: {key} must be finite, got {text[:32]!r}")
    return value


class Gate:
    """A rule with the state it carries between rounds (centered clipping's center) and its running counts."""

    def __init__(self, rule: Any):
        self.rule = rule
        self.center: torch.Tensor | None = None
        self.momenta: dict[int, torch.Tensor] = {}  # centered clipping with beta > 0: each sender's momentum
        self.rounds = 0
        self.excluded_counts: dict[int, int] = {}
        self.admitted_counts: dict[int, int] = {}

    @classmethod
    def from_spec(cls, spec: str) -> Gate:
        return cls(parse_aggregate(spec))

    def __call__(self, grads: list[torch.Tensor] | torch.Tensor, senders: list[int] | None = None) -> Verdict:
        g = grads if isinstance(grads, torch.Tensor) else torch.stack(list(grads))
        senders = list(range(len(g))) if senders is None else list(senders)
        if g.dim() != 2 or len(g) != len(senders) or len(g) == 0:
            raise ConfigError(f"a gate takes [n, d] updates with one sender each, got {tuple(g.shape)}, {len(senders)}")
        finite = torch.isfinite(g).all(1)
        reasons = {senders[i]: "non-finite values" for i in range(len(g)) if not bool(finite[i])}
        keep = [i for i in range(len(g)) if bool(finite[i])]
        rule = self._shrunk(len(reasons))
        if not keep:  # nothing usable this round: no step (a zero update), everyone refused
            return self._record(Verdict(torch.zeros(g.shape[1]), (), tuple(senders), reasons))
        problem = rule.needs(len(keep))
        if problem is not None:
            # too few usable updates for this f: the median of what is left is the most robust thing that still runs
            log.warning("robust gate: %s this round; falling back to the median of %d", problem, len(keep))
            rule = Median()
        rows = self._momentum(g[keep], [senders[i] for i in keep], getattr(rule, "beta", 0.0))
        agg, chosen = rule(rows, self.center)
        self.center = agg.clone()
        admitted = tuple(senders[keep[i]] for i in chosen)
        excluded = tuple(s for s in senders if s not in admitted)
        return self._record(Verdict(agg.float(), admitted, excluded, reasons))

    def _momentum(self, rows: torch.Tensor, senders: list[int], beta: float) -> torch.Tensor:
        """Rows replaced by each sender's momentum ``m = beta m + (1 - beta) g`` (unchanged when beta is 0)."""
        if not beta:
            return rows
        out = []
        for s, row in zip(senders, rows.double()):
            m = self.momenta.get(s)
            self.momenta[s] = row.clone() if m is None else beta * m + (1 - beta) * row
            out.append(self.momenta[s])
        return torch.stack(out)

    def _shrunk(self, refused: int) -> Any:
        """The rule with f reduced by the senders already refused (they were among the f Byzantine ones)."""
        if refused and hasattr(self.rule, "f"):
            return dataclasses.replace(self.rule, f=max(0, self.rule.f - refused))
        return self.rule

    def _record(self, v: Verdict) -> Verdict:
        self.rounds += 1
        for s in v.excluded:
            self.excluded_counts[s] = self.excluded_counts.get(s, 0) + 1
        for s in v.admitted:
            self.admitted_counts[s] = self.admitted_counts.get(s, 0) + 1
        return v

    def summary(self) -> dict[str, Any]:
        return {
            "aggregate": self.rule.name,
            "aggregate_params": dataclasses.asdict(self.rule),
            "aggregate_rounds": self.rounds,
            "aggregate_excluded": {str(k): v for k, v in sorted(self.excluded_counts.items())},
            "aggregate_admitted": {str(k): v for k, v in sorted(self.admitted_counts.items())},
        }
