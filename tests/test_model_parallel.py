"""Model parallelism (pipeline and tensor) against one-process references (docs/architecture.md §5)."""

from __future__ import annotations

import pytest
import torch
from harness import run_ranks
from torch import nn

from trustgrad.cli import main
from trustgrad.config import ModelConfig, RunConfig
from trustgrad.data import load_dataset, shard_indices
from trustgrad.errors import ConfigError
from trustgrad.models import build_model
from trustgrad.parallel.pipeline import Pipeline, theoretical_bubble
from trustgrad.parallel.split import balanced_split, check_split_points, split_model, stage_sizes
from trustgrad.parallel.tensor import full_state, tensor_parallel
from trustgrad.replica import Replica, make_optimizer
from trustgrad.run import run
from trustgrad.seeding import batch_indices

pytestmark = pytest.mark.timeout(120)


def _mlp(depth: int = 4, hidden: int = 32) -> nn.Sequential:
    return build_model("mlp", (1, 8, 8), 10, seed=3, config=ModelConfig(depth=depth, hidden=hidden))


def _batch(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _reference_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    x, y = _batch()
    nn.functional.cross_entropy(model(x), y).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------------- split


def test_balanced_split_minimises_the_largest_stage():
    model = _mlp(depth=4, hidden=64)
    assert balanced_split(model, 2) == (5,)
    assert stage_sizes(model, (5,)) == [8320, 8970]
    for stages in (2, 3, 4, 5):
        cuts = balanced_split(model, stages)
        best = max(stage_sizes(model, cuts))
        # no single-cut move improves it (brute force over all cut sets of the layer starts)
        from itertools import combinations

        starts = [i for i, c in enumerate(model) if sum(p.numel() for p in c.parameters())][1:]
        assert best == min(max(stage_sizes(model, c)) for c in combinations(starts, stages - 1))
    stages = split_model(model, (3, 7))
    assert [len(s) for s in stages] == [3, 4, 3]
    assert set(stages[1].state_dict()) == {"3.weight", "3.bias", "5.weight", "5.bias"}


def test_bad_splits_are_config_errors():
    model = _mlp(depth=1)
    with pytest.raises(ConfigError, match="2 layers into 3 stages"):
        balanced_split(model, 3)
    with pytest.raises(ConfigError, match="strictly increasing"):
        check_split_points(model, (9,), 2)
    with pytest.raises(ConfigError, match="without parameters"):
        check_split_points(model, (1,), 2)  # stage 0 would be just Flatten
    with pytest.raises(ConfigError, match="needs 2 indices"):
        check_split_points(model, (3,), 3)


# ---------------------------------------------------------------------------------------------------- pipeline


def _pipeline_grads(ctx, schedules, cuts, microbatches):
    torch.set_num_threads(1)
    out = {}
    for schedule in schedules:  # one job runs every schedule: process start-up dominates these tests
        stage = split_model(_mlp(), cuts)[ctx.rank]
        pipe = Pipeline(stage, ctx.rank, ctx.world_size, microbatches, schedule)
        x, y = _batch()
        grads, losses = [], []
        for _ in range(2):  # twice: the second step must not accumulate onto the first
            stage.zero_grad(set_to_none=False)
            losses.append(pipe.step(x, y))
            grads.append({k: p.grad.clone() for k, p in stage.named_parameters()})
        out[schedule] = {"grads": grads, "losses": losses, "bytes": pipe.bytes_sent}
    return out


def test_pipeline_gradients_equal_one_process():
    """Three stages (first, middle, last), both schedules, 4 micro-batches of 6 against the whole model."""
    cuts, microbatches = (3, 7), 4
    out = run_ranks(_pipeline_grads, len(cuts) + 1, ["gpipe", "1f1b"], cuts, microbatches, job_timeout=100)
    model = _mlp()
    ref = _reference_grads(model)
    x, y = _batch()
    ref_loss = float(nn.functional.cross_entropy(model(x), y).detach())
    for schedule in ("gpipe", "1f1b"):
        seen = set()
        for rank, by_schedule in enumerate(out):
            o = by_schedule[schedule]
            for step_grads in o["grads"]:
                for name, g in step_grads.items():
                    # torch divides the accumulated micro-batch gradients by M (scale_grads=True): with a mean loss
                    # per micro-batch that is the mini-batch mean's gradient, so no further rescaling is needed
                    torch.testing.assert_close(torch.as_tensor(g), ref[name], atol=1e-6, rtol=0)
                    seen.add(name)
            if rank == len(out) - 1:
                assert o["losses"] == pytest.approx([ref_loss] * 2, abs=1e-6)
            else:
                assert o["losses"] == [None, None]
        assert seen == set(ref)  # every parameter lives on exactly one stage and was compared
        # per step: the first stage sends its activations (24 samples x 32 floats) forward, the last the gradient
        # w.r.t. its input back, the middle one both; two steps
        assert [by_schedule[schedule]["bytes"] for by_schedule in out] == [2 * 24 * 32 * 4 * k for k in (1, 2, 1)]


def test_theoretical_bubble():
    assert theoretical_bubble(2, 4) == pytest.approx(1 / 5)
    assert theoretical_bubble(4, 4) == pytest.approx(3 / 7)


# ---------------------------------------------------------------------------------------------------- tensor


def _tensor_parallel(ctx, depths):
    torch.set_num_threads(1)
    out = {}
    for depth in depths:
        model, _ = tensor_parallel(_mlp(depth=depth), ctx.world_size)
        x, y = _batch()
        logits = model(x)
        nn.functional.cross_entropy(logits, y).backward()
        grads = {
            k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad) for k, p in model.named_parameters()
        }
        local = {k: tuple(p.to_local().shape) for k, p in model.named_parameters() if hasattr(p, "to_local")}
        out[depth] = {"out": logits.detach(), "grads": grads, "local": local, "state": full_state(model)}
    return out


def test_tensor_parallel_forward_and_gradients_equal_one_process():
    depths = [2, 3]  # 3 linears (one pair + a replicated head); 4 linears (two pairs)
    out = run_ranks(_tensor_parallel, 2, depths, job_timeout=100)
    for depth in depths:
        model = _mlp(depth=depth)
        x, _ = _batch()
        ref_out = model(x).detach()
        ref = _reference_grads(model)
        for by_depth in out:
            o = by_depth[depth]
            torch.testing.assert_close(torch.as_tensor(o["out"]), ref_out, atol=1e-5, rtol=0)
            for name, g in ref.items():
                torch.testing.assert_close(torch.as_tensor(o["grads"][name]), g, atol=1e-6, rtol=0)
            for name, value in model.state_dict().items():
                torch.testing.assert_close(torch.as_tensor(o["state"][name]), value)
            assert o["local"]["1.weight"] == (16, 64)  # column-sharded: half the output units
            assert o["local"]["3.weight"] == (32, 16)  # row-sharded: half the input features
            assert ("5.weight" in o["local"]) == (depth == 3)  # the odd head stays whole on every rank


# ---------------------------------------------------------------------------------------------------- end to end


def _one_process(cfg: RunConfig, replicas: int = 1) -> dict[str, torch.Tensor]:
    """The whole model in one process on the concatenation of every replica's batch, step by step."""
    ds = load_dataset(cfg.dataset)
    model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, cfg.seed, cfg.model)
    replica = Replica(model, make_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay))
    shards = [shard_indices(len(ds.x_train), w, replicas, cfg.seed) for w in range(replicas)]
    for step in range(cfg.max_steps):
        idx = torch.cat(
            [torch.from_numpy(batch_indices(sh, cfg.seed, w, 0, step, cfg.batch_size)) for w, sh in enumerate(shards)]
        )
        replica.compute_gradients(ds.x_train[idx], ds.y_train[idx])
        replica.step()
    return model.state_dict()


@pytest.mark.parametrize(
    ("pattern", "workers", "extra"),
    [
        ("pipeline", 2, {"pipeline_schedule": "1f1b"}),
        ("pipeline", 4, {"stages": 2}),  # data x pipeline: 2 replicas of a 2-stage pipeline
        ("tensor", 2, {}),
    ],
)
def test_training_run_matches_one_process(pattern, workers, extra):
    cfg = RunConfig(workers=workers, epochs=1, max_steps=12, batch_size=16, lr=0.05, seed=5, progress=False)
    cfg = cfg.replace(pattern={"name": pattern, "microbatches": 4, **extra}, model={"depth": 4, "hidden": 32})
    result = run(cfg)
    reference = _one_process(cfg, replicas=workers // 2 if pattern == "pipeline" else 1)
    assert result.summary["steps"] == 12
    assert set(result.state) == set(reference)
    for name, ref in reference.items():
        torch.testing.assert_close(result.state[name], ref, atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert result.summary["bytes_sent"] > 0
    assert result.metrics and result.metrics[-1]["loss"] == result.metrics[-1]["loss"]  # a real loss, not NaN


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pattern", "pipeline", "--workers", "6", "--stages", "6", "--depth", "2"], "3 layers into 6 stages"),
        (["--pattern", "pipeline", "--workers", "2", "--batch-size", "30", "--microbatches", "4"], "must divide"),
        (["--pattern", "pipeline", "--workers", "3", "--stages", "2"], "multiple of --stages"),
        (["--pattern", "pipeline", "--workers", "2", "--pipeline-schedule", "zb"], "unknown pipeline schedule"),
        (["--pattern", "pipeline", "--workers", "2", "--split-points", "1"], "without parameters"),
        (["--pattern", "tensor", "--workers", "2", "--model", "logreg"], "no shardable layers"),
        (["--pattern", "tensor", "--workers", "3", "--hidden", "32"], "divisible by --workers 3"),
        (
            ["--pattern", "tensor", "--workers", "2", "--proof", "record", "--out", "x"],
            "--proof record is not supported",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, capsys):
    assert main(["train", "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bench_pipeline_rejects_bad_options(capsys):
    assert main(["bench", "pipeline", "--stages", "9"]) == 2  # the bench's mlp has 5 layers
    assert main(["bench", "pipeline", "--batch-size", "10", "--microbatches", "4"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "5 layers into 9 stages" in err[0] and "dividing --batch-size" in err[1], err
