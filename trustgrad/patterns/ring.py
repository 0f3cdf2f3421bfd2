"""``ring``: ring all-reduce written over point-to-point messages (Patarasuk & Yuan 2009; Baidu's ring all-reduce).

Protocol, for W ranks in a ring (rank r sends to r+1, receives from r-1) and a vector cut into W chunks:

1. Reduce-scatter, W-1 steps: at step s rank r sends chunk (r - s) and adds the chunk (r - s - 1) it receives into
   its own copy. Afterwards rank r holds chunk (r + 1) summed over all ranks.
2. All-gather, W-1 steps: at step s rank r sends chunk (r + 1 - s) and overwrites chunk (r - s) with what it
   receives. Afterwards every rank holds the full sum.

Each rank sends 2 (W-1)/W of the vector: bandwidth-optimal. Latency: the 2 (W-1) steps depend on each other, so a
step costs at least 2 (W-1) one-way hops; every step's receives are posted one step ahead (see ``ring_all_reduce``)
so each step after the first costs one hop, as the built-in's does (docs/multihost.md, "Latency").

Chunks are cut into segments of ``segment_bytes`` so a large tensor is never one giant message (an unsegmented ring
measured 2.2-2.5x the built-in at 400 MB here); every segment's receive is posted up front and added as soon as it
lands, overlapping the additions with the transfers. Chunks of at most four segments go whole (measured at 4 MB: 1 MB
segments 1.6x the built-in, whole chunks 1.07x).

Encrypted (``protect.codecs.ring``), the codec names the ring's members: a member whose ciphertext or partial
decryption fails validation is excluded by all the others alike, and the ring closes over the survivors; by default
the codec sums ciphertexts by all-gathering them rather than on the ring (docs/wire.md, "The encrypted ring's
protocols"). The plaintext ring is every rank of the job, always.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import protect
from ..comm import Comm
from ..config import RunConfig
from ..errors import ConfigError
from ..replica import Replica
from ..tags import PATTERN_ROUNDS
from .base import PATTERNS, GradientAveraging

__all__ = ["ring_all_reduce", "Ring"]


def ring_all_reduce(
    comm: Comm,
    flat: torch.Tensor,
    segment_bytes: int = 1 << 20,
    codec: Any = None,
    observe: Callable[[str, Any], None] | None = None,
) -> torch.Tensor:
    """Sum the 1-D tensor ``flat`` over the ring's members in place, over point-to-point messages only.

    ``codec``: what the reduce-scatter carries (``protect.codecs.ring.RingCodec``: ciphertexts, combined
    homomorphically, each rank's chunk revealed by every key holder's partial decryption); None: plaintext, added in
    place, over every rank of the job. Both follow the same schedule and end with the same all-gather of plaintext
    sums. The codec names the members (ranks it excluded are left out: ``flat`` comes back unchanged on them) and
    may settle a round another way (``RingCodec.gathers``, ``agree``, ``gather_sum``): every round under its default
    protocol, and a round in which a member refused a payload under the reduce-scatter one.
    ``observe(kind, payload)`` is shown the first ciphertext received from the previous rank (gathered: the previous
    member's bytes)."""
    members = list(range(comm.world_size)) if codec is None else codec.begin_round()
    if comm.rank not in members or len(members) == 1:
        return flat
    if flat.dim() != 1 or not flat.is_contiguous():
        raise ValueError("ring_all_reduce expects a contiguous 1-D tensor")
    world, pos = len(members), members.index(comm.rank)
    n = flat.numel()
    bounds = [n * i // world for i in range(world + 1)]
    largest = max(b - a for a, b in zip(bounds, bounds[1:]))
    # Chunks up to 4 segments travel whole: there, the per-message cost outweighs what overlapping would save.
    segment = max(1, segment_bytes // flat.element_size())
    if largest <= 4 * segment:
        segment = max(1, largest)
    # (chunk sent, chunk received, reduce?) per step, chunks by position in the ring: W-1 reduce-scatter steps, then
    # W-1 all-gather steps
    steps = [((pos - s) % world, (pos - s - 1) % world, True) for s in range(world - 1)]
    steps += [((pos + 1 - s) % world, (pos - s) % world, False) for s in range(world - 1)]
    ring = (members[(pos + 1) % world], members[(pos - 1) % world])  # (next, previous)
    first = 0
    if codec is not None:  # the reduce-scatter on the codec's payloads; the all-gather below, on the sums
        if codec.gathers:  # the codec's default, and after a dispute: every member sums every ciphertext itself
            return codec.gather_sum(flat, observe)
        original = flat.clone()
        _codec_reduce_scatter(flat, bounds, steps[: world - 1], codec, observe, pos, ring)
        if not codec.agree():  # a member refused a payload: every member settles the round again, together
            return codec.gather_sum(flat.copy_(original), observe)
        first = world - 1
    _run_steps(comm, flat, bounds, steps, first, segment, largest, ring)
    return flat


def _codec_reduce_scatter(
    flat: torch.Tensor,
    bounds: list[int],
    steps: list[tuple[int, int, bool]],
    codec: Any,
    observe: Callable[[str, Any], None] | None,
    pos: int,
    ring: tuple[int, int],
) -> None:
    """Reduce-scatter through ``codec``: encode every chunk, pass one chunk a step to the next rank and combine what
    the previous one sends (validated by ``codec.exchange`` first; a refused one is left out and the codec flags
    the round), then reveal the chunk this rank owns into ``flat``: afterwards the rank at position p holds chunk
    p+1 summed over all members, as the plaintext reduce-scatter leaves it."""
    world = len(bounds) - 1
    chunks = codec.encode([flat[bounds[j] : bounds[j + 1]] for j in range(world)])
    nxt, prv = ring
    for s, (send_j, recv_j, _) in enumerate(steps):
        raw, incoming = codec.exchange(chunks[send_j], nxt, prv, bounds[recv_j + 1] - bounds[recv_j])
        if observe is not None and s == 0:  # what a peer sees of its neighbour: the codec's bytes
            observe("ciphertext", (raw, prv))
        if incoming is not None:
            chunks[recv_j] = codec.combine([chunks[recv_j], incoming])
    mine = (pos + 1) % world
    revealed = codec.reveal(chunks[mine], mine, bounds)
    if revealed is not None:
        flat[bounds[mine] : bounds[mine + 1]] = revealed.to(flat.dtype)


def _run_steps(
    comm: Comm,
    flat: torch.Tensor,
    bounds: list[int],
    steps: list[tuple],
    first: int,
    segment: int,
    largest: int,
    ring: tuple[int, int],
) -> None:
    """Steps ``first``.. of the ring on plaintext tensors, each step's receives posted one step ahead."""
    world = len(bounds) - 1
    # two scratch buffers (one for W = 2): a step's receives are posted while the step before adds from the other
    scratch = [torch.empty(largest, dtype=flat.dtype, device=flat.device) for _ in range(min(2, world - 1))]
    # named locals, not ring[0] / ring[1]: a failed wait's one-line error names the peer from this frame's ints
    # (launch.describe_failure)
    nxt, prv = ring
    posted = _post_receives(comm, flat, bounds, steps, first, segment, scratch, prv)
    for k in range(first, len(steps)):
        # Post the next step's receives before this step's messages are waited for. gloo sends only once the peer
        # has posted the matching receive (docs/faults.md), so a receive posted when its step starts costs a second
        # one-way hop per step (the notice, then the data). Measured with 4 ranks and 50 ms one way: a training
        # step took 611 ms with receives posted at each step's start (12 hops, as the built-in's 609 ms), 366 ms now
        # (7 hops: the first step's notice, then one per step; docs/multihost.md, "Latency").
        last = k + 1 >= len(steps)
        ahead = [] if last else _post_receives(comm, flat, bounds, steps, k + 1, segment, scratch, prv)
        send_chunk = steps[k][0]
        s0, s1 = bounds[send_chunk], bounds[send_chunk + 1]
        tag = PATTERN_ROUNDS + k
        sends = [comm.isend(flat[start : min(start + segment, s1)], nxt, tag) for start in range(s0, s1, segment)]
        for work, start, stop, target, reduce in posted:
            comm.wait(work)
            if reduce:
                flat[start:stop].add_(target)
        for work in sends:
            comm.wait(work)
        posted = ahead


def _post_receives(
    comm: Comm,
    flat: torch.Tensor,
    bounds: list[int],
    steps: list[tuple[int, int, bool]],
    k: int,
    segment: int,
    scratch: list[torch.Tensor],
    prv: int,
) -> list[tuple]:
    """Post step ``k``'s receives from the previous rank ``prv``: into a scratch buffer to be added (reduce-scatter),
    or straight into ``flat`` (all-gather: that chunk's reduce-scatter use ended before ``prv`` can send it)."""
    _, recv_chunk, reduce = steps[k]
    r0, r1 = bounds[recv_chunk], bounds[recv_chunk + 1]
    out = []
    for start in range(r0, r1, segment):
        stop = min(start + segment, r1)
        target = scratch[k % 2][start - r0 : stop - r0] if reduce else flat[start:stop]
        out.append((comm.irecv(target, prv, PATTERN_ROUNDS + k), start, stop, target, reduce))
    return out


@PATTERNS.register("ring")
class Ring(GradientAveraging):
    """With ``--encrypt ckks --keys threshold`` the ring carries ciphertexts (the job's codec,
    ``protect.codecs.ring``); every rank is a key party, so shared keys would let any neighbour decrypt what it
    relays: the ring offers no keyless aggregator, which shared keys need."""

    name = "ring"
    offers = GradientAveraging.offers | {"codec-payload", "no-plaintext-state"}
    encryption_note = "in a ring every peer relays its neighbours' data, so only threshold keys protect it"

    def attach(self, replica: Replica) -> None:
        super().attach(replica)
        self.codec = self.protections.peer_codec(self.comm)  # None: plaintext

    @classmethod
    def offers_for(cls, cfg: RunConfig) -> frozenset[str]:
        """Encrypted, the ring excludes a member whose bytes fail validation and goes on (the codec's gather steps)."""
        return cls.offers | {"excludes-workers"} if protect.build(cfg).encrypted else cls.offers

    @classmethod
    def validate(cls, cfg: RunConfig) -> None:
        if cfg.pattern.min_replicas > cfg.workers:
            raise ConfigError(
                f"--min-replicas {cfg.pattern.min_replicas} is more than the {cfg.workers} workers of the job"
            )

    def sum(self, flat: torch.Tensor) -> torch.Tensor:
        return ring_all_reduce(self.comm, flat, self.cfg.pattern.segment_kb * 1024, self.codec, self.tap)

    def replicas(self) -> int:
        """The encrypted ring's members: the survivors once the codec excluded a sender."""
        return len(self.codec.members) if self.codec is not None else self.comm.world_size

    def stats(self) -> dict[str, Any]:
        return self.codec.cost() if self.codec is not None else {}
