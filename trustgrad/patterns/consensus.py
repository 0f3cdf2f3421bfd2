"""Consensus distance between the replicas of a decentralized run, and who is still in it, at the coordinator.

Decentralized patterns (gossip, local SGD) let replicas drift apart; how far is the quantity their theory controls:
the consensus distance Xi = sqrt(1/n * sum_i ||x_i - x_bar||^2) (Kong et al. 2021, "Consensus Control for
Decentralized Deep Learning"). Measuring it needs every replica in one place, which the protocols themselves never do,
so this is an observer: at each epoch's end every worker sends its flat parameters point-to-point to the
coordinator. That traffic goes through a copy of the rank's ``Comm`` with its own byte counter, so the protocol's
``bytes_sent`` stays comparable with other patterns' and the observer's cost is reported separately
(``monitor_bytes_sent``, counted where it lands).

Who counts (docs/faults.md). Each report carries, besides the parameters and the push-sum weight, the peers this
replica heard from lately. A replica counts if it is connected to the coordinator through such edges: a replica cut
off from the gossip (its neighbours gave up on it) is not averaged into the result even if it still reaches the
coordinator. Reports are waited for up to the peer timeout at an epoch's end (a late one is left posted and dropped
when it lands: waiting on gloo with a short deadline would close the pair, see ``links``) and up to the job's
``--timeout`` at the end of the run, where the count of replicas that trained to the end is decided.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..comm import Comm
from ..tags import CONSENSUS_MONITOR
from .links import DONE, PeerLinks

__all__ = ["Consensus", "ConsensusMonitor"]

log = logging.getLogger(__name__)

#: message tags of the observer, far from the protocols' per-round tags
MONITOR_TAG = CONSENSUS_MONITOR  # + round (trustgrad.tags)


@dataclass(frozen=True)
class Consensus:
    """One measurement: the (push-sum weighted) mean of the connected replicas and their distances to it."""

    mean: torch.Tensor
    distance: float  # sqrt(mean_i ||x_i - x_bar||^2)
    relative: float  # distance / ||x_bar||
    replicas: int
    lost: tuple[int, ...]  # workers not in the coordinator's connected set (lost, cut off, or late this time)
    members: tuple[int, ...] = ()

    def record(self) -> dict[str, Any]:
        return {"consensus_distance": self.distance, "consensus_distance_rel": self.relative, "replicas": self.replicas}


class ConsensusMonitor:
    def __init__(self, comm: Comm, coordinator: int, peer_timeout: float, workers: list[int]):
        self.comm = copy.copy(comm)
        self.comm.bytes_sent = self.comm.messages_sent = 0
        self.coordinator, self.peer_timeout, self.workers = coordinator, peer_timeout, workers
        self.links = PeerLinks(self.comm, comm.timeout)
        self.rounds = 0
        self.bytes_received = 0  # at the coordinator: what the observer cost the other ranks
        self.late_reports = 0
        self.refused: dict[int, str] = {}
        self.last: Consensus | None = None

    @property
    def lost(self) -> set[int]:
        return set(self.links.lost)

    def gather(
        self, flat: torch.Tensor, weight: float = 1.0, heard: set[int] | None = None, final: bool = False
    ) -> Consensus | None:
        """Called by every live worker; returns the measurement on the coordinator, ``None`` elsewhere.

        ``heard``: the peers this replica mixed with lately (``None``: every worker, as after an all-reduce).
        ``final``: the end of the run; reports are waited for up to ``--timeout`` and the links are closed.
        """
        tag = MONITOR_TAG + self.rounds
        self.rounds += 1
        flags = torch.ones(len(self.workers), dtype=flat.dtype)
        if heard is not None:
            flags.zero_()
            flags[[p for p in heard if 0 <= p < len(self.workers)]] = 1
        msg = torch.cat([flat, flat.new_tensor([weight]), flags])
        if self.comm.rank != self.coordinator:
            self.links.send(msg, self.coordinator, tag)  # waited on by the link's thread: never blocks training
            if final:
                self._close()
            return None
        ops = {
            peer: self.links.recv(torch.empty_like(msg), peer, tag)
            for peer in self.workers
            if peer != self.coordinator and peer not in self.links.lost
        }
        wait = self.links.give_up + 1.0 if final else self.peer_timeout
        self.links.wait(list(ops.values()), time.monotonic() + wait)
        reports = {self.coordinator: msg}
        for peer, op in ops.items():
            if op.state != DONE:
                self.late_reports += op.peer not in self.links.lost
                continue
            reason = _invalid_report(op.tensor, flat.numel(), len(self.workers))
            if reason:
                self.refused[peer] = reason
                self.links.evict(peer, f"sent an invalid consensus report ({reason})")
                continue
            self.bytes_received += op.tensor.numel() * op.tensor.element_size()
            reports[peer] = op.tensor
        self.last = self._measure(reports, flat.numel())
        if final:
            self._close()
        return self.last

    def _measure(self, reports: dict[int, torch.Tensor], n: int) -> Consensus:
        members = _component(self.coordinator, {r: m[n + 1 :] for r, m in reports.items()})
        # float64: finite float32 rows a peer chose cannot overflow the sums; the mean lies between them
        rows = torch.stack([reports[r][:n] for r in members]).double()
        w = torch.stack([reports[r][n] for r in members]).double()
        mean = (rows * w[:, None]).sum(0) / w.sum()
        distance = float((rows - mean).pow(2).sum(1).mean().sqrt())
        lost = tuple(sorted(set(self.workers) - set(members)))
        mean = mean.to(reports[self.coordinator].dtype)
        return Consensus(mean, distance, distance / max(float(mean.norm()), 1e-12), len(members), lost, members)

    def _close(self) -> None:
        self.links.drain()
        self.links.close()

    def stats(self) -> dict[str, Any]:
        if self.last is None:
            return {}
        return {
            "consensus_distance": self.last.distance,
            "consensus_distance_rel": self.last.relative,
            "peers_lost": list(self.last.lost),
            "monitor_bytes_sent": self.bytes_received,
            "late_reports": self.late_reports,
            **({"refused_reports": {str(k): v for k, v in self.refused.items()}} if self.refused else {}),
        }


def _component(root: int, heard: dict[int, torch.Tensor]) -> tuple[int, ...]:
    """The reporters connected to ``root`` when i and j are linked if either heard from the other."""
    edges = {
        r: {int(p) for p in torch.nonzero(flags).flatten().tolist() if int(p) in heard} for r, flags in heard.items()
    }
    for r, peers in list(edges.items()):
        for p in peers:
            edges[p].add(r)
    seen, todo = {root}, [root]
    while todo:
        for p in edges[todo.pop()] - seen:
            seen.add(p)
            todo.append(p)
    return tuple(sorted(seen))


def _invalid_report(msg: torch.Tensor, n: int, workers: int) -> str:
    """Why a report cannot be honest ('' if it can): every float of it is the sender's to choose."""
    weight, flags = float(msg[n]), msg[n + 1 :]
    if not 0.0 < weight <= workers:
        return f"weight {weight!r} outside (0, {workers}]"
    if not bool(((flags == 0) | (flags == 1)).all()):
        return "peer flags other than 0 and 1"
    if not bool(torch.isfinite(msg[:n]).all()):
        return "non-finite parameters"
    return ""
