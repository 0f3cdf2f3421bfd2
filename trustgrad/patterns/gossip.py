"""``gossip``: decentralized SGD — after every step each worker mixes its parameters with its neighbours' only.

One mixing rule serves every topology: push-sum (Kempe et al. 2003) as used by Stochastic Gradient Push (Assran et
al. 2019, Alg. 1). Each rank keeps a de-biased replica z and a scalar weight w (numerator x = w z). Round t:

1. Ask the topology (``topology.py``) for this round's out- and in-peers; drop peers already known dead.
2. Split the mass (x, w) evenly over itself and its live out-peers: post ``isend`` of the share to each, ``irecv``
   from each in-peer (one message of P+1 floats, tag = t).
3. While the messages travel, compute the gradient at z (communication overlaps the backward pass).
4. Wait up to ``--peer-timeout`` for the messages of live in-peers. A peer that misses the deadline is *late*: it
   is not waited for again, and its messages (of this round or any later one) are added whenever they land —
   push-sum conserves the total mass under delays, so a slow peer that comes back mixes in again instead of
   splitting the graph. A peer whose operation fails (it died), that stays silent for the job's ``--timeout``,
   sends an invalid message or falls further behind than a memory budget allows is *lost*: skipped from then on,
   and the shares sent to it that never left are taken back, so the survivors' mass is conserved.
5. x = own share + received numerators, w likewise, z = x / w; then the optimizer step on z with the gradient of 3.

Waits never close a connection to a slow peer (``links``: a gloo wait that times out closes the pair for good, and
the loss cascaded to every rank). At the end every rank waits for its messages still in flight, so a peer that was
frozen and finished late is part of the result; then, if the engine still holds operations with lost peers (a peer
on another host cut off), the rank closes its connections on purpose before its group is destroyed (``links.release``).
docs/faults.md has the fault model and what the summary reports.

On a regular graph whose in- and out-peers coincide (ring, random pairs) every w stays 1 and this is exactly
synchronous D-PSGD, x_i <- sum_j W_ij x_j - lr g_i(x_i) with uniform doubly-stochastic W (Lian et al. 2017); on the
directed exponential graph it is SGP. Peers agree on every round's graph without a coordinator (shared seed).

Reported model: replicas differ, so the coordinator (rank 0, which must survive: it writes the records) gathers the
replicas still connected to it at the end through the consensus observer and reports their push-sum weighted average
(Lian et al. analyse the average); per-epoch ``test_accuracy`` is rank 0's own replica, next to the consensus
distance and the number of replicas. The summary says how many replicas trained to the end, which were lost and
when; a run that ends with fewer than ``--min-replicas`` (default: a majority of the workers) fails.

No broadcast of W0 at set-up: initial weights are a PRF of the run's seed (``models.build_model``), so every rank
builds the same W0 itself, and a peer that dies during set-up is a lost peer like any other instead of a failed
collective that takes the whole job down.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ..comm import Comm
from ..config import RunConfig
from ..errors import ConfigError
from ..faults import KILL_ENV, SETUP, Faults
from ..replica import Replica
from ..tags import PATTERN_ROUNDS
from .base import PATTERNS, Pattern
from .consensus import ConsensusMonitor
from .links import DONE, FAILED, PENDING, Op, PeerLinks, release
from .topology import TOPOLOGIES

__all__ = ["PushSum", "Gossip", "KILL_ENV", "min_replicas"]

log = logging.getLogger(__name__)

#: what a slow peer's backlog of posted messages may cost a rank before the peer is evicted
BACKLOG_BYTES = 64 << 20


class PushSum:
    """One rank's side of push-sum gossip over ``Comm``; ``mix(z)`` is one round, ``start``/``finish`` split it.

    Peers are in one of three states: *live*, *late* (its message of some round missed that round's deadline; its
    messages are added whenever they land — push-sum conserves mass under delays, so a late peer keeps mixing; it is
    live again once a message arrives in its own round) and *lost* (an operation failed, stayed pending for the job's
    ``--timeout``, it sent an invalid message, or it fell more than ``max_lag`` rounds behind: the memory its backlog
    of posted messages would take). Live and late peers alike are waited for up to ``peer_timeout`` each round.
    Every change of state is an event with its round.
    """

    def __init__(
        self,
        comm: Comm,
        topology: str,
        seed: int,
        peer_timeout: float,
        link_timeout: float | None = None,
        backlog_bytes: int = BACKLOG_BYTES,
    ):
        self.comm, self.topology, self.seed, self.peer_timeout = comm, TOPOLOGIES.get(topology), seed, peer_timeout
        self.links = PeerLinks(comm, comm.timeout if link_timeout is None else link_timeout)
        self.weight = 1.0
        self.rounds = 0
        self.late: set[int] = set()
        self.events: list[dict[str, Any]] = []  # {"peer", "round", "event": late|caught-up|lost, "reason"}
        self.last_heard: dict[int, int] = {}  # peer -> the round in which we last added a message of it
        self.messages_late = 0
        self.max_lag: int | None = None
        self.backlog_bytes = backlog_bytes
        self._recvs: list[Op] = []  # posted receives of any round, not yet added
        self._sends: list[Op] = []  # posted sends not yet delivered: a failed one gives its share back
        self._pending: tuple | None = None
        self._seen_lost: set[int] = set()

    @property
    def dead(self) -> set[int]:
        return set(self.links.lost)

    def start(self, z: torch.Tensor) -> None:
        t, rank, lost = self.rounds, self.comm.rank, self.links.lost
        peers = self.topology(rank, self.comm.world_size, t, self.seed)
        if self.max_lag is None:  # the backlog a slow peer may cost us (posted messages both ways), in rounds
            self.max_lag = max(8, self.backlog_bytes // (2 * z.element_size() * (z.numel() + 1)))
        outs = [p for p in peers.out if p not in lost]
        share = self.weight / (1 + len(outs))
        msg = torch.cat([z * share, z.new_tensor([share])])
        current = []
        for p in (p for p in peers.inn if p not in lost):
            op = self.links.recv(torch.empty_like(msg), p, PATTERN_ROUNDS + t)
            self._recvs.append(op)
            current.append(op)
        self._sends += [self.links.send(msg, p, PATTERN_ROUNDS + t) for p in outs]
        self._pending = (z, share, current)

    def finish(self) -> torch.Tensor:
        z, share, current = self._pending
        self._pending = None
        t = self.rounds
        # every live in-peer is waited for, the late ones too: a neighbour that stops waiting for a slow peer runs
        # ahead without bound and push-sum's weights degenerate (measured: weights 0.02 against 1.97, accuracy 0.54
        # against 0.85); waiting up to --peer-timeout per round keeps a frozen peer's lag to its freeze / timeout
        self.links.wait(current, time.monotonic() + self.peer_timeout)
        self.links.expire()  # a late peer silent for --timeout is lost (no gloo wait ever expires: see links)
        for op in current:
            if op.state == PENDING and op.peer not in self.late:
                self.late.add(op.peer)
                self._event(op.peer, t, "late", f"no message within --peer-timeout {self.peer_timeout:g} s")
            elif op.state == DONE and op.peer in self.late:
                self.late.discard(op.peer)
                self._event(op.peer, t, "caught-up", "its message of this round arrived in time")
        self._check_lag(t)
        x, w = self._collect(z * share, share)
        self.rounds = t + 1
        self.weight = w
        return x / w

    def mix(self, z: torch.Tensor) -> torch.Tensor:
        self.start(z)
        return self.finish()

    def close(self, z: torch.Tensor) -> torch.Tensor:
        """End of the run: wait for every message still in flight (a late peer catching up), add them; the replica."""
        self.links.drain()
        x, w = self._collect(z * self.weight, self.weight)
        self.links.close()
        self.weight = w
        return x / w

    def heard(self, window: int) -> set[int]:
        """Peers not lost whose messages we added in the last ``window`` rounds (late ones included)."""
        return {p for p, r in self.last_heard.items() if r >= self.rounds - window and p not in self.links.lost}

    def _collect(self, x: torch.Tensor, w: float) -> tuple[torch.Tensor, float]:
        """Add every message that has landed (of this round or a late one) and the share of every failed send."""
        keep = []
        for op in self._recvs:
            if op.state == DONE:
                reason = _invalid(op.tensor, self.comm.world_size)
                if reason:
                    self.links.evict(op.peer, f"sent an invalid message ({reason})")
                    continue
                mixed = x + op.tensor[:-1]
                if not bool(torch.isfinite(mixed).all()):  # finite values chosen to overflow our sum
                    self.links.evict(op.peer, "sent a message whose sum with ours overflows")
                    continue
                if op.tag - PATTERN_ROUNDS < self.rounds:
                    self.messages_late += 1
                x = mixed
                w += float(op.tensor[-1])
                self.last_heard[op.peer] = self.rounds
            elif op.state == PENDING:
                keep.append(op)
        self._recvs = keep
        sends = []
        for op in self._sends:
            if op.state == FAILED:  # never delivered: the share stays here, so the survivors' mass is conserved
                x += op.tensor[:-1]
                w += float(op.tensor[-1])
            elif op.state == PENDING:
                sends.append(op)
        self._sends = sends
        for peer in set(self.links.lost) - self._seen_lost:
            self._seen_lost.add(peer)
            self.late.discard(peer)
            self._event(peer, self.rounds, "lost", self.links.lost[peer])
        return x, w

    def _check_lag(self, t: int) -> None:
        for peer in list(self.late):
            if self.links.backlog(peer) > 2 * self.max_lag:
                budget = f"{self.backlog_bytes / 2**20:g} MiB"
                self.links.evict(peer, f"more than {self.max_lag} rounds behind (the backlog budget of {budget})")

    def _event(self, peer: int, round_: int, event: str, reason: str) -> None:
        self.events.append({"peer": peer, "round": round_, "event": event, "reason": reason})
        if event != "lost":  # PeerLinks logs losses itself
            log.warning("rank %d: peer %d %s in round %d: %s", self.comm.rank, peer, event, round_, reason)


def _invalid(msg: torch.Tensor, world: int) -> str:
    """Why a received push-sum message cannot be honest ('' if it can): a peer controls every float it sends."""
    share = float(msg[-1])
    # every weight starts at 1 and push-sum conserves the total, so an honest share is in (0, world]
    if not 0.0 < share <= world:
        return f"weight {share!r} outside (0, {world}]"
    if not bool(torch.isfinite(msg).all()):
        return "non-finite parameters"
    return ""


@PATTERNS.register("gossip")
class Gossip(Pattern):
    name = "gossip"
    tolerates_worker_loss = True

    @classmethod
    def may_lose(cls, cfg: RunConfig, rank: int) -> bool:
        """Any worker but the coordinator (rank 0: it measures consensus, evaluates and writes the records)."""
        return rank != 0

    @classmethod
    def validate(cls, cfg: RunConfig) -> None:
        TOPOLOGIES.get(cfg.pattern.topology)
        if not cfg.pattern.peer_timeout > 0:
            raise ConfigError(f"peer_timeout must be > 0 seconds, got {cfg.pattern.peer_timeout}")
        if cfg.pattern.min_replicas > cfg.workers:
            raise ConfigError(
                f"--min-replicas {cfg.pattern.min_replicas} is more than the {cfg.workers} workers of the job"
            )

    def attach(self, replica: Replica) -> None:
        # no broadcast of W0: every rank built the same weights from the seed (see the module docstring)
        self.faults = Faults.for_rank(self.comm.rank)
        self.faults.at(SETUP)
        p = self.cfg.pattern
        self.mixer = PushSum(self.comm, p.topology, self.cfg.seed, p.peer_timeout)
        self.monitor = ConsensusMonitor(self.comm, self.coordinator, p.peer_timeout, list(range(self.num_workers)))
        self.steps = 0
        self.window, self._gathered_at = 1, 0  # rounds between consensus reports: who counts as heard lately
        self.final = None

    def step(self, replica: Replica, x: torch.Tensor, y: torch.Tensor) -> float:
        self.faults.at(self.steps)
        self.mixer.start(replica.flat_params())
        loss = replica.compute_gradients(x, y)
        replica.set_flat_params(self.mixer.finish())
        replica.step()
        self.steps += 1
        return loss

    def epoch_end(self, replica: Replica, epoch: int) -> dict[str, Any]:
        measured = self._gather(replica, final=False)
        return measured.record() if measured else {}

    def finish(self, replica: Replica) -> None:
        replica.set_flat_params(self.mixer.close(replica.flat_params()))  # the late messages still in flight
        self.final = self._gather(replica, final=True)
        if self.final is not None:
            replica.set_flat_params(self.final.mean)
        # operations with lost peers that the engine still holds would abort the rank when its group is destroyed
        release(self.comm, [self.mixer.links, self.monitor.links])

    def _gather(self, replica: Replica, final: bool):  # noqa: ANN202
        if self.mixer.rounds > self._gathered_at:
            self.window, self._gathered_at = self.mixer.rounds - self._gathered_at, self.mixer.rounds
        heard = self.mixer.heard(self.window)
        return self.monitor.gather(replica.flat_params(), self.mixer.weight, heard, final=final)

    def stats(self) -> dict[str, Any]:
        out = {
            "topology": self.cfg.pattern.topology,
            "communication_rounds": self.mixer.rounds,
            "peers_skipped": sorted(self.mixer.dead),
            "peer_events": self.mixer.events,
            "late_messages_added": self.mixer.messages_late,
            "push_sum_weight": self.mixer.weight,
            "reported_model": "average of the replicas connected to the coordinator at the end",
            **self.monitor.stats(),
        }
        if self.final is not None:  # the coordinator: who trained to the end
            out.update(
                replicas_started=self.num_workers,
                replicas_final=self.final.replicas,
                replica_ranks_final=list(self.final.members),
                min_replicas=min_replicas(self.cfg),
            )
        return out


def min_replicas(cfg: RunConfig) -> int:
    """``--min-replicas``, or by default a majority of the workers (0 means the default)."""
    return cfg.pattern.min_replicas or cfg.workers // 2 + 1
