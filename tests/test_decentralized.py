"""Decentralized optimization: gossip (push-sum / D-PSGD / SGP) and local SGD, against plain references.

Real processes, real gloo point-to-point messages; a killed peer is a real SIGKILL (``KILL_ENV``).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from harness import run_ranks

from trustgrad.cli import main
from trustgrad.comm import Comm
from trustgrad.config import RunConfig
from trustgrad.patterns.gossip import KILL_ENV, PushSum
from trustgrad.patterns.topology import TOPOLOGIES
from trustgrad.run import run

ROUNDS = 20


def _pure_averaging(ctx, rounds):
    """Mix rank-distinct vectors with no gradients; return max_i ||z_i - mean|| before each round, per topology."""
    comm = Comm(ctx, timeout=60)
    out = {}
    for topology in TOPOLOGIES:
        g = torch.Generator().manual_seed(ctx.rank)
        z = torch.randn(257, generator=g, dtype=torch.float64) + 3 * ctx.rank  # float64: no rounding floor
        mean = z.clone()
        dist.all_reduce(mean)
        mean /= ctx.world_size
        mixer = PushSum(comm, topology, seed=5, peer_timeout=30)
        errors = []
        for _ in range(rounds + 1):
            err = torch.tensor([float((z - mean).norm())])
            dist.all_reduce(err, op=dist.ReduceOp.MAX)
            errors.append(float(err))
            z = mixer.mix(z)
        out[topology] = (errors, mixer.weight)
    return out


def test_pure_averaging_converges_geometrically_on_four_ranks():
    results = run_ranks(_pure_averaging, 4, ROUNDS)
    by_topology = results[0]
    ring, _ = by_topology["ring"]
    # Uniform weights 1/3 on a 4-cycle: the disagreement shrinks by |lambda_2| = 1/3 each round (float64: no floor).
    for before, after in zip(ring, ring[1:]):
        if before > 1e-9:
            assert after <= before / 3 * 1.001, ring
    assert ring[ROUNDS] <= 1e-3 and ring[ROUNDS] <= 1e-3 * ring[0], ring
    # SGP's one-peer exponential graph on a power-of-two world: the exact average after log2(4) = 2 rounds.
    expo, _ = by_topology["exponential"]
    assert expo[1] < 0.75 * expo[0] and expo[2] <= 1e-5, expo
    # Random matchings: a pairwise average never moves a replica further from the mean than the farther of the two.
    pairs, _ = by_topology["random-pairs"]
    assert all(b <= a * (1 + 1e-6) + 1e-6 for a, b in zip(pairs, pairs[1:])), pairs
    assert pairs[ROUNDS] <= 1e-3, pairs
    # Push-sum weights stay 1 on these regular graphs (that is why the rule equals D-PSGD there).
    for rank_result in results:
        for topology, (_, weight) in rank_result.items():
            assert abs(weight - 1.0) < 1e-5, (topology, weight)


def _cfg(**pattern) -> RunConfig:
    return RunConfig(workers=4, epochs=10, progress=False, timeout=60).replace(pattern=pattern)


@pytest.mark.slow
def test_local_sgd_elastic_learns_with_h_times_fewer_bytes_than_allreduce(tmp_path):
    base = run(_cfg(name="allreduce").replace(out=str(tmp_path / "allreduce"))).summary
    local = run(_cfg(name="local-sgd", local_steps=4, merge="elastic", alpha=0.5).replace(out=str(tmp_path / "easgd")))
    s = local.summary
    assert s["test_accuracy"] >= 0.93, s
    assert s["steps"] == base["steps"] == 110
    assert s["communication_rounds"] == 28  # ceil(110 / 4): the last, partial exploration phase is merged too
    ratio = base["bytes_sent"] / s["bytes_sent"]
    # steps / rounds, up to the one broadcast of W0 both runs start with
    assert ratio == pytest.approx(base["steps"] / s["communication_rounds"], rel=0.01), ratio
    assert 3.8 <= ratio <= 4.0, ratio
    written = json.loads((tmp_path / "easgd" / "summary.json").read_text())
    assert written["bytes_sent"] == s["bytes_sent"] and written["reported_model"].startswith("the EASGD center")
    assert written["consensus_distance"] > 0 and written["monitor_bytes_sent"] > 0


@pytest.mark.slow
def test_gossip_exponential_learns_and_records_consensus_distance(tmp_path):
    result = run(_cfg(name="gossip", topology="exponential").replace(out=str(tmp_path)))
    s = result.summary
    assert s["test_accuracy"] >= 0.93, s
    assert s["communication_rounds"] == s["steps"] == 110 and s["peers_lost"] == []
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 10 and all(line["replicas"] == 4 for line in lines)
    assert all(0 < line["consensus_distance_rel"] < 0.1 for line in lines), lines
    assert s["consensus_distance"] == pytest.approx(lines[-1]["consensus_distance"])


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["ring", "random-pairs"])
def test_killed_peer_is_skipped_and_the_others_finish(topology, monkeypatch):
    monkeypatch.setenv(KILL_ENV, "2@15")  # rank 2 SIGKILLs itself before its step 15 (epoch 1 of 3)
    cfg = _cfg(name="gossip", topology=topology, peer_timeout=5.0).replace(epochs=3)
    result = run(cfg)
    s = result.summary
    assert s["dropped_ranks"] == [2] and s["peers_lost"] == [2], s
    assert s["steps"] == 33 and s["communication_rounds"] == 33
    assert [line["replicas"] for line in result.metrics] == [4, 3, 3]
    assert result.ranks[2] is None and all(result.ranks[r]["steps"] == 33 for r in (0, 1, 3))
    skipped = {r: result.ranks[r]["stats"]["peers_skipped"] for r in (0, 1, 3)}
    if topology == "ring":  # only rank 2's neighbours ever talk to it
        assert skipped == {0: [], 1: [2], 3: [2]}, skipped
    assert s["test_accuracy"] > 0.5, s


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--pattern", "gossip", "--topology", "star"], "unknown topology 'star'"),
        (["--pattern", "gossip", "--peer-timeout", "0"], "peer_timeout must be > 0"),
        (["--pattern", "local-sgd", "--local-steps", "0"], "local_steps (H) must be >= 1"),
        (["--pattern", "local-sgd", "--merge", "elastic", "--alpha", "1.5"], "alpha must be in (0, 1)"),
        (["--pattern", "local-sgd", "--merge", "elastic", "--alpha", "0"], "alpha must be in (0, 1)"),
        (["--pattern", "local-sgd", "--merge", "median"], "unknown merge 'median'"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(flags, message, capsys):
    assert main(["train", *flags, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_poisoning_reaches_patterns_that_step_locally():
    """A malicious wrapper rewrites p.grad itself, so gossip and local SGD train on the poisoned gradient too."""
    for name in ("gossip", "local-sgd"):
        # the poisoned gossip replicas diverge and their peers refuse non-finite messages: allow the run to end
        # with the coordinator alone (by default fewer than a majority of replicas fails it, see test_faults.py)
        cfg = _cfg(name=name, min_replicas=1).replace(epochs=2, malicious=("rank=1,attack=scale,strength=-50",))
        assert run(cfg).summary["test_accuracy"] < 0.5
