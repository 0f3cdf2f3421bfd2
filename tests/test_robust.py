"""Robust rules against their definitions, the colluding attacks against their formulas, the Dirichlet partition,
and the gate's refusal of what it must not aggregate (in-process, fast)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from trustgrad.attacks import colluding
from trustgrad.data import dirichlet_shards, load_dataset
from trustgrad.errors import ConfigError
from trustgrad.robust import Gate, parse_aggregate, rules

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
stacks = st.integers(1, 9).flatmap(
    lambda n: st.integers(1, 5).flatmap(
        lambda d: st.lists(st.lists(finite, min_size=d, max_size=d), min_size=n, max_size=n)
    )
)


def test_krum_and_multi_krum_pick_the_constructed_rows():
    # 5 honest rows near the origin, 2 far away: with f=2 each score sums n - f - 2 = 3 nearest squared distances
    g = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.1, 0.1], [0.05, 0.05], [5.0, 5.0], [5.0, 5.1]])
    scores = rules.krum_scores(g, 2)
    by_hand = []
    for i in range(len(g)):
        d = sorted(float(((g[i] - g[j]) ** 2).sum()) for j in range(len(g)) if j != i)
        by_hand.append(sum(d[:3]))
    assert scores.tolist() == pytest.approx(by_hand)
    agg, chosen = rules.krum(g, 2)
    assert chosen == [4] and agg.tolist() == pytest.approx([0.05, 0.05])  # the centre of the honest square
    agg, chosen = rules.multi_krum(g, 2, 5)
    assert chosen == [0, 1, 2, 3, 4] and agg.tolist() == pytest.approx(g[:5].double().mean(0).tolist())


@settings(max_examples=60, deadline=None)
@given(stacks, st.floats(0.0, 0.49))
def test_median_and_trimmed_mean_equal_numpy(rows, trim):
    g = torch.tensor(rows, dtype=torch.float32)
    a = np.asarray(rows, dtype=np.float64)
    np.testing.assert_allclose(rules.median(g)[0].numpy(), np.median(a, axis=0), rtol=1e-12, atol=1e-9)
    b = math.floor(trim * len(a))
    ref = np.sort(a, axis=0)[b : len(a) - b].mean(0)
    np.testing.assert_allclose(rules.trimmed_mean(g, b)[0].numpy(), ref, rtol=1e-12, atol=1e-9)


def _bulyan_by_definition(a: np.ndarray, f: int) -> np.ndarray:
    """El Mhamdi et al. 2018, Alg. 1, written out in numpy from the paper (not from rules.py)."""
    left, chosen = list(range(len(a))), []
    while len(chosen) < len(a) - 2 * f:
        sub = a[left]
        d = ((sub[:, None, :] - sub[None, :, :]) ** 2).sum(-1)
        k = min(max(1, len(left) - f - 2), len(left) - 1)
        scores = [np.sort(np.delete(d[i], i))[:k].sum() for i in range(len(left))] if len(left) > 1 else [0.0]
        chosen.append(left.pop(int(np.argmin(scores))))
    sel = a[sorted(chosen)]
    beta = len(sel) - 2 * f
    med = np.median(sel, axis=0)
    out = np.empty(a.shape[1])
    for j in range(a.shape[1]):
        out[j] = sel[np.argsort(np.abs(sel[:, j] - med[j]), kind="stable")[:beta], j].mean()
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(7, 12).flatmap(lambda n: st.lists(st.lists(finite, min_size=3, max_size=3), min_size=n, max_size=n)))
def test_bulyan_is_krum_selection_then_trimmed_around_the_median(rows):
    a = np.asarray(rows, dtype=np.float64)
    f = (len(a) - 3) // 4
    got, chosen = rules.bulyan(torch.tensor(rows), f)
    assert len(chosen) == len(a) - 2 * f
    np.testing.assert_allclose(
        got.numpy(), _bulyan_by_definition(a.astype(np.float32).astype(np.float64), f), atol=1e-9
    )
    # f = 0 keeps every row and every value: Bulyan is then the mean
    np.testing.assert_allclose(rules.bulyan(torch.tensor(rows), 0)[0].numpy(), a.mean(0), rtol=1e-6, atol=1e-3)


def test_centered_clipping_fixed_point_and_radius():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    # every row within tau of the centre: one iteration lands on the mean, and the mean is a fixed point
    mean = g.mean(0)
    v, kept = rules.centered_clipping(g, mean + 0.01, tau=100.0)
    assert torch.allclose(v, mean) and kept == list(range(8))
    assert torch.allclose(rules.centered_clipping(g, mean, tau=100.0)[0], mean)
    # with a small radius, many iterations converge to v* with sum_i clip(g_i - v*) = 0 (the rule's fixed point)
    far = torch.cat([g, torch.full((2, 5), 50.0, dtype=torch.float64)])
    v, _ = rules.centered_clipping(far, torch.zeros(5, dtype=torch.float64), tau=0.5, iters=2000)
    assert rules.clip(far - v, 0.5).sum(0).norm() < 1e-6
    # each step moves the centre by at most tau, whatever the outliers push
    step, _ = rules.centered_clipping(far, torch.zeros(5, dtype=torch.float64), tau=0.5)
    assert float(step.norm()) <= 0.5 + 1e-12


def test_gate_refuses_non_finite_rows_and_shrinks_f():
    g = torch.zeros(6, 3)
    g[1:5] += torch.arange(4.0)[:, None] * 0.1
    g[5] = float("nan")
    v = Gate.from_spec("krum,f=2")(g, senders=[10, 11, 12, 13, 14, 15])
    assert v.reasons == {15: "non-finite values"} and 15 in v.excluded
    assert torch.isfinite(v.update).all() and len(v.admitted) == 1
    # all rows unusable: nothing admitted, a zero update
    v = Gate.from_spec("median")(torch.full((3, 2), float("inf")))
    assert v.admitted == () and v.update.abs().sum() == 0 and len(v.reasons) == 3


@pytest.mark.parametrize(
    "spec",
    ["", "nope", "krum,f", "krum,f=x", "krum,f=-1", "krum,g=1", "krum,f=1,f=2", "median,f=1", "trimmed-mean,trim=0.5",
     "centered-clipping,tau=0", "centered-clipping,tau=inf", "centered-clipping,tau=nan", "krum,f=1e999", "x" * 300,
     "krum,f=99999999999", "multi-krum,m=\x00"],
)  # fmt: skip
def test_bad_specs_are_one_line_config_errors(spec):
    with pytest.raises(ConfigError) as info:
        parse_aggregate(spec)
    assert "\n" not in str(info.value)


def test_random_specs_never_escape_as_anything_but_config_errors():
    rng = random.Random(18)
    alphabet = "krumedian-tcplgyfswa=,.0123456789e+-_ \t\x00é"
    for _ in range(3000):
        spec = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        try:
            rule = parse_aggregate(spec)
        except ConfigError as exc:
            assert "\n" not in str(exc)
        else:  # whatever parses is a valid rule that runs on a round
            assert Gate(rule)(torch.randn(20, 3)).update.shape == (3,)


# ------------------------------------------------------------------------------------------------------ attacks
def test_alie_ipm_against_their_formulas():
    h = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for n, f in ((8, 2), (50, 12), (4, 1)):
        s = math.floor(n / 2 + 1) - f
        assert colluding.alie_z(n, f) == pytest.approx(norm.ppf((n - s) / n), abs=1e-9)
    mu, sd = h.numpy().mean(0), h.numpy().std(0, ddof=1)
    np.testing.assert_allclose(colluding.alie(h, 8, 2).numpy(), mu - norm.ppf(5 / 8) * sd, rtol=1e-9)
    np.testing.assert_allclose(colluding.alie(h, 8, 2, z=1.5).numpy(), mu - 1.5 * sd, rtol=1e-9)
    np.testing.assert_allclose(colluding.ipm(h, 0.1).numpy(), -0.1 * mu, rtol=1e-12)


@pytest.mark.parametrize("attack", ["min-max", "min-sum"])
def test_min_max_and_min_sum_take_the_largest_gamma_their_constraint_allows(attack):
    h = torch.randn(6, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mu, p = h.mean(0), -h.std(0)
    m = colluding.COLLUDING[attack](h, 8, 2, 1.0)
    gamma = float((m - mu).norm() / p.norm())
    assert gamma > 0.1

    def within(g: float) -> bool:
        x = mu + g * p
        if attack == "min-max":
            return float((x - h).norm(dim=1).max()) <= float(torch.cdist(h, h).max())
        return float((x - h).pow(2).sum()) <= float(torch.cdist(h, h).pow(2).sum(1).max())

    assert within(gamma) and not within(gamma * 1.001)


def test_krum_takes_the_ipm_vector_and_the_backdoor_trigger_is_a_patch():
    h = torch.randn(6, 50, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.2
    bad = colluding.ipm(h, 0.1)
    _, chosen = rules.krum(torch.cat([h, bad.expand(2, -1)]), 2)
    assert chosen[0] in (6, 7)  # two identical vectors near the origin beat every honest one: the attack's design
    x = torch.zeros(3, 1, 8, 8)
    t = colluding.apply_trigger(x, colluding.Trigger())
    assert float(t.sum()) == 3 * 4 and float(t[0, 0, -2:, -2:].sum()) == 4 and float(x.sum()) == 0


# --------------------------------------------------------------------------------------------------------- data
def test_dirichlet_shards_are_equal_disjoint_seeded_and_skewed():
    y = load_dataset("digits").y_train.numpy()
    shards = dirichlet_shards(y, 8, seed=0, alpha=0.1)
    assert [len(s) for s in shards] == [len(y) // 8] * 8
    every = np.concatenate(shards)
    assert len(np.unique(every)) == len(every)
    assert all((a == b).all() for a, b in zip(shards, dirichlet_shards(y, 8, seed=0, alpha=0.1)))
    assert any((a != b).any() for a, b in zip(shards, dirichlet_shards(y, 8, seed=1, alpha=0.1)))

    def top_share(ss):
        return float(np.mean([np.bincount(y[s], minlength=10).max() / len(s) for s in ss]))

    assert top_share(shards) > 0.35 and top_share(dirichlet_shards(y, 8, seed=0, alpha=1000)) < 0.2


def test_centered_clipping_with_momentum_clips_each_senders_momentum():
    gen = torch.Generator().manual_seed(4)
    g1, g2 = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    gate = Gate.from_spec("centered-clipping,tau=100,beta=0.5")
    # a radius nothing reaches: the rule returns the mean of the momenta, which start at the first gradient
    assert torch.allclose(gate(g1, [3, 1, 2, 0]).update, g1.mean(0), atol=1e-6)
    momenta = 0.5 * g1 + 0.5 * g2
    assert torch.allclose(gate(g2, [3, 1, 2, 0]).update, momenta.mean(0), atol=1e-6)
    assert torch.allclose(gate.momenta[3].float(), momenta[0], atol=1e-6)


@pytest.mark.parametrize("attack", ["alie", "ipm", "min-max", "min-sum", "backdoor"])
def test_colluders_are_honest_before_from_step_and_audits_catch_their_first_poisoned_push(attack):
    from trustgrad.config import PatternConfig, ProofConfig, RunConfig
    from trustgrad.experiments.robustness.rounds import SyncRounds

    cfg = RunConfig(
        pattern=PatternConfig(name="ps"), proof=ProofConfig(mode="audit"), workers=4, max_steps=4, epochs=1,
        malicious=(f"rank=4,attack={attack},from-step=2", f"rank=3,attack={attack},from-step=2"), progress=False,
    )  # fmt: skip
    out = SyncRounds(cfg).run()
    assert out["excluded_at"] == {2: 2, 3: 2} and out["audit"]["audited_claims"] == 4 + 4 + 4 + 2


def test_audit_exclusion_at_step_0_ends_exactly_on_the_honest_workers_alone():
    # docs/robustness.md's honest-only anchor: an attacker excluded at its first push leaves the run of the others
    # on their own shards, bit for bit, so any gap to the all-honest run is the excluded worker's data, not the audit
    from trustgrad.config import PatternConfig, RunConfig
    from trustgrad.experiments.robustness.rounds import SyncRounds

    cfg = RunConfig(
        pattern=PatternConfig(name="ps"), workers=4, max_steps=4, epochs=1, partition="dirichlet",
        partition_alpha=0.1, progress=False,
    )  # fmt: skip
    audited = SyncRounds(cfg.replace(proof={"mode": "audit"}, malicious=("rank=4,attack=ipm",)))
    alone = SyncRounds(cfg, absent=[4])
    assert audited.run()["excluded_at"] == {3: 0} and alone.run()["excluded_at"] == {}
    assert all(torch.equal(a, b) for a, b in zip(audited.model.parameters(), alone.model.parameters()))
