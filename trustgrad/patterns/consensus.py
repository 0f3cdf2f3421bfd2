"""Consensus distance between the replicas of a decentralized run, measured at the coordinator.

Decentralized patterns (gossip, local SGD) let replicas drift apart; how far is the quantity their theory controls:
the consensus distance Xi = sqrt(1/n * sum_i ||x_i - x_bar||^2) (Kong et al. 2021, "Consensus Control for
Decentralized Deep Learning"). Measuring it needs every replica in one place, which the protocols themselves never do,
so this is an observer: at each epoch's end every worker sends its flat parameters point-to-point to the
coordinator. That traffic goes through a copy of the rank's ``Comm`` with its own byte counter, so the protocol's
``bytes_sent`` stays comparable with other patterns' and the observer's cost is reported separately
(``monitor_bytes_sent``, counted where it lands). Peers that do not answer within the peer timeout are reported
lost and not waited for again.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..comm import Comm

__all__ = ["Consensus", "ConsensusMonitor"]

log = logging.getLogger(__name__)

#: message tags of the observer, far from the protocols' per-round tags
MONITOR_TAG = 1 << 30


@dataclass(frozen=True)
class Consensus:
    """One measurement: the (push-sum weighted) mean replica and the distances of the live replicas to it."""

    mean: torch.Tensor
    distance: float  # sqrt(mean_i ||x_i - x_bar||^2)
    relative: float  # distance / ||x_bar||
    replicas: int
    lost: tuple[int, ...]

    def record(self) -> dict[str, Any]:
        return {"consensus_distance": self.distance, "consensus_distance_rel": self.relative, "replicas": self.replicas}


class ConsensusMonitor:
    def __init__(self, comm: Comm, coordinator: int, peer_timeout: float, workers: list[int]):
        self.comm = copy.copy(comm)
        self.comm.bytes_sent = self.comm.messages_sent = 0
        self.coordinator, self.peer_timeout, self.workers = coordinator, peer_timeout, workers
        self.lost: set[int] = set()
        self.rounds = 0
        self.bytes_received = 0  # at the coordinator: what the observer cost the other ranks
        self.last: Consensus | None = None

    def gather(self, flat: torch.Tensor, weight: float = 1.0) -> Consensus | None:
        """Called by every live worker; returns the measurement on the coordinator, ``None`` elsewhere."""
        tag = MONITOR_TAG + self.rounds
        self.rounds += 1
        msg = torch.cat([flat, flat.new_tensor([weight])])
        if self.comm.rank != self.coordinator:
            try:
                self.comm.wait(self.comm.isend(msg, self.coordinator, tag), self.peer_timeout)
            except RuntimeError as exc:
                log.warning("rank %d: consensus report to the coordinator failed: %s", self.comm.rank, exc)
            return None
        rows, weights = [flat], [weight]
        deadline = time.monotonic() + self.peer_timeout
        for peer in self.workers:
            if peer == self.coordinator or peer in self.lost:
                continue
            buf = torch.empty_like(msg)
            try:
                self.comm.wait(self.comm.irecv(buf, peer, tag), max(0.01, deadline - time.monotonic()))
            except RuntimeError as exc:
                log.warning("consensus: rank %d did not report (%s); counting it as lost", peer, str(exc)[:120])
                self.lost.add(peer)
                continue
            self.bytes_received += buf.numel() * buf.element_size()
            rows.append(buf[:-1])
            weights.append(float(buf[-1]))
        stack, w = torch.stack(rows), torch.tensor(weights, dtype=flat.dtype)
        mean = (stack * w[:, None]).sum(0) / w.sum()
        distance = float((stack - mean).pow(2).sum(1).mean().sqrt())
        self.last = Consensus(
            mean, distance, distance / max(float(mean.norm()), 1e-12), len(rows), tuple(sorted(self.lost))
        )
        return self.last

    def stats(self) -> dict[str, Any]:
        if self.last is None:
            return {}
        return {
            "consensus_distance": self.last.distance,
            "consensus_distance_rel": self.last.relative,
            "peers_lost": list(self.last.lost),
            "monitor_bytes_sent": self.bytes_received,
        }
