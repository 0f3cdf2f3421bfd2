"""Exact repair after a late catch: replay the rounds since the liar's oldest unverified claim without its lies.

Below audit rate 1 a liar is caught some rounds after it started lying. Removing its shares from the weights (linear
for SGD + momentum: what trustgrad did before this module) is not enough: the honest gradients of those rounds were
computed at the poisoned models and stay in (measured: runs caught at steps 0-6 ended 3-6 points below runs caught at
step 0). The auditor holds the data and the batches are a PRF of the committed seed, so it can compute what the
honest workers *would* have pushed on the repaired trajectory. Protocol (synchronous rounds):

1. While any worker has an unverified contribution among the last ``max_rounds`` rounds, every applied round is logged:
   the parameters and momentum it started from, each member's (step, gradient) and which claims were verified. A
   worker's *window* starts at its oldest unverified contribution in the log (a later verified claim proves nothing
   about an earlier one, so it does not close the window).
2. The log keeps at most ``max_rounds`` rounds (the server sizes it to a memory budget): contributions older than
   that are final, and a lie that old stays in the model (docs/audits.md states the reach).
3. When a claim is rejected, the model goes back to the state at the start of the liar's window and the logged
   rounds are replayed: every unverified claim is audited at the parameters it was computed on (a lie drops its
   worker from that round on), and each surviving member contributes its logged gradient while the replayed
   parameters are still bit-identical to the logged ones, else the gradient the auditor recomputes at the replayed
   parameters. Each round is the mean of its survivors, stepped by the server's own optimizer. The current round's
   gradients are recomputed the same way. The result is the trajectory of a run whose audits had caught the liar at
   its first lie within the reach, up to floating point (bit-exact where replay is).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..replica import Replica

__all__ = ["Round", "RepairLog", "Repaired"]

log = logging.getLogger(__name__)

#: (worker rank, step, version, parameters, claimed gradient) -> the claim reproduces
Judge = Callable[[int, int, int, torch.Tensor, torch.Tensor], bool]
#: (worker rank, step, parameters) -> the honest gradient of that step at those parameters
Recompute = Callable[[int, int, torch.Tensor], torch.Tensor]


@dataclass
class Round:
    """One synchronous round as applied (or about to be): where it started and what each member contributed."""

    version: int
    params: torch.Tensor
    momentum: torch.Tensor | None
    members: dict[int, tuple[int, torch.Tensor]]  # rank -> (step, gradient)
    verified: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class Repaired:
    contributions: dict[int, torch.Tensor]  # the current round's gradients on the repaired trajectory
    liars: frozenset[int]  # every rank whose lie the replay found (the rejected ones included)
    rounds: int  # logged rounds replayed
    recomputed: int  # gradients the auditor recomputed at repaired parameters
    audited: int  # unverified claims audited during the replay


class RepairLog:
    def __init__(self, max_rounds: int = 256):
        if max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
        self.max_rounds = max_rounds
        self.rounds: list[Round] = []
        self.window: dict[int, int] = {}  # rank -> version its open window starts at

    def record(self, rnd: Round) -> None:
        """A round about to be applied (step 1): its unverified members open a window if they have none."""
        for rank in rnd.members:
            if rank not in rnd.verified:
                self.window.setdefault(rank, rnd.version)
        if self.window:
            self.rounds.append(rnd)
        self._prune(rnd.version)

    def repair(
        self,
        liars: set[int],
        current: Round,
        replica: Replica,
        aggregate: Callable[[list[torch.Tensor]], torch.Tensor],
        judge: Judge,
        recompute: Recompute,
        stand_in: bool = False,
    ) -> Repaired:
        """Step 3: put ``replica`` on the trajectory without the liars' lies; return the current round's gradients.

        ``stand_in``: a liar's dropped contributions are replaced by the honest gradient the auditor recomputes (the
        auditor trains the excluded shard in its place), so the result is the trajectory of an all-honest run."""
        start = min(self.window.get(rank, current.version) for rank in liars)
        replay = [rnd for rnd in self.rounds if rnd.version >= start]
        drop: set[int] = set()  # a liar's claims before its first lie are kept, as a rate-1 audit would have
        counts = {"recomputed": 0, "audited": 0}
        if replay:
            _restore(replica, replay[0].params, replay[0].momentum)
        for rnd in replay:
            contributions = self._contributions(rnd, replica.flat_params(), drop, judge, recompute, counts, stand_in)
            rnd.params, rnd.momentum = replica.flat_params(), replica.flat_momentum()
            rnd.members = {r: (rnd.members[r][0], g) for r, g in contributions.items()}
            rnd.verified = set(contributions)
            if contributions:
                replica.set_flat_grad(aggregate([contributions[r] for r in sorted(contributions)]))
                replica.step()
        drop |= liars  # caught now: none of its claims counts from here, whatever the replay found
        contributions = self._contributions(current, replica.flat_params(), drop, judge, recompute, counts, stand_in)
        self._prune(current.version)  # everything since `start` is now audited or the auditor's own computation
        log.warning("audit repair: %d rounds replayed from version %d without %s", len(replay), start, sorted(drop))
        return Repaired(contributions, frozenset(drop), len(replay), counts["recomputed"], counts["audited"])

    @staticmethod
    def _contributions(
        rnd: Round,
        params: torch.Tensor,
        drop: set[int],
        judge: Judge,
        recompute: Recompute,
        counts: dict[str, int],
        stand_in: bool = False,
    ) -> dict[int, torch.Tensor]:
        same = torch.equal(params, rnd.params)  # still on the logged trajectory: logged gradients are exact
        out = {}
        for rank in sorted(rnd.members):
            step, claim = rnd.members[rank]
            if rank not in drop and rank not in rnd.verified:
                counts["audited"] += 1
                if not judge(rank, step, rnd.version, rnd.params, claim):  # at the parameters it was computed on
                    drop.add(rank)
            if rank in drop:
                if stand_in:  # the auditor's own computation of the liar's shard, never its claim
                    out[rank] = recompute(rank, step, params)
                    counts["recomputed"] += 1
                continue
            if same:
                out[rank] = claim
            else:
                out[rank] = recompute(rank, step, params)
                counts["recomputed"] += 1
        return out

    def _prune(self, now: int) -> None:
        """Drop rounds past the reach (step 2); windows start at the oldest unverified contribution left."""
        self.rounds = [r for r in self.rounds if now - r.version < self.max_rounds]
        self.window = {}
        for rnd in self.rounds:
            for rank in rnd.members:
                if rank not in rnd.verified:
                    self.window.setdefault(rank, rnd.version)
        oldest = min(self.window.values(), default=None)
        self.rounds = [] if oldest is None else [r for r in self.rounds if r.version >= oldest]


def _restore(replica: Replica, params: torch.Tensor, momentum: torch.Tensor | None) -> None:
    replica.set_flat_params(params)
    if momentum is None:  # before the first step SGD has no buffer: the next step starts one from the gradient
        replica.optimizer.state.clear()
    else:
        replica.set_flat_momentum(momentum)
