"""``ps --proof audit``: every pushed gradient is a claim; sampled claims are replayed; liars are excluded.

The gate between a server's scheduler and the auditor (``trustgrad.audit``); it returns verdicts and corrections and
the server applies them (``protect.slots``):

1. Each push extends the worker's claim chain (the commitment binds the worker to exactly the bytes it sent).
2. Sync: when a round is complete, the auditor picks claims from a PRF of the round's commitments and its committed
   nonce (plus the round's largest gradient) and replays them at the current model; async/ssp: each claim is drawn
   alone and replayed at the model version it was computed on (kept until no live worker holds it).
3. A rejected claim is not applied; its worker is excluded (told ``DROPPED``). Sync: the model is repaired exactly
   (``audit.repair``): back to the start of the liar's unverified window, then the logged rounds are replayed with
   every unverified claim audited and the honest gradients recomputed at the repaired parameters, so the run goes on
   as if the liar had been caught at its first lie. Under the asynchronous schedules (DANA: a momentum buffer per
   worker) the worker's own buffer holds only its gradients: its accumulated effect on the weights is added back and
   its buffer cleared; honest gradients computed at poisoned versions stay in there (docs/audits.md measures it).

The auditor holds the training data: it is the data owners' verifier (docs/architecture.md §1), run in the server's
process here because in plaintext mode the server sees every gradient anyway.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch

from ...audit import Auditor, ClaimChain
from ...audit.repair import RepairLog, Round
from ...config import RunConfig
from ..slots import Batch, Claim, Correction, Gate, Verdict

__all__ = ["ServerAudit", "MAX_REPAIR_ROUNDS", "REPAIR_BUDGET_BYTES"]

log = logging.getLogger(__name__)

#: how far back a late catch can repair (rounds), and the memory the log may use for it (parameters, momentum and
#: every member's gradient per round): 256 rounds of a 9k-parameter MLP with 4 workers take 55 MB
MAX_REPAIR_ROUNDS = 256
REPAIR_BUDGET_BYTES = 512 << 20


class ServerAudit(Gate):
    """The auditor in the server's process (plaintext: the server sees every gradient anyway).

    ``asynchronous``: claims are judged one by one at the version they were computed on (DANA's per-worker momentum);
    else rounds are screened whole and repaired exactly."""

    def __init__(self, cfg: RunConfig, ds: Any, workers: int, num_params: int, asynchronous: bool):
        self.asynchronous = asynchronous
        self.auditor = Auditor(cfg, ds, workers)
        self.chains = {r: ClaimChain(cfg.seed, r - 1) for r in range(1, workers + 1)}
        self.pending: dict[int, bytes] = {}  # this round's commitments
        # sync: the rounds since the oldest unverified contribution, for exact repair, within a memory budget
        per_round = (2 + workers) * 4 * num_params
        self.log = RepairLog(max(1, min(MAX_REPAIR_ROUNDS, REPAIR_BUDGET_BYTES // per_round)))
        self.repairs: list[dict[str, Any]] = []
        self.effect: dict[int, torch.Tensor] = {}  # async: a worker's accumulated effect on the weights
        self.versions: dict[int, torch.Tensor] = {}
        self.verified_now: set[int] = set()  # sync: ranks whose claim of this round is verified
        self.reasons: dict[int, str] = {}
        # --excluded-shard auditor: the excluded ranks whose shard the auditor trains in their place (sync)
        self.stand_in = cfg.proof.excluded_shard == "auditor"
        self.stood_in: set[int] = set()
        self.stand_in_steps: dict[int, int] = {}
        self.stand_in_gradients = 0

    # ------------------------------------------------------------------ claims
    def observe(self, claim: Claim) -> None:
        self.pending[claim.rank] = self.chains[claim.rank].extend(claim.step, claim.version, claim.payload)

    def sent(self, version: int, params: torch.Tensor, held: set[int]) -> None:
        """Async: keep the parameters a worker was sent, to replay its claim at them later."""
        self.versions.setdefault(version, params.detach().clone())
        for v in [v for v in self.versions if v < min(held | {version})]:
            del self.versions[v]

    def screen(self, batch: Batch) -> Verdict:
        """Sync: audit the round's sampled claims at the current model; admit the gradients that stand."""
        grads, steps, version = batch.values, batch.steps, batch.version
        norms = {r: float(g.norm()) for r, g in grads.items()}
        picked = self.auditor.select({r - 1: c for r, c in self.pending.items()}, {r - 1: n for r, n in norms.items()})
        self.pending.clear()
        params = batch.replica.flat_params()
        current = Round(version, params, batch.replica.flat_momentum(), {r: (steps[r], g) for r, g in grads.items()})
        liars: set[int] = set()
        for rank in sorted(grads):
            if rank - 1 in picked:
                if self._judge(rank, steps[rank], version, params, grads[rank]):
                    current.verified.add(rank)
                else:
                    liars.add(rank)
        if liars:
            verdict = self._repair(liars, current, batch)
        else:
            self.verified_now = current.verified
            verdict = Verdict.admit_all(grads)
        # the round's step from this round's pushes: ``steps`` may still hold an excluded worker's last step
        return self._stand_in(verdict, steps[min(grads)] if grads else None, params)

    def _stand_in(self, verdict: Verdict, step: int | None, params: torch.Tensor) -> Verdict:
        """--excluded-shard auditor: each excluded worker's shard contributes the gradient the auditor computes at
        this round's model (sync: every member is at the round's step), so the round is the all-honest round."""
        if not self.stand_in or not self.stood_in or step is None:
            return verdict
        admitted = dict(verdict.admitted)
        for rank in sorted(self.stood_in - set(admitted)):
            admitted[rank] = self.auditor.replay(rank - 1, step, params)
            self.stand_in_steps[rank] = step  # the step it stands in at, for the repair log (``applied``)
            self.verified_now.add(rank)
            self.stand_in_gradients += 1
        return Verdict(dict(sorted(admitted.items())), verdict.excluded, verdict.corrections)

    def _judge(self, rank: int, step: int, version: int, params: torch.Tensor, claim: torch.Tensor) -> bool:
        check = self.auditor.check(rank - 1, step, version, params, claim)
        if not check.ok:
            self.reasons.setdefault(rank, check.reason)
        return check.ok

    def _repair(self, liars: set[int], current: Round, batch: Batch) -> Verdict:
        """Exclude the liars and put the model on the trajectory without their lies (``audit.repair`` 3).

        The replay runs on a copy of the server's model and optimizer; the verdict carries where it ended."""
        started = time.perf_counter()
        scratch = copy.deepcopy(batch.replica)
        repaired = self.log.repair(
            liars,
            current,
            scratch,
            batch.combine,  # type: ignore[arg-type]
            judge=self._judge,
            recompute=lambda r, step, p: self.auditor.replay(r - 1, step, p),
            stand_in=self.stand_in,
        )
        excluded = {}
        for rank in sorted(repaired.liars):
            if rank in batch.standing:
                self.auditor.report.excluded.append(rank - 1)
                excluded[rank] = f"audit: {self.reasons.get(rank, 'a logged claim did not reproduce')}"
                if self.stand_in:
                    self.stood_in.add(rank)
        self.auditor.report.rolled_back_steps += repaired.rounds
        self.repairs.append(
            {
                "caught_at_version": current.version,
                "workers": sorted(r - 1 for r in repaired.liars),
                "rounds_replayed": repaired.rounds,
                "gradients_recomputed": repaired.recomputed,
                "claims_audited_late": repaired.audited,
                "seconds": round(time.perf_counter() - started, 4),
            }
        )
        self.verified_now = set(repaired.contributions)
        moved = Correction(params=scratch.flat_params(), momentum=scratch.flat_momentum())
        return Verdict(repaired.contributions, excluded, (moved,) if repaired.rounds else ())

    def screen_one(self, claim: Claim) -> Verdict:
        """Async/ssp: audit one claim (if drawn) at the parameters of the version it was computed on."""
        rank = claim.rank
        if rank - 1 not in self.auditor.select({rank - 1: self.pending.pop(rank)}, {}):
            return Verdict({rank: claim.value})
        check = self.auditor.check(rank - 1, claim.step, claim.version, self.versions[claim.version], claim.value)
        if not check.ok:
            return self._exclude(rank, check.reason)
        self.effect.pop(rank, None)
        return Verdict({rank: claim.value})

    # ------------------------------------------------------------------ contributions and rollback
    def applied(self, batch: Batch) -> None:
        """Log the round about to be applied while any worker has an unverified contribution in the model."""
        steps = {**batch.steps, **self.stand_in_steps}
        members = {r: (steps[r], g) for r, g in batch.values.items()}
        momentum = batch.replica.flat_momentum()
        self.log.record(Round(batch.version, batch.replica.flat_params(), momentum, members, set(self.verified_now)))

    def stepped(self, rank: int, delta: torch.Tensor) -> None:
        self.effect[rank] = self.effect.get(rank, torch.zeros_like(delta)) + delta

    def _exclude(self, rank: int, reason: str) -> Verdict:
        """Async/ssp: exclude a worker whose claim was rejected and undo its accumulated effect (DANA: the worker's
        buffer holds only its own gradients; add their effect back and clear it)."""
        report = self.auditor.report
        report.excluded.append(rank - 1)
        effect = self.effect.pop(rank, None)
        rolled = 1 if effect is not None else 0
        report.rolled_back_steps += rolled
        log.warning("audit: worker %d excluded, %d contributions rolled back", rank - 1, rolled)
        return Verdict({}, {rank: f"audit: {reason}"}, (Correction(rollback_rank=rank, delta=effect),))

    def summary(self) -> dict[str, Any]:
        return {
            **self.auditor.report.summary(),
            **self.auditor.calibration.summary(),
            "audit_repairs": self.repairs,
            "audit_repair_reach_rounds": 0 if self.asynchronous else self.log.max_rounds,
            "audit_rate": self.auditor.rate,
            "excluded_shard": "auditor" if self.stand_in else "drop",
            "stand_in_gradients": self.stand_in_gradients,
            "audit_nonce_commitment": self.auditor.nonce_commitment,
        }
