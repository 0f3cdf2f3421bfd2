"""``gossip``: decentralized SGD — after every step each worker mixes its parameters with its neighbours' only.

One mixing rule serves every topology: push-sum (Kempe et al. 2003) as used by Stochastic Gradient Push (Assran et
al. 2019, Alg. 1). Each rank keeps a de-biased replica z and a scalar weight w (numerator x = w z). Round t:

1. Ask the topology (``topology.py``) for this round's out- and in-peers; drop peers already known dead.
2. Split the mass (x, w) evenly over itself and its live out-peers: post ``isend`` of the share to each, ``irecv``
   from each in-peer (one message of P+1 floats, tag = t).
3. While the messages travel, compute the gradient at z (communication overlaps the backward pass).
4. Wait up to ``--peer-timeout`` for the messages. A peer whose message fails or times out is marked dead and
   skipped from then on; the share sent to a dead out-peer is taken back, so the survivors' mass is conserved and
   they keep converging to their own average.
5. x = own share + received numerators, w likewise, z = x / w; then the optimizer step on z with the gradient of 3.

On a regular graph whose in- and out-peers coincide (ring, random pairs) every w stays 1 and this is exactly
synchronous D-PSGD, x_i <- sum_j W_ij x_j - lr g_i(x_i) with uniform doubly-stochastic W (Lian et al. 2017); on the
directed exponential graph it is SGP. Peers agree on every round's graph without a coordinator (shared seed).

Reported model: replicas differ, so the coordinator (rank 0, which must survive: it writes the records) gathers the
live replicas at the end through the consensus observer and reports their push-sum weighted average (Lian et al.
analyse the average); per-epoch ``test_accuracy`` is rank 0's own replica, next to the consensus distance.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import torch

from ..comm import Comm
from ..config import RunConfig
from ..errors import ConfigError
from ..replica import Replica
from .base import PATTERNS, Pattern
from .consensus import ConsensusMonitor
from .topology import TOPOLOGIES

__all__ = ["PushSum", "Gossip", "KILL_ENV"]

log = logging.getLogger(__name__)

#: Test-only fault injection: "RANK@STEP" makes that worker SIGKILL itself before that step (a real, abrupt death).
KILL_ENV = "TRUSTGRAD_TEST_KILL_WORKER"


class PushSum:
    """One rank's side of push-sum gossip over ``Comm``; ``mix(z)`` is one round, ``start``/``finish`` split it."""

    def __init__(self, comm: Comm, topology: str, seed: int, peer_timeout: float):
        self.comm, self.topology, self.seed, self.peer_timeout = comm, TOPOLOGIES.get(topology), seed, peer_timeout
        self.weight = 1.0
        self.dead: set[int] = set()
        self.rounds = 0
        self._pending: tuple | None = None

    def start(self, z: torch.Tensor) -> None:
        t, rank = self.rounds, self.comm.rank
        peers = self.topology(rank, self.comm.world_size, t, self.seed)
        outs = [p for p in peers.out if p not in self.dead]
        share = self.weight / (1 + len(outs))
        msg = torch.cat([z * share, z.new_tensor([share])])
        recvs, sends = [], []
        for p in (p for p in peers.inn if p not in self.dead):
            buf = torch.empty_like(msg)
            recvs.append((p, buf, self._post(lambda b=buf, p=p: self.comm.irecv(b, p, t), p)))
        for p in outs:
            sends.append((p, self._post(lambda p=p: self.comm.isend(msg, p, t), p)))
        self._pending = (z, share, recvs, sends)

    def finish(self) -> torch.Tensor:
        z, share, recvs, sends = self._pending
        self._pending, self.rounds = None, self.rounds + 1
        deadline = time.monotonic() + self.peer_timeout
        x, w = z * share, share
        for p, buf, work in recvs:
            if self._done(work, p, deadline):
                x += buf[:-1]
                w += float(buf[-1])
        for p, work in sends:
            if not self._done(work, p, deadline):  # never delivered: the share stays here
                x += z * share
                w += share
        self.weight = w
        return x / w

    def mix(self, z: torch.Tensor) -> torch.Tensor:
        self.start(z)
        return self.finish()

    def _post(self, op, peer: int):  # noqa: ANN001, ANN202
        try:
            return op()
        except RuntimeError as exc:  # gloo refuses ops on a pair whose peer is gone
            self._lose(peer, exc)
            return None

    def _done(self, work, peer: int, deadline: float) -> bool:  # noqa: ANN001
        if work is None:
            return False
        try:
            self.comm.wait(work, max(0.01, deadline - time.monotonic()))
            return True
        except RuntimeError as exc:
            self._lose(peer, exc)
            return False

    def _lose(self, peer: int, exc: Exception) -> None:
        if peer not in self.dead:
            log.warning("rank %d: peer %d lost in round %d, skipping it: %s", self.comm.rank, peer, self.rounds, exc)
            self.dead.add(peer)


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

    def attach(self, replica: Replica) -> None:
        super().attach(replica)  # everyone is alive at the start: one broadcast of W0
        p = self.cfg.pattern
        self.mixer = PushSum(self.comm, p.topology, self.cfg.seed, p.peer_timeout)
        self.monitor = ConsensusMonitor(self.comm, self.coordinator, p.peer_timeout, list(range(self.num_workers)))
        self.steps = 0
        self._kill_at = _kill_step(self.comm.rank)

    def step(self, replica: Replica, x: torch.Tensor, y: torch.Tensor) -> float:
        if self.steps == self._kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        self.mixer.start(replica.flat_params())
        loss = replica.compute_gradients(x, y)
        replica.set_flat_params(self.mixer.finish())
        replica.step()
        self.steps += 1
        return loss

    def epoch_end(self, replica: Replica, epoch: int) -> dict[str, Any]:
        measured = self.monitor.gather(replica.flat_params(), self.mixer.weight)
        return measured.record() if measured else {}

    def finish(self, replica: Replica) -> None:
        measured = self.monitor.gather(replica.flat_params(), self.mixer.weight)
        if measured is not None:
            replica.set_flat_params(measured.mean)

    def stats(self) -> dict[str, Any]:
        return {
            "topology": self.cfg.pattern.topology,
            "communication_rounds": self.mixer.rounds,
            "peers_skipped": sorted(self.mixer.dead),
            "push_sum_weight": self.mixer.weight,
            "reported_model": "average of the live replicas, gathered at the coordinator",
            **self.monitor.stats(),
        }


def _kill_step(rank: int) -> int | None:
    spec = os.environ.get(KILL_ENV, "")
    if not spec:
        return None
    try:
        who, at = (int(v) for v in spec.split("@"))
    except ValueError:
        raise ConfigError(f"{KILL_ENV} must look like RANK@STEP, got {spec!r}") from None
    return at if who == rank else None
