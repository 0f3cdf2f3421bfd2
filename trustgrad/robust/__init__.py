"""Robust aggregation (Krum, Multi-Krum, median, trimmed mean, Bulyan, centered clipping) as gates over a round.

``rules`` holds the pure functions over a ``[n, d]`` stack; ``gate`` wraps a rule with its parameters, validation and
the little state it keeps, and returns a :class:`Verdict` (admitted, excluded, the update) without touching the
server. See docs/robustness.md for what each rule withstands on our jobs.

>>> import torch
>>> gate = Gate.from_spec("krum,f=1")
>>> v = gate(torch.tensor([[0.0], [0.1], [0.2], [0.3], [9.0]]))
>>> v.admitted, v.excluded
((1,), (0, 2, 3, 4))
"""

from __future__ import annotations

from .gate import GATES, Gate, Verdict, parse_aggregate

__all__ = ["GATES", "Gate", "Verdict", "parse_aggregate"]
