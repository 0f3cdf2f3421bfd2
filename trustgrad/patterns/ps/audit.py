"""``ps --proof audit``: every pushed gradient is a claim; sampled claims are replayed; liars are excluded.

Server-side glue between the scheduler (``server``) and the auditor (``trustgrad.audit``):

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

import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from ...audit import Auditor, ClaimChain
from ...audit.repair import RepairLog, Round

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger(__name__)

#: how far back a late catch can repair (rounds), and the memory the log may use for it (parameters, momentum and
#: every member's gradient per round): 256 rounds of a 9k-parameter MLP with 4 workers take 55 MB
MAX_REPAIR_ROUNDS = 256
REPAIR_BUDGET_BYTES = 512 << 20


class ServerAudit:
    def __init__(self, server: Server):
        self.server = server
        cfg = server.cfg
        self.auditor = Auditor(cfg, server.ds, server.n)
        self.chains = {r: ClaimChain(cfg.seed, r - 1) for r in server.workers}
        self.pending: dict[int, bytes] = {}  # this round's commitments
        # sync: the rounds since the oldest unverified contribution, for exact repair, within a memory budget
        per_round = (2 + server.n) * 4 * server.replica.num_params
        self.log = RepairLog(max(1, min(MAX_REPAIR_ROUNDS, REPAIR_BUDGET_BYTES // per_round)))
        self.repairs: list[dict[str, Any]] = []
        self.effect: dict[int, torch.Tensor] = {}  # async: a worker's accumulated effect on the weights
        self.versions: dict[int, torch.Tensor] = {}
        self.verified_now: set[int] = set()  # sync: ranks whose claim of this round is verified
        self.reasons: dict[int, str] = {}
        # --excluded-shard auditor: the excluded ranks whose shard the auditor trains in their place (sync)
        self.stand_in = cfg.proof.excluded_shard == "auditor"
        self.stood_in: set[int] = set()
        self.stand_in_gradients = 0

    # ------------------------------------------------------------------ claims
    def claim(self, rank: int, step: int, version: int, payload: bytes) -> None:
        self.pending[rank] = self.chains[rank].extend(step, version, payload)

    def remember(self, version: int, params: torch.Tensor) -> None:
        """Async: keep the parameters a worker was sent, to replay its claim at them later."""
        self.versions.setdefault(version, params.detach().clone())
        held = {w.read_version for w in self.server.workers.values() if not w.dropped and not w.done}
        for v in [v for v in self.versions if v < min(held | {version})]:
            del self.versions[v]

    def screen_round(self, grads: dict[int, torch.Tensor], steps: dict[int, int]) -> dict[int, torch.Tensor]:
        """Sync: audit the round's sampled claims at the current model; return the admitted gradients."""
        norms = {r: float(g.norm()) for r, g in grads.items()}
        picked = self.auditor.select({r - 1: c for r, c in self.pending.items()}, {r - 1: n for r, n in norms.items()})
        self.pending.clear()
        s, params = self.server, self.server.replica.flat_params()
        current = Round(s.version, params, s.replica.flat_momentum(), {r: (steps[r], g) for r, g in grads.items()})
        liars: set[int] = set()
        for rank in sorted(grads):
            if rank - 1 in picked:
                if self._judge(rank, steps[rank], s.version, params, grads[rank]):
                    current.verified.add(rank)
                else:
                    liars.add(rank)
        if liars:
            admitted = self._repair(liars, current)
        else:
            self.verified_now, admitted = current.verified, grads
        return self._stand_in(admitted, steps, params)

    def _stand_in(
        self, admitted: dict[int, torch.Tensor], steps: dict[int, int], params: torch.Tensor
    ) -> dict[int, torch.Tensor]:
        """--excluded-shard auditor: each excluded worker's shard contributes the gradient the auditor computes at
        this round's model (sync: every member is at the round's step), so the round is the all-honest round."""
        if not self.stand_in or not self.stood_in or not steps:
            return admitted
        step = next(iter(steps.values()))
        for rank in sorted(self.stood_in - set(admitted)):
            admitted[rank] = self.auditor.replay(rank - 1, step, params)
            steps[rank] = step
            self.verified_now.add(rank)
            self.stand_in_gradients += 1
        return dict(sorted(admitted.items()))

    def _judge(self, rank: int, step: int, version: int, params: torch.Tensor, claim: torch.Tensor) -> bool:
        check = self.auditor.check(rank - 1, step, version, params, claim)
        if not check.ok:
            self.reasons.setdefault(rank, check.reason)
        return check.ok

    def _repair(self, liars: set[int], current: Round) -> dict[int, torch.Tensor]:
        """Exclude the liars and put the model on the trajectory without their lies (``audit.repair`` 3)."""
        s = self.server
        started = time.perf_counter()
        repaired = self.log.repair(
            liars,
            current,
            s.replica,
            s.pattern.aggregate,
            judge=self._judge,
            recompute=lambda r, step, p: self.auditor.replay(r - 1, step, p),
            stand_in=self.stand_in,
        )
        for rank in sorted(repaired.liars):
            if not s.workers[rank].dropped:
                self.auditor.report.excluded.append(rank - 1)
                s.exclude(s.workers[rank], f"audit: {self.reasons.get(rank, 'a logged claim did not reproduce')}")
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
        return repaired.contributions

    def admit(self, rank: int, step: int, version: int, grad: torch.Tensor) -> bool:
        """Async/ssp: audit one claim (if drawn) at the parameters of the version it was computed on."""
        if rank - 1 not in self.auditor.select({rank - 1: self.pending.pop(rank)}, {}):
            return True
        check = self.auditor.check(rank - 1, step, version, self.versions[version], grad)
        if not check.ok:
            self._exclude(rank, check.reason)
            return False
        self.effect.pop(rank, None)
        return True

    # ------------------------------------------------------------------ contributions and rollback
    def applied_round(self, grads: dict[int, torch.Tensor]) -> None:
        """Log the round about to be applied while any worker has an unverified contribution in the model."""
        s = self.server
        steps = s.buffer_steps
        members = {r: (steps[r], g) for r, g in grads.items()}
        momentum = s.replica.flat_momentum()
        self.log.record(Round(s.version, s.replica.flat_params(), momentum, members, set(self.verified_now)))

    def close(self) -> None:
        """The run is over (the auditor lives in this process: nothing to tell it)."""

    def applied_async(self, rank: int, delta: torch.Tensor) -> None:
        self.effect[rank] = self.effect.get(rank, torch.zeros_like(delta)) + delta

    def _exclude(self, rank: int, reason: str) -> None:
        """Async/ssp: exclude a worker whose claim was rejected and undo its accumulated effect."""
        server, report = self.server, self.auditor.report
        report.excluded.append(rank - 1)
        rolled = self._rollback(rank)
        report.rolled_back_steps += rolled
        server.exclude(server.workers[rank], f"audit: {reason}")
        log.warning("audit: worker %d excluded, %d contributions rolled back", rank - 1, rolled)

    def _rollback(self, rank: int) -> int:
        """DANA: the worker's buffer holds only its own gradients; add their effect back and clear it."""
        s = self.server
        effect = self.effect.pop(rank, None)
        if effect is not None:
            s.theta.add_(effect)
            s.replica.set_flat_params(s.theta)
        s.velocity[rank - 1].zero_()  # type: ignore[index]
        return 1 if effect is not None else 0

    def summary(self) -> dict[str, Any]:
        return {
            **self.auditor.report.summary(),
            **self.auditor.calibration.summary(),
            "audit_repairs": self.repairs,
            "audit_repair_reach_rounds": self.log.max_rounds if self.server.velocity is None else 0,
            "audit_rate": self.auditor.rate,
            "excluded_shard": "auditor" if self.stand_in else "drop",
            "stand_in_gradients": self.stand_in_gradients,
            "audit_nonce_commitment": self.auditor.nonce_commitment,
        }
