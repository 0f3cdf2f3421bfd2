"""The ps sync server's rounds in one process, for experiments with hundreds of cells on a 2-core machine.

Everything a real ``ps --schedule sync`` job computes, in the same order and the same float32 arithmetic, without
the processes: every live worker computes its gradient at the current model on its ``BatchPlan`` batch (malicious
ones through the very wrappers ``--malicious`` installs); the round goes through the same ``ServerAudit`` (claims,
sampled replays, exclusion, exact rollback) and the same ``--aggregate`` gate, or the server's plain mean; the server's
optimizer steps on the result. tests/test_robust_ps.py checks real multi-process jobs end on this engine's final model.

>>> from trustgrad.config import PatternConfig, RunConfig
>>> cfg = RunConfig(pattern=PatternConfig(name="ps"), workers=4, epochs=1, batch_size=32, aggregate="median")
>>> r = SyncRounds(cfg).run()
>>> r["steps"], r["test_accuracy"] > 0.3
(11, True)
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ...attacks.colluding import Trigger, backdoor_success
from ...attacks.poisoning import wrap_replica
from ...config import RunConfig
from ...data import BatchPlan, load_dataset
from ...models import build_model
from ...protect import Batch, Claim
from ...replica import Replica, make_optimizer
from ...train import evaluate

__all__ = ["SyncRounds"]


@dataclass
class _Worker:
    """What ``ServerAudit`` reads and writes of a worker (the server's ``_Worker``)."""

    rank: int
    dropped: str | None = None
    done: bool = False
    read_version: int = 0
    waiting: bool = False


class SyncRounds:
    """One run: ``run()`` returns accuracy, the final model, what the defence decided and what it cost.

    ``absent``: ranks (1-based, as ``--malicious rank=``) that never push. Their shards stay cut as in the n-worker
    plan and the others keep theirs, so this is the run an exclusion at step 0 ends on when the excluded workers and
    their data had never been there (docs/robustness.md, the honest-only anchor).
    """

    def __init__(self, cfg: RunConfig, absent: Iterable[int] = ()):
        self.cfg, self.n = cfg, cfg.workers
        self.ds = load_dataset(cfg.dataset, cfg.data_dir)
        self.model = build_model(cfg.model.name, self.ds.input_shape, self.ds.num_classes, cfg.seed, cfg.model)
        self.replica = Replica(self.model, make_optimizer(self.model, cfg.lr, cfg.momentum, cfg.weight_decay))
        self.lr, self.velocity, self.version = cfg.lr, None, 0
        self.workers = {r: _Worker(r) for r in range(1, self.n + 1)}
        for r in absent:
            self.workers[r].dropped = "absent"  # never pushes; not an exclusion, so not in ``excluded_at``
        self.plan = BatchPlan.for_run(cfg, self.ds, self.n)
        x, y = self.ds.x_train, self.ds.y_train
        # every worker computes at the server's parameters (sync): one model serves them all, one after the other
        self.pushers = [
            wrap_replica(Replica(self.model, make_optimizer(self.model, cfg.lr)), cfg.malicious, w + 1, x, y,
                         cfg.seed, cfg)
            for w in range(self.n)
        ]  # fmt: skip
        self.gate = None
        if cfg.aggregate != "mean":
            from ...protect.catalog import check_rule
            from ...robust import Gate

            check_rule(cfg)  # the same one-line refusal as a real job (a rule too big for n)
            self.gate = Gate.from_spec(cfg.aggregate)
        self.audit = None
        if cfg.proof.mode == "audit":
            from ...protect.gates.audit import ServerAudit

            self.audit = ServerAudit(cfg, self.ds, self.n, self.replica.num_params, asynchronous=False)
        self.excluded_at: dict[int, int] = {}
        self.defence_seconds = 0.0
        self._step = 0

    def exclude(self, w: _Worker, reason: str) -> None:  # a rejected claim's sender, as the ps server excludes it
        w.dropped = reason
        self.excluded_at[w.rank - 1] = self._step

    def run(self) -> dict[str, Any]:
        total = self.plan.total_steps(self.cfg.epochs, self.cfg.max_steps)
        started = time.perf_counter()
        for step in range(total):
            self._step = step
            self._round(step)
        seconds = time.perf_counter() - started
        loss, acc = evaluate(self.model, self.ds.x_test, self.ds.y_test)
        backdoor = backdoor_success(self.model, self.ds.x_test, self.ds.y_test, Trigger())
        return {
            "steps": total,
            "test_accuracy": acc,
            "class_accuracy": _class_accuracy(self.model, self.ds.x_test, self.ds.y_test, self.ds.num_classes),
            "test_loss": loss,
            "backdoor_success": backdoor,  # triggered test images (true class != target) labelled as the target
            "seconds": seconds,
            "defence_seconds_per_step": self.defence_seconds / max(1, total),
            "excluded_at": dict(self.excluded_at),
            "gate": self.gate.summary() if self.gate is not None else {},
            "audit": self.audit.summary() if self.audit is not None else {},
        }

    def _round(self, step: int) -> None:
        buffer: dict[int, torch.Tensor] = {}
        for r, w in self.workers.items():
            if w.dropped:
                continue
            idx = torch.from_numpy(self.plan.at(r - 1, step))
            self.pushers[r - 1].compute_gradients(self.ds.x_train[idx], self.ds.y_train[idx])
            buffer[r] = self.pushers[r - 1].flat_grad().detach().to(torch.float32).clone()
            if self.audit is not None:
                self.audit.observe(Claim(r, step, self.version, buffer[r].numpy().tobytes(), buffer[r]))
        started = time.perf_counter()
        if self.audit is not None:
            buffer = self._screen(buffer, step)
        if buffer:
            grads = [buffer[r] for r in sorted(buffer)]
            update = self.aggregate(grads, [r - 1 for r in sorted(buffer)])
            self.defence_seconds += time.perf_counter() - started
            self.replica.set_flat_grad(update)
            self.replica.step()
            self.version += 1
        else:
            self.defence_seconds += time.perf_counter() - started

    def _screen(self, buffer: dict[int, torch.Tensor], step: int) -> dict[int, torch.Tensor]:
        """The audit gate's verdict on the round, applied as the ps server applies it (``Server._apply``)."""
        standing = frozenset(r for r, w in self.workers.items() if not w.dropped)
        batch = Batch(self.version, buffer, dict.fromkeys(buffer, step), standing, self.replica, self.aggregate)
        verdict = self.audit.screen(batch)  # type: ignore[union-attr]
        for correction in verdict.corrections:
            correction.restore(self.replica)
        for rank, reason in verdict.excluded.items():
            self.exclude(self.workers[rank], reason)
        self.audit.applied(batch.with_values(verdict.admitted))  # type: ignore[union-attr]
        return verdict.admitted

    def aggregate(self, grads: list[torch.Tensor], senders: list[int] | None = None) -> torch.Tensor:
        if self.gate is not None:
            return self.gate(grads, senders).update
        total = grads[0].clone()  # the server's mean: summed in worker order, float32
        for g in grads[1:]:
            total.add_(g)
        return total.div_(len(grads))


def _class_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, classes: int) -> list[float | None]:
    """Test accuracy per class (None for a class absent from the test set): where an excluded worker's data shows."""
    model.eval()
    with torch.no_grad():
        hit = model(x).argmax(1) == y
    return [float(hit[y == c].float().mean()) if bool((y == c).any()) else None for c in range(classes)]
