"""``--aggregate RULE``: a robust rule (``trustgrad.robust``) in the gate slot.

The rule admits every claim of the round and replaces the codec's mean by its own aggregate (``combine``); which
senders it kept whole or left out is counted in its summary. It compares plaintext updates of one round, so it needs
synchronous rounds and a codec the server can read (``protect.build``'s capability check).
"""

from __future__ import annotations

from typing import Any

import torch

from ...robust import Gate as Rule
from ..slots import Batch, Gate, Verdict

__all__ = ["RobustGate"]


class RobustGate(Gate):
    def __init__(self, spec: str):
        self.rule = Rule.from_spec(spec)

    def screen(self, batch: Batch) -> Verdict:
        return Verdict.admit_all(batch.values)

    def combine(self, values: list[Any], senders: list[int] | None) -> torch.Tensor:
        return self.rule(values, senders).update

    def summary(self) -> dict[str, Any]:
        return self.rule.summary()
