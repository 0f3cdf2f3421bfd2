"""Gradient buckets that start their all-reduce while backward still runs, as PyTorch's DDP overlaps communication.

Parameters are cut into buckets in reverse order (backward finishes the last layers first): a small first bucket, so
communication starts early, then buckets of about 25 MB (DDP's ``bucket_cap_mb`` and first-bucket defaults), and a
small final one (see ``plan_buckets``). After the sum each ``p.grad`` is a view of its bucket. A hook
after each parameter's gradient is accumulated copies it into its bucket, scaled by 1/W on the way (one pass over the
gradient instead of a copy and then a division of the sum); a full bucket's sum is started at once, but always in
bucket order, so every rank starts the same collectives in the same order even if hooks fire differently.

Each entry is the sum of the same W values / W as the one flat all-reduce it replaces computes, scaled before the sum
instead of after: for W a power of two the scaling is exact, so with two workers the mean is bit-identical (one
addition commutes, and halving commutes with rounding); otherwise the engine's ring may add in another order and the
scaling rounds once per value (fp32 rounding only).

``buffers`` (BatchNorm running statistics) ride at the end of the last bucket: they are final once forward is done,
before the last bucket starts, and one collective fewer per step is one rendezvous of the ranks fewer (on a loaded
machine each costs the time until the peer is scheduled). DDP with ``forward_sync_buffers=False`` sends none.
"""

from __future__ import annotations

import torch

from ..comm import Comm, Pending

__all__ = ["GradBuckets", "FIRST_BUCKET_BYTES", "BUCKET_BYTES"]

FIRST_BUCKET_BYTES = 1 << 20
BUCKET_BYTES = 25 << 20


def plan_buckets(sizes: list[int], itemsize: int, first: int, cap: int, last: int | None = None) -> list[list[int]]:
    """Parameter indices per bucket, last parameter first; a bucket closes once it holds ``first`` (the first
    bucket) or ``cap`` bytes. Then the final bucket gives the parameters backward reaches last, up to ``last`` bytes
    (default ``first``; at least one parameter), a bucket of their own.

    Why the final split: that bucket can only start once backward is over, so its whole all-reduce is exposed. A
    convolutional network's first layers hold few parameters but much of backward's compute (the largest feature
    maps): in ResNet-18, DDP's sizes put layer3's and layer2's 8.7 MB in one bucket with conv1 and wait for conv1;
    split, 7.8 MB of them are summed while backward works through layer2's first block, layer1 and conv1, and 0.9 MB
    are left exposed.

    >>> plan_buckets([4, 4, 4, 4], 4, first=16, cap=32)
    [[3], [2, 1], [0]]
    >>> plan_buckets([4, 4, 4, 4], 4, first=16, cap=64, last=8)
    [[3], [2, 1], [0]]
    >>> plan_buckets([1, 1, 1, 4], 4, first=16, cap=64, last=8)
    [[3], [2], [1, 0]]
    >>> plan_buckets([1, 2, 1, 1, 4], 4, first=16, cap=64, last=8)
    [[4], [3, 2, 1], [0]]
    """
    buckets: list[list[int]] = [[]]
    filled = 0
    for i in reversed(range(len(sizes))):
        buckets[-1].append(i)
        filled += sizes[i] * itemsize
        if filled >= (first if len(buckets) == 1 else cap) and i > 0:
            buckets.append([])
            filled = 0
    limit = first if last is None else last
    tail = buckets[-1]
    if len(buckets) > 1 and len(tail) > 1 and sum(sizes[i] for i in tail) * itemsize > limit:
        split = len(tail) - 1  # tail[split:] moves: the last parameter always, earlier ones while they fit
        room = limit - sizes[tail[split]] * itemsize
        while split > 1 and sizes[tail[split - 1]] * itemsize <= room:
            split -= 1
            room -= sizes[tail[split]] * itemsize
        buckets[-1:] = [tail[:split], tail[split:]]
    return buckets


class GradBuckets:
    """One replica's buckets; ``arm`` before backward, ``finish`` after it (which waits and leaves the mean in
    ``p.grad``); ``flush`` between them starts every bucket, so a collective started next follows all of them.
    Unarmed, the hooks do nothing, so a step that needs the whole flat gradient can take the plain path.
    """

    def __init__(self, params: list[torch.nn.Parameter], comm: Comm, first: int = FIRST_BUCKET_BYTES,
                 cap: int = BUCKET_BYTES, buffers: list[torch.Tensor] | None = None):  # fmt: skip
        self.params, self.comm = params, comm
        self.buffers = list(buffers or [])  # averaged with the gradient, in the last bucket's tail
        if any(b.dtype != params[0].dtype for b in self.buffers):
            raise ValueError("buffers ride in a gradient bucket only in the parameters' dtype")
        self.plan = plan_buckets([p.numel() for p in params], params[0].element_size(), first, cap)
        like = {"dtype": params[0].dtype, "device": params[0].device}
        sizes = [sum(params[i].numel() for i in b) for b in self.plan]
        self._tail = sizes[-1]  # where the buffers start in the last bucket
        sizes[-1] += sum(b.numel() for b in self.buffers)
        self.flats = [torch.zeros(n, **like) for n in sizes]
        self.bucket_of = [0] * len(params)
        #: each parameter's place in its bucket, shaped like it: the hooks write there and ``p.grad`` becomes it
        self.views: list[torch.Tensor] = [params[0]] * len(params)
        for b, members in enumerate(self.plan):
            offset = 0
            for i in members:
                n = params[i].numel()
                self.bucket_of[i], self.views[i] = b, self.flats[b][offset : offset + n].view_as(params[i])
                offset += n
        self.scale = 1.0 / comm.world_size
        self.armed = False
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(params)]

    def arm(self, early: bool = True) -> None:
        """Start a step; ``early``: the hooks fill buckets during backward (else ``flush`` fills all of them)."""
        self.armed = early
        self._missing = [len(b) for b in self.plan]
        self._seen = [False] * len(self.params)
        self._pending: list[Pending] = []

    def _hook(self, i: int):  # noqa: ANN202
        def ready(p: torch.Tensor) -> None:
            if self.armed:
                self._add(i, p.grad)

        return ready

    def _add(self, i: int, grad: torch.Tensor | None) -> None:
        if self._seen[i]:
            # a second accumulation in one step would change a gradient whose bucket may already be on the wire
            raise RuntimeError(f"parameter {i} received two gradients in one backward; overlap cannot sum it once")
        self._seen[i] = True
        if grad is None:
            self.views[i].zero_()
        else:
            torch.mul(grad, self.scale, out=self.views[i])  # a gradient accumulated in place is scaled onto itself
        self._missing[self.bucket_of[i]] -= 1
        self._launch_ready()

    def _launch_ready(self) -> None:
        # in bucket order only: gloo pairs collectives by the order ranks start them
        while len(self._pending) < len(self.plan) and self._missing[len(self._pending)] == 0:
            if len(self._pending) == len(self.plan) - 1:
                self._pack_buffers()  # backward is under way or done: forward, which updates them, is over
            self._pending.append(self.comm.all_reduce_async(self.flats[len(self._pending)]))

    def _pack_buffers(self) -> None:
        offset = self._tail
        for b in self.buffers:
            torch.mul(b.detach().reshape(-1), self.scale, out=self.flats[-1][offset : offset + b.numel()])
            offset += b.numel()

    def flush(self) -> None:
        """Start what backward left: parameters it never reached count as zero gradients, as ``flat_grad`` does."""
        for i, p in enumerate(self.params):
            if not self._seen[i]:
                self._add(i, p.grad)
        self.armed = False

    def finish(self) -> None:
        """``flush``, wait for every bucket, and write the mean over ranks into each ``p.grad`` (and each buffer)."""
        self.flush()
        for b, pending in enumerate(self._pending):
            pending.wait()
            for i in self.plan[b]:
                # the mean stays where the collective left it: each p.grad becomes a view of its bucket (DDP's
                # ``gradient_as_bucket_view``), one copy of the model's gradient fewer per step. The next step's hooks
                # overwrite the bucket only after backward has given each parameter a new gradient, and the plain
                # path (``flush``) scales a gradient accumulated in place onto itself
                self.params[i].grad = self.views[i]
        offset = self._tail
        with torch.no_grad():
            for buf in self.buffers:
                buf.copy_(self.flats[-1][offset : offset + buf.numel()].view_as(buf))
                offset += buf.numel()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
