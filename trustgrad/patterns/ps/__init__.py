"""``ps``: a parameter server (rank 0) holds the model; W workers (ranks 1..W) push gradients and get the model back.

Centralized optimization with three schedules (see ``schedules``): ``sync`` (the mean of one gradient per worker per
version, equal to ``allreduce``), ``async`` (Downpour SGD: each gradient applied on arrival) and ``ssp``
(stale-synchronous parallel with bound S, Ho et al. 2013). Asynchronous schedules survive dead or silent workers;
the server checkpoints (``--checkpoint-every``) and resumes (``--resume``) with every worker's clock.

Design: point-to-point tensors through ``Comm`` rather than torch.distributed.rpc. Receive-from-any delivers pushes in
arrival order, which is exactly what async and SSP consume; every byte is counted by ``Comm``; it needs no second
rendezvous (RPC's TensorPipe agent wants its own store and port, awkward under torchrun) and no RPC thread pool
touching the model; and RPC is in maintenance mode upstream. The one gloo limitation (a timed-out receive cannot be
cancelled) is handled by the server's inbox thread (``protocol``).

Extension points (docs/architecture.md §3: protections wrap): a codec overrides ``encode`` (worker: gradient -> bytes)
and ``decode`` / ``aggregate`` (server), e.g. CKKS ciphertexts summed without a key; an audit layer overrides
``observe_push`` to see every claim (worker, step, model version, bytes) — the batch indices of that step are the loop's
``StepEvent``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ...config import RunConfig
from ...errors import ConfigError, LaunchError
from ...faults import SETUP, Faults
from ...replica import Replica
from ..base import PATTERNS, Pattern
from .checkpoint import ServerCheckpoint
from .protocol import ACK, BYE, DONE, DROPPED, GRADIENT, OK, PAYLOAD, PUSH, REPLY, SERVICE, open_links, push_header
from .schedules import SCHEDULES, Schedule, schedule_for
from .straggler import Straggler

__all__ = ["ParameterServer", "PushClaim", "SCHEDULES", "Schedule", "Straggler"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushClaim:
    """What a worker asserts with each push: its index, its step (clock), the model version it computed on."""

    worker: int
    step: int
    version: int
    nbytes: int


@PATTERNS.register("ps")
class ParameterServer(Pattern):
    name = "ps"
    encryption_keys = frozenset({"shared", "threshold"})
    proof_modes = frozenset({"audit", "blind"})

    def __init__(self, cfg: RunConfig, comm: Any):
        super().__init__(cfg, comm)
        self.schedule = schedule_for(cfg)
        spec = cfg.pattern.straggler
        self.straggler = Straggler.parse(spec, cfg.workers) if spec else None
        self.clock = self.version = 0
        self.detached = False
        self.last_claim: PushClaim | None = None
        self._server = None
        self._start = 0
        self.secure = None  # SecureWorker when --encrypt ckks (see .secure)
        self.gate = None  # the robust rule of --aggregate, at the server
        #: this rank's ps channels (server: one per worker; worker: to the server), made first on every rank because
        #: under async/ssp they are process groups of their own (``protocol.open_links``)
        self.links = open_links(comm, cfg.workers, separate=self.schedule.tolerates_loss) if comm.world_size > 1 else {}

    # ------------------------------------------------------------------ job shape
    @classmethod
    def validate(cls, cfg: RunConfig) -> None:
        p = cfg.pattern
        schedule_for(cfg)
        if p.servers != 1:
            world = cfg.workers + max(p.servers, 0)
            raise ConfigError(
                f"ps needs exactly one server rank besides the workers (got --servers {p.servers}: {world} processes "
                "in all, at least 2 needed); sharding over several servers is not supported"
            )
        if cfg.crypto.encrypt != "none" and (p.schedule != "sync" or cfg.resume or p.checkpoint_every):
            raise ConfigError(
                "ps --encrypt ckks runs --schedule sync without checkpoints: asynchronous schedules keep per-worker "
                "momentum at the server (DANA) and checkpoints hold the model, both plaintext the server must not have"
            )
        if cfg.proof.mode == "blind":
            from .blind import check_blind_config

            check_blind_config(cfg)
        if cfg.crypto.encrypt != "none":
            from ...attacks.poisoning import WIRE_ATTACKS, parse_malicious

            specs = [parse_malicious(text) for text in cfg.malicious]
            excludable = cfg.proof.mode != "none" or any(s.attack in {*WIRE_ATTACKS, "crafted-key"} for s in specs)
            if excludable and any(s.rank == 1 for s in specs):
                raise ConfigError(
                    "--malicious rank=1 with --encrypt ckks and verification or a crafted-* attack: worker 0 (rank 1) "
                    "evaluates the model for the run's records, and once excluded its copy stops; make another rank "
                    "malicious"
                )
        encrypted_audit = cfg.proof.mode == "audit" and cfg.crypto.encrypt != "none"
        if encrypted_audit and (cfg.crypto.keys != "shared" or cfg.proof.audit_rate != 1.0):
            raise ConfigError(
                "--proof audit with --encrypt ckks needs --keys shared and --audit-rate 1: the auditor rank "
                "decrypts claims with the shared key and every claim is checked before it is aggregated"
            )
        if cfg.proof.excluded_shard == "auditor" and (encrypted_audit or p.schedule != "sync"):
            raise ConfigError(
                "--excluded-shard auditor runs plaintext --schedule sync audits: the auditor computes the excluded "
                "shard's gradient at each round's model, which only a synchronous plaintext server holds"
            )
        if cfg.aggregate != "mean":
            cls._check_gate(cfg)
        if p.straggler:
            Straggler.parse(p.straggler, cfg.workers)
        if not p.worker_timeout > 0:
            raise ConfigError(f"--worker-timeout must be > 0 seconds, got {p.worker_timeout}")
        if p.checkpoint_every < 0:
            raise ConfigError(f"--checkpoint-every must be >= 0, got {p.checkpoint_every}")
        if p.checkpoint_every and not cfg.out:
            raise ConfigError("--checkpoint-every needs --out DIR (the checkpoint is written there)")
        if cfg.resume:
            from ...data import load_dataset
            from ...models import build_model

            ds = load_dataset(cfg.dataset, cfg.data_dir)
            model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, cfg.seed, cfg.model)
            cls.load_checkpoint_for(cfg, cfg.resume, sum(q.numel() for q in model.parameters()))

    @staticmethod
    def _check_gate(cfg: RunConfig) -> None:
        from ...robust import parse_aggregate

        rule = parse_aggregate(cfg.aggregate)
        if cfg.pattern.schedule != "sync":
            raise ConfigError(
                f"--aggregate {rule.name} runs under --schedule sync: a robust rule compares the updates of one round, "
                "which asynchronous schedules never hold together"
            )
        problem = rule.needs(cfg.workers)
        if problem is not None:
            raise ConfigError(f"--aggregate: {problem}, and this job has --workers {cfg.workers}")

    @classmethod
    def world_size(cls, cfg: RunConfig) -> int:
        from .cipher_audit import auditor_rank

        return cfg.workers + cfg.pattern.servers + (auditor_rank(cfg) is not None)

    @classmethod
    def may_lose(cls, cfg: RunConfig, rank: int) -> bool:
        return 1 <= rank <= cfg.workers and schedule_for(cfg).tolerates_loss

    @property
    def coordinator(self) -> int:
        """The server evaluates the model it holds; with encryption it holds none, so worker 0 does."""
        return 1 if self.cfg.crypto.encrypt != "none" else 0

    @property
    def worker_index(self) -> int | None:
        return self.comm.rank - 1 if 1 <= self.comm.rank <= self.cfg.workers else None  # 0 serves; W+1 audits

    @property
    def start_step(self) -> int:
        return self._start

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def load_checkpoint_for(cls, cfg: RunConfig, folder: str, num_params: int) -> ServerCheckpoint:
        return ServerCheckpoint.load(folder, cls.identity(cfg), num_params)

    def load_checkpoint(self, folder: str, num_params: int) -> ServerCheckpoint:
        return self.load_checkpoint_for(self.cfg, folder, num_params)

    @staticmethod
    def identity(cfg: RunConfig) -> dict[str, object]:
        """What a checkpoint must share with the run that resumes it."""
        m = cfg.model
        return {
            "workers": cfg.workers,
            "seed": cfg.seed,
            "dataset": cfg.dataset,
            "model": f"{m.name}/{m.hidden}/{m.depth}",
            "batch_size": cfg.batch_size,
            # the optimizer state in a checkpoint (one momentum buffer, or one per worker) belongs to these
            "schedule": cfg.pattern.schedule,
            "optimizer": _optimizer_identity(cfg),
        }

    def run_identity(self) -> dict[str, object]:
        return self.identity(self.cfg)

    # ------------------------------------------------------------------ server side
    def serve(self) -> dict[str, Any]:
        if self.comm.rank != 0:
            from .cipher_audit import CiphertextAuditor

            return CiphertextAuditor(self).serve()
        from .server import Server

        if self.cfg.aggregate != "mean":  # a robust rule gates every sync round (trustgrad.robust)
            from ...robust import Gate

            self.gate = Gate.from_spec(self.cfg.aggregate)
        self._server = Server(self)
        return self._server.serve()

    def decode(self, payload: bytes, rank: int) -> torch.Tensor:
        """Bytes a worker pushed -> its flat gradient (a codec overrides this and ``aggregate``)."""
        if self._server.secure is not None:  # type: ignore[union-attr]
            n = self._server.replica.num_params  # type: ignore[union-attr]
            return self._server.secure.decode(payload, rank, n)  # type: ignore[union-attr, return-value]
        n = self._server.replica.num_params  # type: ignore[union-attr]
        if len(payload) != 4 * n:
            raise LaunchError(f"ps: worker {rank - 1} pushed {len(payload)} bytes, expected {4 * n} (float32 x {n})")
        return torch.frombuffer(bytearray(payload), dtype=torch.float32)

    def aggregate(self, grads: list[torch.Tensor], senders: list[int] | None = None) -> torch.Tensor:
        """The update of a synchronous round: the mean of one gradient per worker (summed in worker order), or what
        the ``--aggregate`` gate's verdict says (``senders``: the worker index of each gradient)."""
        if self._server.secure is not None:  # type: ignore[union-attr]
            return self._server.secure.aggregate(grads)  # type: ignore[union-attr, return-value]
        if self.gate is not None:
            return self.gate(grads, senders).update
        total = grads[0].clone()
        for g in grads[1:]:
            total.add_(g)
        return total.div_(len(grads))

    def stats(self) -> dict[str, Any]:
        if self._server is not None:
            return {**self._server.stats(), **(self.gate.summary() if self.gate is not None else {})}
        return self.secure.stats.summary() if self.secure is not None else {}

    # ------------------------------------------------------------------ worker side
    def attach(self, replica: Replica) -> None:
        Faults.for_rank(self.comm.rank).at(SETUP)  # tests only: a worker that dies before its first model
        if self.cfg.proof.mode == "blind":
            from .blind import BlindWorker

            self.secure = BlindWorker(self.comm, self.cfg, self.comm.rank - 1, replica.flat_params())
        elif self.cfg.crypto.encrypt != "none":
            from .secure import SecureWorker

            self.secure = SecureWorker(self.comm, self.cfg)
        self._pull(replica)
        self._start = self.clock

    def step(self, replica: Replica, x: torch.Tensor, y: torch.Tensor) -> float:
        started = time.perf_counter()
        loss = replica.compute_gradients(x, y)
        if self.detached:  # dropped by the server: nothing of ours counts any more
            return loss
        if self.straggler is not None:
            self.straggler.pad(self.cfg.seed, self.comm.rank, self.clock, time.perf_counter() - started)
        flat = replica.flat_grad()
        if self.secure is None:  # with encryption the server records the ciphertext it receives instead
            self.tap("gradient", flat)
        payload = self.encode(flat)
        self.last_claim = PushClaim(self.comm.rank - 1, self.clock, self.version, len(payload))
        self.observe_push(self.last_claim)
        with self._server_may_vanish():
            self.link.send(push_header(GRADIENT, self.clock, self.version, len(payload), loss), 0, PUSH)
            self.link.send(torch.frombuffer(bytearray(payload), dtype=torch.uint8), 0, PAYLOAD)
            self.clock += 1
            self._pull(replica)
        return loss

    @property
    def link(self) -> Any:
        return self.links[0]

    @contextlib.contextmanager
    def _server_may_vanish(self) -> Iterator[None]:
        """Under async/ssp a worker whose server connection fails (a cut link, a timeout: the server has dropped it
        by then) goes on alone, as a dropped worker does, instead of failing its machine's whole torchrun group."""
        try:
            yield
        except RuntimeError as exc:
            if not self.schedule.tolerates_loss:
                raise
            log.warning("ps: worker %d lost the server (%s); it stops pushing", self.comm.rank - 1, _first_line(exc))
            self.detached = True

    def encode(self, flat: torch.Tensor) -> bytes:
        """A flat float32 gradient -> the bytes pushed to the server (ciphertext bytes with encryption)."""
        if self.secure is not None:
            return self.secure.encode(flat)
        return flat.detach().to(torch.float32).contiguous().numpy().tobytes()

    def observe_push(self, claim: PushClaim) -> None:
        """Called before every push (a proof or audit layer overrides this)."""

    def finish(self, replica: Replica) -> None:
        if self.detached:
            return
        with self._server_may_vanish():
            self.link.send(push_header(DONE, self.clock, self.version), 0, PUSH)
            status, _, _ = self._reply_header()
            if status == DROPPED:  # dropped while it sent its last gradients: the goodbye of a dropped worker
                self._detach()
                return
            if status != BYE:
                raise LaunchError(f"ps: worker {self.comm.rank - 1} expected the server's goodbye, got status {status}")
            self.link.send(push_header(ACK), 0, PUSH)

    def _detach(self) -> None:
        """The server dropped us: stop pushing, and answer with our last message so its receive thread ends."""
        log.warning("ps: the server dropped worker %d; it stops pushing", self.comm.rank - 1)
        self.detached = True
        self.link.send(push_header(ACK), 0, PUSH)

    def _reply_header(self) -> tuple[int, int, int]:
        header = torch.zeros(3, dtype=torch.int64)
        self.link.recv(header, 0, REPLY)
        status, version, clock = (int(v) for v in header.tolist())
        return status, version, clock

    def _pull(self, replica: Replica) -> None:
        status, version, clock = self._reply_header()
        while status == SERVICE and self.secure is not None:  # the server needs our keys' work before it answers
            self.secure.serve(version, clock, replica)  # the header's fields carry (request, count)
            status, version, clock = self._reply_header()
        if status == DROPPED:
            self._detach()
            return
        if status != OK:
            raise LaunchError(f"ps: worker {self.comm.rank - 1} got unexpected status {status} from the server")
        if self.secure is not None:  # the encrypted mean of the last round: decrypt and step locally
            payload, _ = self.link.recv_bytes(0, REPLY, max_bytes=self.secure.max_payload(replica.num_params))
            if payload:
                self.secure.apply(replica, payload)
        else:
            flat = torch.empty(replica.num_params, dtype=torch.float32)
            self.link.recv(flat, 0, REPLY)
            replica.set_flat_params(flat)
        self.version, self.clock = version, clock


def _first_line(exc: BaseException) -> str:
    from ...launch import engine_message

    return engine_message(exc)


def _optimizer_identity(cfg: RunConfig) -> str:
    """The optimizer a checkpoint's state belongs to (SGD's string is the one checkpoints always carried)."""
    if cfg.optimizer == "adam":
        return f"adam/lr={cfg.lr}/betas={list(cfg.betas)}/eps={cfg.eps}/wd={cfg.weight_decay}"
    return f"sgd/lr={cfg.lr}/momentum={cfg.momentum}/wd={cfg.weight_decay}"
