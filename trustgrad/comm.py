"""The communicator every pattern talks through: torch.distributed with byte accounting and timeouts.

Bytes are counted as what this rank puts on the wire: the payload of each point-to-point send, and for the engine's
all-reduce the ``2 (W-1)/W`` times the tensor that a bandwidth-optimal (ring) all-reduce sends per rank — the
definition nccl-tests uses for bus bandwidth — so patterns compare on one scale.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from .launch import RankContext

__all__ = ["Comm", "Pending"]


class Pending:
    """A collective in flight (``Comm.all_reduce_async``): ``wait`` returns its tensor and never waits forever."""

    __slots__ = ("tensor", "_work", "_timeout")

    def __init__(self, tensor: torch.Tensor, work: dist.Work | None, timeout: float):
        self.tensor, self._work, self._timeout = tensor, work, timeout

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait(timedelta(seconds=self._timeout))
            self._work = None
        return self.tensor


class Comm:
    """A rank's view of the job: point-to-point and collective operations that count bytes and never wait forever."""

    def __init__(self, ctx: RankContext, timeout: float, group: dist.ProcessGroup | None = None):
        self.rank = ctx.rank
        self.world_size = ctx.world_size
        self.timeout = timeout
        self.group = group
        self.bytes_sent = 0
        self.messages_sent = 0

    def _count(self, nbytes: int | float) -> None:
        self.bytes_sent += int(nbytes)
        self.messages_sent += 1

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
        """In-place sum (or ``op``) over all ranks with the engine's collective."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=op, group=self.group)
            self._count(2 * (self.world_size - 1) / self.world_size * _nbytes(tensor))
        return tensor

    def all_reduce_async(self, tensor: torch.Tensor) -> Pending:
        """Start an in-place sum over all ranks; bytes count when it starts. Every rank must start the same
        collectives in the same order (gloo matches them by order), as with the blocking ones."""
        work = None
        if self.world_size > 1:
            work = dist.all_reduce(tensor, group=self.group, async_op=True)
            self._count(2 * (self.world_size - 1) / self.world_size * _nbytes(tensor))
        return Pending(tensor, work, self.timeout)

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        if self.world_size > 1:
            dist.broadcast(tensor, src=src, group=self.group)
            if self.rank == src:
                self._count(_nbytes(tensor))
        return tensor

    def all_gather(self, tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape everywhere), in group-rank order, over ``group`` (default: the job's).

        The engine hands every member the same list: what agreement among ranks rests on (docs/faults.md)."""
        group = group or self.group
        world = dist.get_world_size(group)
        out = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(out, tensor, group=group)
        self._count((world - 1) * _nbytes(tensor))
        return out

    def new_group(self, ranks: list[int]) -> dist.ProcessGroup:
        """A process group of ``ranks``, formed by those ranks alone: ranks left out (an excluded peer) take no part."""
        return dist.new_group(ranks, timeout=timedelta(seconds=self.timeout), use_local_synchronization=True)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)

    def send(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> None:
        self.isend(tensor, dst, tag).wait(timedelta(seconds=self.timeout))

    def recv(self, tensor: torch.Tensor, src: int | None = None, tag: int = 0) -> int:
        """Receive into ``tensor``; with ``src=None`` from any rank. Returns the sender's rank."""
        work = dist.irecv(tensor, src=src, group=self.group, tag=tag)
        work.wait(timedelta(seconds=self.timeout))
        if src is not None:
            return src
        # as torch's own dist.recv reads the sender (the public Work.source_rank() is deprecated and warns once per
        # process); the rank is the group's, mapped back to the global rank every send and recv here takes
        sender = work._source_rank()
        return sender if self.group is None else dist.get_global_rank(self.group, sender)

    def isend(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> dist.Work:
        self._count(_nbytes(tensor))
        return dist.isend(tensor, dst=dst, group=self.group, tag=tag)

    def irecv(self, tensor: torch.Tensor, src: int, tag: int = 0) -> dist.Work:
        return dist.irecv(tensor, src=src, group=self.group, tag=tag)

    def wait(self, work: dist.Work, timeout: float | None = None) -> None:
        """Wait for ``work``; ``timeout`` (seconds) overrides the job's, e.g. a gossip peer's shorter deadline."""
        work.wait(timedelta(seconds=self.timeout if timeout is None else timeout))

    # byte payloads (ciphertexts, proofs): a length header, then the bytes as a uint8 tensor
    def send_bytes(self, payload: bytes | bytearray, dst: int, tag: int = 0) -> None:
        """Send one byte payload; a ``bytearray`` is sent from its own memory (torch wants a writable buffer, so
        ``bytes`` are copied first: the blind set-up's hundreds of MB are built as bytearrays to skip that copy)."""
        self.send(torch.tensor([len(payload)], dtype=torch.int64), dst, tag)
        if payload:
            buffer = payload if isinstance(payload, bytearray) else bytearray(payload)
            self.send(torch.frombuffer(buffer, dtype=torch.uint8), dst, tag)

    def recv_bytes(
        self, src: int | None = None, tag: int = 0, max_bytes: int = 1 << 31, *, copy: bool = True
    ) -> tuple[bytes, int]:
        """Receive one byte payload; ``max_bytes`` caps what a peer may make us allocate. ``copy=False``: the
        ``bytearray`` the payload was received into, not a ``bytes`` copy of it (one copy of a large payload held,
        not two)."""
        header = torch.zeros(1, dtype=torch.int64)
        src = self.recv(header, src, tag)
        size = int(header.item())
        if not 0 <= size <= max_bytes:
            raise ValueError(f"rank {src} announced a payload of {size} bytes (limit {max_bytes})")
        if size == 0:
            return (b"" if copy else bytearray()), src
        if not copy:
            buffer = bytearray(size)
            self.recv(torch.frombuffer(buffer, dtype=torch.uint8), src, tag)
            return buffer, src  # type: ignore[return-value]
        buf = torch.empty(size, dtype=torch.uint8)
        self.recv(buf, src, tag)
        return buf.numpy().tobytes(), src

    def exchange_bytes(self, payload: bytes, dst: int, src: int, tag: int = 0, max_bytes: int = 1 << 31) -> bytes:
        """Send ``payload`` to ``dst`` while receiving one from ``src`` (no ordering deadlock in rings and shifts)."""
        out_header = torch.tensor([len(payload)], dtype=torch.int64)
        in_header = torch.zeros(1, dtype=torch.int64)
        works = [self.isend(out_header, dst, tag), self.irecv(in_header, src, tag)]
        for work in works:
            self.wait(work)
        size = int(in_header.item())
        if not 0 <= size <= max_bytes:
            raise ValueError(f"rank {src} announced a payload of {size} bytes (limit {max_bytes})")
        buf = torch.empty(size, dtype=torch.uint8)
        works = [self.irecv(buf, src, tag)] if size else []
        if payload:
            works.append(self.isend(torch.frombuffer(bytearray(payload), dtype=torch.uint8), dst, tag))
        for work in works:
            self.wait(work)
        return buf.numpy().tobytes()


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
