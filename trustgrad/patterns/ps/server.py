"""The server rank of ``ps``: holds the model, applies pushed gradients under a schedule, answers with the model.

Scheduler loop (one thread; messages come from the ``Inbox``'s per-worker threads in arrival order):

1. Send every worker the model (version, and its clock: non-zero after ``--resume``).
2. On a gradient from worker w at clock c computed on version v: record its staleness, advance w's clock to c+1, then
   ``sync``: keep it until every live worker has pushed for this clock, apply their mean as one update;
   ``async``/``ssp``: apply it at once.
3. Answer every waiting worker whose next clock is within the schedule's bound of the slowest live worker's clock
   (SSP, Ho et al. 2013), with the current model.
4. A worker that sends nothing for ``--worker-timeout`` seconds while it owes a gradient, or cannot be reached, is
   dropped (async, ssp: it stops counting for SSP's slowest clock) or fails the run, named (sync). A dropped worker
   that speaks again (its link came back) is told ``DROPPED`` and answers with its last message, ``ACK``. A worker
   whose message breaks its bounded link's framing (``transport``: oversized, half-sent, garbage) is excluded under
   every schedule, as a refused push is, and the round goes on without it.
5. When every live worker is done: goodbye (BYE -> ACK), final evaluation, records.

Staleness of a gradient is counted in clocks, as in SSP: ``c - m`` where m is the slowest live worker's clock when w
read the model it computed on (0 under sync; <= S under ssp; unbounded under async). ``update_lag`` counts the model
updates applied between that read and this gradient's arrival (Hogwild-style staleness).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...data import BatchPlan, load_dataset
from ...errors import LaunchError
from ...launch import engine_message
from ...models import build_model, recalibrate_batch_stats
from ...protect import Batch, Claim, Correction, Received, Verdict
from ...replica import Replica, optimizer_for
from .checkpoint import ServerCheckpoint
from .protocol import ACK, BYE, CLOSE, DONE, DROPPED, GRADIENT, LOST, OK, REFUSED, REPLY, Inbox, Message

if TYPE_CHECKING:
    from . import ParameterServer

__all__ = ["Server"]

log = logging.getLogger(__name__)


@dataclass
class _Worker:
    rank: int
    clock: int = 0  # gradients pushed
    read_version: int = 0  # version of the model it holds
    read_floor: float = 0.0  # slowest live clock when it got that model
    waiting: bool = True  # owes nothing: waits for our answer
    deadline: float = math.inf
    done: bool = False
    dropped: str | None = None
    acked: bool = False  # sent its last message (ACK): its receive thread has ended


class Server:
    def __init__(self, pattern: ParameterServer):
        cfg = self.cfg = pattern.cfg
        self.pattern, self.comm, self.schedule = pattern, pattern.comm, pattern.schedule
        self.n = cfg.workers
        self.ds = load_dataset(cfg.dataset, cfg.data_dir)
        model = build_model(cfg.model.name, self.ds.input_shape, self.ds.num_classes, cfg.seed, cfg.model)
        lr = cfg.lr * self.schedule.lr_scale(self.n)
        self.replica = Replica(model, optimizer_for(model, cfg, lr))
        self.lr = lr
        # asynchronous schedules keep one momentum buffer per worker (DANA, see the module docstring)
        self.theta = self.replica.flat_params()
        self.velocity = None if self.schedule.aggregate else torch.zeros(self.n, self.replica.num_params)
        self.workers = {r: _Worker(r) for r in range(1, self.n + 1)}
        self.version = 0
        self.buffer: dict[int, torch.Tensor] = {}
        self.staleness: list[int] = []
        self.lags: list[int] = []
        self.trace: list[tuple[float, int, float]] = []  # (seconds, gradients applied, training loss)
        self.metrics: list[dict[str, Any]] = []
        self.losses: list[float] = []
        self.steps_per_epoch = BatchPlan(len(self.ds.x_train), self.n, cfg.seed, cfg.batch_size).steps_per_epoch
        self.resumed_at = 0
        if cfg.resume:
            self._restore(pattern.load_checkpoint(cfg.resume, self.replica.num_params))
        self.epochs_logged = self._floor(include_done=True) // max(1, self.steps_per_epoch)
        self.in_flight: dict[int, list[tuple[Any, torch.Tensor]]] = {}  # rank -> the last reply's sends and tensors
        self.buffer_steps: dict[int, int] = {}
        # the slots (docs/architecture.md §3): encrypted codecs never let a plaintext update reach this process
        protections = pattern.protections
        # what they receive from workers comes over the bounded links too (``transport``)
        bounded = pattern.wire.wrap(self.comm)
        self.codec = protections.server_codec(bounded, self.replica.flat_params())
        self.encrypted = self.codec.encrypted
        n_params, asynchronous = self.replica.num_params, self.velocity is not None
        self.gates = protections.server_gates(bounded, self.ds, n_params, asynchronous, self.codec)
        if cfg.record_server_view:  # an observer of what this server receives, as hooks attach the workers' own
            from ...attacks.recorder import ReceivedViewRecorder

            pattern.taps.append(ReceivedViewRecorder(cfg, self.ds, self.steps_per_epoch))

    # ------------------------------------------------------------------ the loop
    def serve(self) -> dict[str, Any]:
        from ...train import evaluate, model_report

        self.started = time.perf_counter()
        if not self.encrypted:
            self.trace.append((0.0, self._applied(), self._train_loss()))
        # ciphertexts: ~0.4 MB per 4096 slots, generously bounded by the codec
        limit = 64 * 4 * self.replica.num_params + 4096 + self.codec.max_payload(self.replica.num_params)
        self.inbox = Inbox(self.pattern.links, max_payload=limit)
        for rank, reason in self.codec.refused_at_setup().items():  # a crafted copy of the joint key
            self.exclude(self.workers[rank], reason)
            self.codec.refused(rank, reason)
        self._release()
        while any(not w.done and not w.dropped for w in self.workers.values()):
            msg = self.inbox.get(timeout=self._next_deadline() - time.perf_counter())
            if msg is None:
                self._expire()
            else:
                self._handle(msg)
            self._release()
        if self.losses and not self.encrypted:
            self._log_epoch()
        for gate in self.gates:
            gate.close()
        self._goodbye()
        self._close_dropped()
        self.pattern.wire.close()  # every link still open: their reading threads end
        if self.encrypted:  # nothing to evaluate here: worker 0 coordinates
            stats = {**self.codec.cost(), "server_key_material": self.codec.key_material()}
            return {"steps": max(w.clock for w in self.workers.values()), "stats": stats}
        x, y, xt, yt = self.ds.x_train, self.ds.y_train, self.ds.x_test, self.ds.y_test
        if self.velocity is not None:
            # DANA: every worker still owes the momentum step of its buffer; the final model takes them (the look-ahead
            # point the last gradients were computed at). Measured over 4 async runs: never worse, up to +0.8 points.
            self.replica.set_flat_params(self._outgoing())
        self.trace.append((time.perf_counter() - self.started, self._applied(), evaluate(self._evaluable(), x, y)[0]))
        return {
            **model_report(self._evaluable(), x, y, xt, yt),
            "metrics": self.metrics,
            "steps": max(w.clock for w in self.workers.values()),
            "train_seconds": time.perf_counter() - self.started,
            "last_batch_loss": self.losses[-1] if self.losses else float("nan"),
            "trace": self.trace,
        }

    def stats(self) -> dict[str, Any]:
        dropped = sorted(r - 1 for r, w in self.workers.items() if w.dropped)
        return {
            "staleness_bound": self.schedule.bound if math.isfinite(self.schedule.bound) else None,
            "max_staleness": max(self.staleness, default=0),
            "mean_staleness": float(np.mean(self.staleness)) if self.staleness else 0.0,
            "max_update_lag": max(self.lags, default=0),
            "mean_update_lag": float(np.mean(self.lags)) if self.lags else 0.0,
            "model_versions": self.version,
            "gradients_applied": len(self.staleness),
            "resumed_at_version": self.resumed_at,
            "dropped_workers": dropped,
            "dropped_reasons": {str(r - 1): w.dropped for r, w in self.workers.items() if w.dropped},
            **{k: v for gate in self.gates for k, v in gate.summary().items()},
            **self.codec.decisions(),
        }

    # ------------------------------------------------------------------ messages
    def _handle(self, msg: Message) -> None:
        w = self.workers.get(msg.src)
        if w is None:
            raise LaunchError(f"ps: message from rank {msg.src}, which is not a worker")
        if msg.kind == ACK:  # its last message (after DROPPED): its receive thread has ended
            w.acked = True
            return
        if msg.kind == REFUSED:  # a message that broke the link's framing: its sender is excluded, every schedule
            w.acked = True  # its receive thread has ended, and its link is closed: no goodbye will come
            if not w.dropped:
                self._refuse(w, msg.reason)
            return
        if msg.kind == LOST:
            if not w.dropped and not w.acked:
                self._lost(w, f"unreachable ({msg.reason})")
            return
        if w.dropped and msg.kind in (GRADIENT, DONE):  # one we gave up on speaks again: tell it, ignore what it sent
            self._send(w, DROPPED)
            return
        if msg.kind == GRADIENT:
            if w.waiting or msg.step != w.clock or msg.version != w.read_version:
                self._violation(w, f"pushed step {msg.step} on version {msg.version}, expected step {w.clock} on "
                                f"version {w.read_version}")  # fmt: skip
                return
            try:
                grad = self.codec.decode(msg.payload, w.rank, self.replica.num_params)
            except LaunchError as exc:  # a refused push: excluded where the codec can go on without the worker
                if not self.codec.excludes_refused or getattr(exc, "rank", None) != w.rank:
                    self._violation(w, str(exc))
                    return
                self._refuse(w, str(exc))
                return
            if msg.version == self.version:  # observers see pushes computed on the model held here
                self.pattern.tap(
                    "received", Received(w.rank - 1, msg.step, msg.payload, grad, self.encrypted, self.replica)
                )
            claim = Claim(w.rank, msg.step, msg.version, msg.payload, grad)
            for gate in self.gates:
                gate.observe(claim)
            self.staleness.append(int(msg.step - w.read_floor))
            self.lags.append(self.version - msg.version)
            self.losses.append(msg.loss)
            w.clock, w.waiting, w.deadline = w.clock + 1, True, math.inf
            if self.schedule.aggregate:
                self.buffer[w.rank], self.buffer_steps[w.rank] = grad, msg.step
                self._complete_round()
            elif self._admit(claim):
                self._update(grad, 1, w.rank)
        elif msg.kind == DONE:
            w.done, w.waiting, w.deadline = True, False, math.inf
            self._complete_round()

    def _refuse(self, w: _Worker, reason: str) -> None:
        """A worker's push failed validation (docs/wire.md): name it, exclude it, and finish the round without it."""
        self.exclude(w, reason)
        self.codec.refused(w.rank, reason)
        self._complete_round()

    def _complete_round(self) -> None:
        live = {r for r, w in self.workers.items() if not w.done and not w.dropped}
        if self.codec.rekey_pending and live and live <= set(self.buffer):
            # threshold keys: the excluded worker shares the key of this round; the survivors re-key and push again
            self.buffer = self.codec.rekey(sorted(live), self.replica.num_params)
        if self.buffer and live <= set(self.buffer):
            buffer, self.buffer = self.buffer, {}
            buffer = self._screen(buffer)  # claims the gates refuse never reach the model
            if buffer:
                grads = [buffer[r] for r in sorted(buffer)]
                self._update(self._combine(grads, [r - 1 for r in sorted(buffer)]), len(grads))
                self._settle()

    def _batch(self, values: dict[int, Any]) -> Batch:
        standing = frozenset(r for r, w in self.workers.items() if not w.dropped)
        return Batch(self.version, values, dict(self.buffer_steps), standing, self.replica, self._combine)

    def _screen(self, buffer: dict[int, Any]) -> dict[int, Any]:
        """A complete round through every gate in turn; each verdict is applied before the next gate sees it."""
        for gate in self.gates:
            buffer = self._apply(gate.screen(self._batch(buffer)), gate)
        for gate in self.gates:
            gate.applied(self._batch(buffer))
        if self.gates and not buffer and self.encrypted:  # nothing admitted: no update, nothing to re-send
            self.codec.latest = b""
            for gate in self.gates:
                gate.published(b"")  # the auditor's model stays where it is
        return buffer

    def _admit(self, claim: Claim) -> bool:
        """Asynchronous schedules: one claim through every gate."""
        return all(self._apply(gate.screen_one(claim), gate) for gate in self.gates)

    def _apply(self, verdict: Verdict, gate: Any) -> dict[int, Any]:
        """A gate's verdict: its corrections to our state first, then its exclusions; returns what it admitted."""
        for correction in verdict.corrections:
            self._correct(correction)
        for rank, reason in verdict.excluded.items():
            self.exclude(self.workers[rank], reason)
        if verdict.excluded:
            gate.after_exclusion([r for r, w in sorted(self.workers.items()) if not w.dropped and not w.done])
        return verdict.admitted

    def _correct(self, c: Correction) -> None:
        c.restore(self.replica)  # an exact repair: the model and momentum where the replay ended
        if c.rollback_rank is not None:  # DANA: a worker's accumulated effect back, and its buffer cleared
            if c.delta is not None:
                self.theta.add_(c.delta)
                self.replica.set_flat_params(self.theta)
            self.velocity[c.rollback_rank - 1].zero_()  # type: ignore[index]

    def _combine(self, values: list[Any], senders: list[int] | None = None) -> Any:
        """A round's update: a gate's own rule (robust aggregation) where one has it, else the codec's mean."""
        for gate in self.gates:
            combined = gate.combine(values, senders)
            if combined is not None:
                return combined
        return self.codec.combine(values)

    def _settle(self) -> None:
        """Reveal: the round is decrypted jointly before it is answered (threshold keys). A worker whose partial
        decryption fails the server's check is excluded, and the survivors re-key and push the round again (they
        have not stepped yet), until a round decrypts (``SecureServer.settle``, docs/wire.md)."""
        while True:
            live = sorted(r for r, w in self.workers.items() if not w.done and not w.dropped)
            culprits = self.codec.settle(live)
            if not culprits:
                return
            for rank, reason in culprits.items():
                self.exclude(self.workers[rank], reason)
                self.codec.refused(rank, reason)
            survivors = [r for r in live if r not in culprits]
            again = self.codec.rekey(survivors, self.replica.num_params)
            self.codec.publish(self._combine([again[r] for r in survivors]))

    def _update(self, grad: torch.Tensor, gradients: int, rank: int = 0) -> None:
        before = self._applied() - gradients
        if self.encrypted:  # the encrypted mean goes back to the workers as it is
            self.codec.publish(grad)
            for gate in self.gates:
                gate.published(self.codec.latest)
            self.version += 1
            return
        if self.velocity is None:  # sync: the optimizer's step on the mean, exactly as allreduce takes it
            self.replica.set_flat_grad(grad)
            self.replica.step()
        else:  # DANA-Zero: the sender's own momentum, then its step of lr / W
            if self.cfg.weight_decay:
                grad = grad + self.cfg.weight_decay * self.theta
            v = self.velocity[rank - 1]
            v.mul_(self.cfg.momentum).add_(grad)
            self.theta.sub_(self.lr * v)
            for gate in self.gates:
                gate.stepped(rank, self.lr * v)
            self.replica.set_flat_params(self.theta)
        self.version += 1
        if self._applied() // self.n > before // self.n:  # about once per W gradients, for every schedule alike
            loss = self._train_loss()
            self.trace.append((time.perf_counter() - self.started, self._applied(), loss))
        if self.steps_per_epoch and self._floor(include_done=True) // self.steps_per_epoch > self.epochs_logged:
            self._log_epoch()
        every = self.cfg.pattern.checkpoint_every
        if every and self.version % every == 0:
            self._checkpoint().save(self.cfg.out)  # type: ignore[arg-type]

    def _release(self) -> None:
        """Answer every waiting worker that SSP's rule lets go on; repeat if a drop raised the slowest clock."""
        again = True
        while again:
            again = False
            for w in self.workers.values():
                ready = w.waiting and not w.dropped and self.schedule.may_proceed(w.clock, self._floor())
                if ready and not self._send(w, OK):
                    again = True

    def _send(self, w: _Worker, status: int) -> bool:
        parts = [torch.tensor([status, self.version, w.clock], dtype=torch.int64)]
        if status == OK and self.encrypted:  # Comm.send_bytes' framing: a length, then the bytes
            latest = self.codec.latest
            parts.append(torch.tensor([len(latest)], dtype=torch.int64))
            parts += [torch.frombuffer(bytearray(latest), dtype=torch.uint8)] if latest else []
        elif status == OK:
            outgoing = self._outgoing()
            if self.velocity is not None:  # async: gates may replay a claim at the parameters it was computed on
                held = {v.read_version for v in self.workers.values() if not v.dropped and not v.done}
                for gate in self.gates:
                    gate.sent(self.version, outgoing, held)
            parts.append(outgoing)
        try:
            if self.schedule.tolerates_loss:
                self._post(w.rank, parts)
            else:  # sync waits for every worker anyway: a plain send, as the blind server's own requests are
                for part in parts:
                    self.pattern.links[w.rank].send(part, w.rank, REPLY)
        except RuntimeError as exc:  # gloo: connection closed by a dead peer
            self._lost(w, f"unreachable ({engine_message(exc)})")
            return False
        if status == OK:
            w.waiting, w.read_version, w.read_floor = False, self.version, self._floor()
            w.deadline = time.perf_counter() + self.cfg.pattern.worker_timeout
        return True

    def _post(self, rank: int, parts: list[torch.Tensor]) -> None:
        """Send a reply without waiting for the wire (async, ssp). Measured across two hosts: with a worker's link
        down, a blocking send of the model (36 KB) waited for the link as long as the cut lasted, and with it the
        scheduler thread, every other worker's reply and every deadline. The previous reply to this worker has long
        been delivered by the time we answer it again (it has pushed since), so waiting for it here costs nothing and
        bounds what is in flight to one reply per worker; a reply to a cut-off worker just stays in flight, its
        tensors kept alive."""
        link = self.pattern.links[rank]
        for work, _ in self.in_flight.pop(rank, []):
            link.wait(work)
        self.in_flight[rank] = [(link.isend(t, rank, REPLY), t) for t in parts]

    def _expire(self) -> None:
        now = time.perf_counter()
        for w in self.workers.values():
            if not w.dropped and now >= w.deadline:
                self._lost(w, f"sent no gradient for {self.cfg.pattern.worker_timeout:g} s")

    def exclude(self, w: _Worker, reason: str) -> None:
        """Stop accepting a worker (the audit rejected it); the run goes on without it under every schedule."""
        log.warning("ps: excluding worker %d (rank %d): %s", w.rank - 1, w.rank, reason)
        self._send(w, DROPPED)
        w.dropped, w.waiting, w.deadline = reason, False, math.inf

    def _violation(self, w: _Worker, reason: str) -> None:
        """A push that breaks the protocol: asynchronous schedules exclude its sender, sync fails the run, named."""
        if not self.schedule.tolerates_loss:
            raise LaunchError(f"ps {self.schedule.name}: worker {w.rank - 1} (rank {w.rank}) {reason}", rank=w.rank)
        self.exclude(w, reason)

    def _lost(self, w: _Worker, reason: str) -> None:
        if not self.schedule.tolerates_loss:
            raise LaunchError(
                f"ps {self.schedule.name}: worker {w.rank - 1} (rank {w.rank}) {reason}; a synchronous server cannot "
                "go on without it (--schedule async or ssp drop lost workers)",
                rank=w.rank,
            )
        log.warning("ps: dropping worker %d (rank %d): %s", w.rank - 1, w.rank, reason)
        w.dropped, w.waiting, w.deadline = reason, False, math.inf

    def _goodbye(self) -> None:
        """BYE to every finished worker, then wait (``--worker-timeout``) for their ACKs, answering stragglers we
        dropped; the receive threads of dropped workers that never speak again are left to the process's end."""
        finished = {w.rank for w in self.workers.values() if w.done and not w.dropped}
        for rank in sorted(finished):
            self._send(self.workers[rank], BYE)
        deadline = time.perf_counter() + self.cfg.pattern.worker_timeout
        while any(not self.workers[r].acked for r in finished) and time.perf_counter() < deadline:
            msg = self.inbox.get(timeout=deadline - time.perf_counter())
            if msg is not None and msg.kind == ACK:
                self.workers[msg.src].acked = True
            elif msg is not None and msg.kind in (GRADIENT, DONE) and self.workers[msg.src].dropped:
                self._send(self.workers[msg.src], DROPPED)
            elif msg is not None and msg.kind in (LOST, REFUSED) and msg.src in finished:
                log.warning("ps: worker %d finished but missed the goodbye: %s", msg.src - 1, msg.reason)
                finished.discard(msg.src)
        missing = [r - 1 for r in finished if not self.workers[r].acked]
        if missing:
            log.warning("ps: workers %s did not answer the goodbye", missing)

    def _close_dropped(self) -> None:
        """Close the channel of every dropped worker that did not say goodbye (async, ssp: a group of its own each).

        Its receive thread still waits, and the worker may speak again when its link returns: measured across two
        hosts, a message landing after the process group was destroyed aborted the server at exit ("terminate called
        without an active exception") after the records were written. A gloo wait that times out closes its group's
        connections and fails that group's pending operations, so a deliberately tiny wait on a worker's own group
        ends its receive thread (``LOST``) and its in-flight reply, and the worker, when it is back, finds the
        connection closed and goes on alone.
        """
        closing = [w.rank for w in self.workers.values() if w.dropped and not w.acked]
        for rank in closing:  # its bounded link: shut, so a late message finds it closed
            self.pattern.wire.close(rank)
        if not self.schedule.tolerates_loss:
            return
        for rank in closing:
            link = self.pattern.links[rank]
            with contextlib.suppress(RuntimeError):  # the timeout is the point
                link.wait(link.irecv(torch.zeros(1), rank, CLOSE), timeout=0.001)
        for rank in closing:
            self.inbox.threads[rank].join(timeout=2.0)

    def _outgoing(self) -> torch.Tensor:
        """The parameters a worker computes its next gradient on: the model (sync), or DANA's look-ahead
        ``theta - lr * mu * sum_j v_j``: where the model will be once every in-flight worker has taken its momentum
        step, so the gradient is computed near where it will be applied."""
        if self.velocity is None:
            return self.replica.flat_params()
        return self.theta - (self.lr * self.cfg.momentum) * self.velocity.sum(0)

    # ------------------------------------------------------------------ bookkeeping
    def _floor(self, include_done: bool = False) -> float:
        """The slowest live worker's clock (done workers no longer hold anyone back unless asked)."""
        clocks = [w.clock for w in self.workers.values() if not w.dropped and (include_done or not w.done)]
        return min(clocks) if clocks else math.inf

    def _applied(self) -> int:
        return len(self.staleness) - len(self.buffer)

    def _next_deadline(self) -> float:
        deadlines = [w.deadline for w in self.workers.values() if not w.dropped]
        return min(min(deadlines, default=math.inf), time.perf_counter() + self.cfg.timeout)

    def _train_loss(self) -> float:
        from ...train import evaluate

        return evaluate(self._evaluable(), self.ds.x_train, self.ds.y_train)[0]

    def _evaluable(self) -> Any:
        """The server's model, ready to evaluate. Workers keep their BatchNorm statistics (only batch statistics
        enter a gradient in training mode); the server's model never runs in training mode, so its running statistics
        are recomputed before each evaluation over the first 8 batches of the training set (docs/models.md)."""
        model = self.replica.model
        if self.replica.buffers:
            size = self.cfg.batch_size
            x = self.ds.x_train[: 8 * size]
            recalibrate_batch_stats(model, [x[i : i + size] for i in range(0, len(x), size)])
        return model

    def _log_epoch(self) -> None:
        from ...train import evaluate

        test_loss, test_acc = evaluate(self._evaluable(), self.ds.x_test, self.ds.y_test)
        floor = self._floor(include_done=True)
        self.metrics.append(
            {
                "epoch": self.epochs_logged,
                "steps": int(floor) if math.isfinite(floor) else max(w.clock for w in self.workers.values()),
                "loss": float(np.mean(self.losses)) if self.losses else float("nan"),
                "test_loss": test_loss,
                "test_accuracy": test_acc,
                "elapsed": time.perf_counter() - self.started,
                "bytes_sent": self.comm.bytes_sent,
                "model_versions": self.version,
            }
        )
        log.info("ps epoch %d: loss %.4f, test accuracy %.4f", self.epochs_logged, self.metrics[-1]["loss"], test_acc)
        self.epochs_logged += 1
        self.losses = []

    def _checkpoint(self) -> ServerCheckpoint:
        momentum = self.velocity.clone() if self.velocity is not None else self.replica.flat_momentum()
        clocks = [w.clock for _, w in sorted(self.workers.items())]
        return ServerCheckpoint(self.replica.flat_params(), momentum, clocks, self.version, self.pattern.run_identity())

    def _restore(self, ckpt: ServerCheckpoint) -> None:
        self.replica.set_flat_params(ckpt.params)
        self.theta = self.replica.flat_params()
        if ckpt.momentum is not None and self.velocity is not None:
            if ckpt.momentum.shape == self.velocity.shape:  # else a sync checkpoint: start buffers at zero
                self.velocity.copy_(ckpt.momentum)
        elif ckpt.momentum is not None and ckpt.momentum.dim() == 1:
            self.replica.set_flat_momentum(ckpt.momentum)
        for r, clock in enumerate(ckpt.clocks, start=1):
            self.workers[r].clock = clock
        self.version = self.resumed_at = ckpt.version
        log.info("ps: resumed at version %d, worker clocks %s", ckpt.version, ckpt.clocks)
