"""Synchronous data parallelism against plain references (docs/architecture.md §5)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from harness import run_ranks

from trustgrad.comm import Comm
from trustgrad.config import RunConfig
from trustgrad.data import load_dataset, shard_indices
from trustgrad.models import build_model
from trustgrad.patterns.ring import ring_all_reduce
from trustgrad.replica import Replica, make_optimizer
from trustgrad.run import run
from trustgrad.seeding import batch_indices


def _ring_vs_builtin(ctx, lengths, segment_bytes):
    comm = Comm(ctx, timeout=60)
    worst = 0.0
    for n in lengths:
        g = torch.Generator().manual_seed(1000 * ctx.rank + n)
        x = torch.randn(n, generator=g, dtype=torch.float32)
        ours = ring_all_reduce(comm, x.clone(), segment_bytes)
        ref = x.clone()
        dist.all_reduce(ref)
        rel = float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        worst = max(worst, rel)
    return worst


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ring_all_reduce_equals_engine_all_reduce(world):
    # lengths that do not divide by the world size, one shorter than it, and one spanning many segments
    lengths = [1, world - 1 or 1, 1001, 4097, 100_003]
    worst = run_ranks(_ring_vs_builtin, world, lengths, 4096)
    assert max(worst) <= 1e-6, worst


def _reference_state(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """One process, one model, the concatenation of every worker's batch per step."""
    ds = load_dataset(cfg.dataset)
    model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, cfg.seed, cfg.model)
    replica = Replica(model, make_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay))
    shards = [shard_indices(len(ds.x_train), w, cfg.workers, cfg.seed) for w in range(cfg.workers)]
    steps_per_epoch = len(shards[0]) // cfg.batch_size
    step = 0
    for epoch in range(cfg.epochs):
        for s in range(steps_per_epoch):
            if step == cfg.max_steps:
                return model.state_dict()
            idx = torch.cat(
                [
                    torch.from_numpy(batch_indices(sh, cfg.seed, w, epoch, s, cfg.batch_size))
                    for w, sh in enumerate(shards)
                ]
            )
            replica.compute_gradients(ds.x_train[idx], ds.y_train[idx])
            replica.step()
            step += 1
    return model.state_dict()


@pytest.mark.parametrize("pattern", ["allreduce", "ring"])
def test_two_workers_match_one_process_on_the_combined_batch(pattern):
    cfg = RunConfig(workers=2, epochs=2, max_steps=30, batch_size=16, lr=0.05, momentum=0.9, seed=7, progress=False)
    cfg = cfg.replace(pattern={"name": pattern, "segment_kb": 4})
    result = run(cfg)
    reference = _reference_state(cfg)
    assert result.summary["steps"] == 30
    for name, ref in reference.items():
        torch.testing.assert_close(result.state[name], ref, atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


class _UnusedHead(torch.nn.Module):
    """Conv, BatchNorm and a head, plus a layer forward never uses (its gradient stays zero, as in ``flat_grad``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten()
        )
        self.unused = torch.nn.Linear(5, 5)
        self.head = torch.nn.Linear(4 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _overlapped_vs_flat(ctx, steps, tapped, ride):
    from trustgrad.patterns.allreduce import AllReduce
    from trustgrad.patterns.base import GradientAveraging
    from trustgrad.patterns.buckets import GradBuckets

    comm = Comm(ctx, timeout=60)
    pattern = AllReduce(RunConfig(workers=ctx.world_size, progress=False), comm)
    replicas = []
    for _ in range(2):
        torch.manual_seed(0)
        model = _UnusedHead()
        replicas.append(Replica(model, make_optimizer(model, 0.1, momentum=0.9)))
    overlapped, flat = replicas
    # buckets of a few hundred bytes: this small model spans several, the last left for flush (the unused layer)
    # ride: the BatchNorm statistics travel in the last bucket (as ``attach`` builds them), else in their own sum
    buffers = overlapped.buffers if ride else None
    pattern.buckets = GradBuckets(overlapped.params, comm, first=64, cap=128, buffers=buffers)
    seen = []
    if tapped and ctx.rank == 0:  # one rank fills its buckets after backward, the other during it
        pattern.taps.append(lambda kind, payload: seen.append((kind, payload.clone())))
    g = torch.Generator().manual_seed(ctx.rank)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
        pattern.step(overlapped, x, y)
        GradientAveraging.step(pattern, flat, x, y)
    pairs = zip(overlapped.model.state_dict().values(), flat.model.state_dict().values())
    diffs = [(a - b).abs().max().item() for a, b in pairs]
    # each step shows the observer the overlapped path's gradient and aggregate, then the flat path's: pairwise equal
    assert [kind for kind, _ in seen] == (["gradient", "aggregate"] * 2 * steps if tapped and ctx.rank == 0 else [])
    diffs += [(seen[i][1] - seen[i + 2][1]).abs().max().item() for i in range(0, len(seen), 4) for i in (i, i + 1)]
    return len(pattern.buckets.plan), max(diffs)


@pytest.mark.parametrize("world,tapped,ride", [(2, False, True), (2, True, True), (3, False, True), (2, False, False)])
def test_allreduce_overlapped_buckets_match_the_flat_all_reduce(world, tapped, ride):
    # two workers: one addition per entry, bit-identical; three: gloo may add in another order per bucket (fp32);
    # tapped: rank 0 has an observer, so it fills its buckets after backward while rank 1 fills them during it;
    # the state compared includes the BatchNorm running statistics, averaged in the last bucket or on their own
    results = run_ranks(_overlapped_vs_flat, world, 3, tapped, ride)
    assert all(buckets >= 3 for buckets, _ in results), results
    worst = max(diff for _, diff in results)
    assert worst == 0.0 if world == 2 else worst <= 1e-6, results


@pytest.mark.parametrize("sizes,first,last", [([4, 4, 4, 4], 16, 8), ([1, 1, 1, 4], 16, 8), ([1, 2, 1, 1, 4], 16, 8)])
def test_bucket_plans_keep_every_parameter_once_in_backward_order(sizes, first, last):
    from trustgrad.patterns.buckets import plan_buckets

    plan = plan_buckets(sizes, 4, first=first, cap=64, last=last)
    assert [i for bucket in plan for i in bucket] == list(reversed(range(len(sizes))))
    assert all(plan) and (len(plan[-1]) == 1 or sum(sizes[i] for i in plan[-1]) * 4 <= last)


def test_resnet18s_final_bucket_holds_only_what_backward_reaches_last():
    # DDP's sizes (1 MB first, 25 MB cap) left layer3 and layer2 (8.7 MB) waiting for conv1 in the final bucket
    from trustgrad.patterns.buckets import BUCKET_BYTES, FIRST_BUCKET_BYTES, plan_buckets

    model = build_model("resnet18", (3, 32, 32), 10, 0, RunConfig().replace(model={"name": "resnet18"}).model)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    plan = plan_buckets([p.numel() for p in params], 4, FIRST_BUCKET_BYTES, BUCKET_BYTES)
    final = plan[-1]
    assert sum(params[i].numel() for i in final) * 4 <= FIRST_BUCKET_BYTES
    assert names[final[-1]] == "conv1.weight" and not any(names[i].startswith("layer3") for i in final)
    assert sum(params[i].numel() for i in plan[-2]) * 4 > 7e6  # layer3's sum starts before backward reaches layer1
