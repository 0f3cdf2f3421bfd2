"""``ps --proof audit``: every pushed gradient is a claim; sampled claims are replayed; liars are excluded.

Server-side glue between the scheduler (``server``) and the auditor (``trustgrad.audit``):

1. Each push extends the worker's claim chain (the commitment binds the worker to exactly the bytes it sent).
2. Sync: when a round is complete, the auditor picks claims from a PRF of the round's commitments and its committed
   nonce (plus the round's largest gradient) and replays them at the current model; async/ssp: each claim is drawn
   alone and replayed at the model version it was computed on (kept until no live worker holds it).
3. A rejected claim is not applied; its worker is excluded (told ``DROPPED``) and every contribution it made since
   its last verified claim is removed from the model, exactly for SGD with momentum (``audit.rollback``). Under
   the asynchronous schedules (DANA: a momentum buffer per worker) the worker's own buffer holds only its gradients:
   its accumulated effect on the weights is added back and its buffer cleared.

The auditor holds the training data: it is the data owners' verifier (DESIGN 2), run in the server's process here
because in plaintext mode the server sees every gradient anyway.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from ...audit import Auditor, ClaimChain
from ...audit.rollback import undo_shares

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger(__name__)


class ServerAudit:
    def __init__(self, server: Server):
        self.server = server
        cfg = server.cfg
        self.auditor = Auditor(cfg, server.ds, server.n)
        self.chains = {r: ClaimChain(cfg.seed, r - 1) for r in server.workers}
        self.pending: dict[int, bytes] = {}  # this round's commitments
        self.since_verified: dict[int, list[tuple[int, torch.Tensor]]] = {r: [] for r in server.workers}
        self.effect: dict[int, torch.Tensor] = {}  # async: a worker's accumulated effect on the weights
        self.versions: dict[int, torch.Tensor] = {}
        self.verified_now: set[int] = set()  # async: parameters of versions workers still hold

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
        params = self.server.replica.flat_params()
        admitted, self.verified_now = {}, set()
        for rank, grad in grads.items():
            if rank - 1 in picked:
                check = self.auditor.check(rank - 1, steps[rank], self.server.version, params, grad)
                if not check.ok:
                    self._exclude(rank, check.reason)
                    continue
                self.since_verified[rank].clear()
                self.verified_now.add(rank)
            admitted[rank] = grad
        return admitted

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
        """Remember the unverified shares (g / n) of the round about to be applied; verified ones are never undone."""
        for rank, grad in grads.items():
            if rank not in self.verified_now:
                self.since_verified[rank].append((self.server.version, grad / len(grads)))

    def close(self) -> None:
        """The run is over (the auditor lives in this process: nothing to tell it)."""

    def applied_async(self, rank: int, delta: torch.Tensor) -> None:
        self.effect[rank] = self.effect.get(rank, torch.zeros_like(delta)) + delta

    def _exclude(self, rank: int, reason: str) -> None:
        server, report = self.server, self.auditor.report
        report.excluded.append(rank - 1)
        rolled = self._rollback(rank)
        report.rolled_back_steps += rolled
        server.exclude(server.workers[rank], f"audit: {reason}")
        log.warning("audit: worker %d excluded, %d contributions rolled back", rank - 1, rolled)

    def _rollback(self, rank: int) -> int:
        s = self.server
        if s.velocity is not None:  # async (DANA): undo the worker's accumulated effect, clear its buffer
            effect = self.effect.pop(rank, None)
            if effect is not None:
                s.theta.add_(effect)
                s.replica.set_flat_params(s.theta)
            s.velocity[rank - 1].zero_()
            return 1 if effect is not None else 0
        entries = self.since_verified.pop(rank, [])
        params, momentum = s.replica.flat_params(), s.replica.flat_momentum()
        rolled = undo_shares(params, momentum, entries, s.lr, self.server.cfg.momentum, s.version)
        s.replica.set_flat_params(params)
        if momentum is not None:
            s.replica.set_flat_momentum(momentum)
        return rolled

    def summary(self) -> dict[str, Any]:
        return {
            **self.auditor.report.summary(),
            **self.auditor.calibration.summary(),
            "audit_rate": self.auditor.rate,
            "audit_nonce_commitment": self.auditor.nonce_commitment,
        }
