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

Protections fill the slots this pattern calls (docs/architecture.md §3; ``trustgrad.protect``): the job's codec
encodes at the worker and decodes, combines and reveals at the server (plaintext, CKKS, blind claims); its gates screen
each round's claims (audits, blind checks, robust rules) and return verdicts the server applies. Nothing here knows
which protections run: ``protect.build`` reads the flags, and what ps offers (``offers_for``) decides what may.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import torch

from ... import protect
from ...config import RunConfig
from ...errors import ConfigError, LaunchError
from ...faults import SETUP, Faults
from ...replica import Replica
from ..base import PATTERNS, Pattern
from .checkpoint import ServerCheckpoint
from .protocol import ACK, BYE, DONE, DROPPED, GRADIENT, OK, PAYLOAD, PUSH, REPLY, SERVICE, open_links, push_header
from .schedules import SCHEDULES, Schedule, schedule_for
from .straggler import Straggler
from .transport import LinkError, Wire, open_wire

__all__ = ["ParameterServer", "SCHEDULES", "Schedule", "Straggler"]

log = logging.getLogger(__name__)


@PATTERNS.register("ps")
class ParameterServer(Pattern):
    name = "ps"
    offers = frozenset(
        {"codec-payload", "keyless-aggregator", "per-claim", "excludes-workers", "sync-rounds", "no-plaintext-state"}
    )

    def __init__(self, cfg: RunConfig, comm: Any):
        super().__init__(cfg, comm)
        self.schedule = schedule_for(cfg)
        spec = cfg.pattern.straggler
        self.straggler = Straggler.parse(spec, cfg.workers) if spec else None
        self.clock = self.version = 0
        self.detached = False
        self._server = None
        self._start = 0
        self.codec: Any = None  # this worker's side of the job's codec (``attach``)
        #: this rank's ps channels (server: one per worker; worker: to the server), made first on every rank because
        #: under async/ssp they are process groups of their own (``protocol.open_links``)
        links = open_links(comm, cfg.workers, separate=self.schedule.tolerates_loss) if comm.world_size > 1 else {}
        #: what workers send the server travels over links whose receiver bounds every message (``transport``); a
        #: half-sent message is refused well before the worker's deadline would call it silent
        stall = min(cfg.timeout, cfg.pattern.worker_timeout / 2)
        self.wire = open_wire(comm, cfg.workers, stall) if comm.world_size > 1 else Wire()
        self.links = {peer: self.wire.wrap(link) for peer, link in links.items()}
        self.faults = Faults.for_rank(comm.rank)

    # ------------------------------------------------------------------ job shape
    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        schedule_for(cfg)  # an unknown schedule is named before what the protections need of it
        cls._check_servers(cfg)
        super().check(cfg)

    @classmethod
    def offers_for(cls, cfg: RunConfig) -> frozenset[str]:
        """Asynchronous schedules apply pushes one by one with per-worker momentum at the server (DANA), and
        checkpoints write the server's model: either takes away rounds and a server without plaintext state."""
        p = cfg.pattern
        offers = cls.offers - ({"sync-rounds", "no-plaintext-state"} if p.schedule != "sync" else set())
        return offers - ({"no-plaintext-state"} if cfg.resume or p.checkpoint_every else set())

    @staticmethod
    def _check_servers(cfg: RunConfig) -> None:
        p = cfg.pattern
        if p.servers != 1:
            world = cfg.workers + max(p.servers, 0)
            raise ConfigError(
                f"ps needs exactly one server rank besides the workers (got --servers {p.servers}: {world} processes "
                "in all, at least 2 needed); sharding over several servers is not supported"
            )

    @classmethod
    def validate(cls, cfg: RunConfig) -> None:
        p = cfg.pattern
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

    @classmethod
    def world_size(cls, cfg: RunConfig) -> int:
        return cfg.workers + cfg.pattern.servers + protect.build(cfg).extra_ranks  # e.g. an auditor rank

    @classmethod
    def may_lose(cls, cfg: RunConfig, rank: int) -> bool:
        return 1 <= rank <= cfg.workers and schedule_for(cfg).tolerates_loss

    @property
    def coordinator(self) -> int:
        """The server evaluates the model it holds; with encryption it holds none, so worker 0 does."""
        return 1 if self.encrypted else 0

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
            # a loss other than the model's own changes every gradient (named only when set: older checkpoints match)
            "model": f"{m.name}/{m.hidden}/{m.depth}" + (f"/loss={m.loss}" if m.loss else ""),
            "batch_size": cfg.batch_size,
            # the optimizer state in a checkpoint (one momentum buffer, or one per worker) belongs to these
            "schedule": cfg.pattern.schedule,
            "optimizer": _optimizer_identity(cfg),
        }

    def run_identity(self) -> dict[str, object]:
        return self.identity(self.cfg)

    # ------------------------------------------------------------------ server side
    def serve(self) -> dict[str, Any]:
        if self.comm.rank != 0:  # a protection's own rank (the ciphertext auditor)
            return self.protections.serve_extra_rank(self.comm)
        from .server import Server

        self._server = Server(self)
        return self._server.serve()

    def stats(self) -> dict[str, Any]:
        if self._server is not None:
            return self._server.stats()
        return self.codec.cost() if self.codec is not None else {}

    # ------------------------------------------------------------------ worker side
    def attach(self, replica: Replica) -> None:
        self.faults.at(SETUP)  # tests only: a worker that dies before its first model
        self.codec = self.protections.worker_codec(self.wire.wrap(self.comm), self.comm.rank, replica.flat_params())
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
        if not self.encrypted:  # with encryption the server records the ciphertext it receives instead
            self.tap("gradient", flat)
        payload = self.codec.encode(flat)
        if self.faults.bad_frame_at == self.clock and self.wire.outlet is not None:  # tests only: a broken message
            self.wire.outlet.bad_frame(self.faults.bad_frame, PUSH)
            with self._server_may_vanish():
                self._pull(replica)  # the server's answer: DROPPED
            return loss
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
        with contextlib.suppress(LinkError):  # the server refused what we sent and closed our link: no goodbye owed
            self.link.send(push_header(ACK), 0, PUSH)

    def _reply_header(self) -> tuple[int, int, int]:
        header = torch.zeros(3, dtype=torch.int64)
        self.link.recv(header, 0, REPLY)
        status, version, clock = (int(v) for v in header.tolist())
        return status, version, clock

    def _pull(self, replica: Replica) -> None:
        status, version, clock = self._reply_header()
        while status == SERVICE and self.encrypted:  # the server needs our keys' work before it answers
            self.codec.serve(version, clock, replica)  # the header's fields carry (request, count)
            status, version, clock = self._reply_header()
        if status == DROPPED:
            self._detach()
            return
        if status != OK:
            raise LaunchError(f"ps: worker {self.comm.rank - 1} got unexpected status {status} from the server")
        if self.encrypted:  # the encrypted mean of the last round: decrypt and step locally
            payload, _ = self.link.recv_bytes(0, REPLY, max_bytes=self.codec.max_payload(replica.num_params))
            if payload:
                self.codec.apply(replica, payload)
        else:  # the model itself
            flat = torch.empty(replica.num_params, dtype=torch.float32)
            self.link.recv(flat, 0, REPLY)
            self.codec.apply(replica, flat)
        self.version, self.clock = version, clock


def _first_line(exc: BaseException) -> str:
    from ...launch import engine_message

    return engine_message(exc)


def _optimizer_identity(cfg: RunConfig) -> str:
    """The optimizer a checkpoint's state belongs to (SGD's string is the one checkpoints always carried)."""
    if cfg.optimizer == "adam":
        return f"adam/lr={cfg.lr}/betas={list(cfg.betas)}/eps={cfg.eps}/wd={cfg.weight_decay}"
    return f"sgd/lr={cfg.lr}/momentum={cfg.momentum}/wd={cfg.weight_decay}"
