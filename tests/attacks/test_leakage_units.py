"""Unit and property tests of the leakage toolkit: metrics, defences, view validation, restarts, images, models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from trustgrad.attacks.leakage import (
    ATTACKS,
    GroundTruth,
    InputSpec,
    digits,
    lenet_relu,
    lenet_sigmoid,
    mlp_relu,
    observe_gradients,
    photo_crops,
    run_attack,
    score,
)
from trustgrad.attacks.leakage import defences as D
from trustgrad.attacks.leakage import metrics as M
from trustgrad.attacks.leakage._optim import Trial, best_of_restarts
from trustgrad.attacks.leakage.plots import save_grid
from trustgrad.errors import AttackError, ConfigError


def _images(channels: int):
    shape = st.tuples(st.just(channels), st.integers(4, 20), st.integers(4, 20))
    return shape.flatmap(
        lambda s: st.tuples(
            hnp.arrays(np.float64, s, elements=st.floats(0, 1)), hnp.arrays(np.float64, s, elements=st.floats(0, 1))
        )
    )


# --- metrics ------------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(pair=st.one_of(_images(1), _images(3)))
def test_ssim_is_one_on_identity_symmetric_and_bounded(pair):
    a, b = (torch.from_numpy(v) for v in pair)
    assert M.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert M.ssim(a, b) == pytest.approx(M.ssim(b, a), abs=1e-12)
    assert -1.0 - 1e-9 <= M.ssim(a, b) <= 1.0 + 1e-9


@settings(max_examples=40, deadline=None)
@given(pair=st.one_of(_images(1), _images(3)))
def test_psnr_and_mse_properties(pair):
    a, b = (torch.from_numpy(v) for v in pair)
    assert M.psnr(a, a) == math.inf
    assert M.mse(a, a) == 0.0
    assert M.psnr(a, b) == M.psnr(b, a)
    if M.mse(a, b) > 0:
        # the peak enters as range^2: doubling the range adds exactly 20 log10(2) dB
        assert M.psnr(a, b, data_range=2.0) == pytest.approx(M.psnr(a, b) + 20 * math.log10(2.0))
        assert M.psnr(a, b) == pytest.approx(-10 * math.log10(M.mse(a, b)))


def test_ssim_and_psnr_decrease_with_noise():
    x, _ = digits([7])
    gen = torch.Generator().manual_seed(0)
    noisy = [(x + s * torch.randn(x.shape, generator=gen)).clamp(0, 1) for s in (0.01, 0.1, 0.3)]
    ssims = [M.ssim(x[0], n[0]) for n in noisy]
    psnrs = [M.psnr(x[0], n[0]) for n in noisy]
    assert ssims == sorted(ssims, reverse=True) and psnrs == sorted(psnrs, reverse=True)


@given(true=st.lists(st.integers(0, 5), min_size=1, max_size=8), seed=st.integers(0, 1000))
def test_label_accuracy_is_order_free_multiset_overlap(true, seed):
    perm = list(np.random.default_rng(seed).permutation(true))
    assert M.label_accuracy(true, perm) == 1.0
    assert 0.0 <= M.label_accuracy(true, [9] * len(true)) <= 1.0
    assert M.label_accuracy([1, 1, 2], [1, 2, 2]) == pytest.approx(2 / 3)


def test_matching_is_order_free():
    x, y = digits(range(4))
    perm = [2, 0, 3, 1]
    assert M.match(x, x[perm]) == [perm.index(i) for i in range(4)]
    metrics, per = score(x[perm], y[perm].tolist(), GroundTruth(x, y))
    assert metrics["psnr"] == math.inf and metrics["label_accuracy"] == 1.0 and len(per) == 4


# --- defences -----------------------------------------------------------------------------------------------------


def test_prune_keeps_the_largest_fraction_per_tensor():
    gen = torch.Generator().manual_seed(0)
    g = [torch.randn(100, generator=gen), torch.randn(10, 10, generator=gen)]
    out = D.prune(g, 0.9)
    for a, b in zip(g, out, strict=True):
        kept = b != 0
        assert int(kept.sum()) == 10
        assert a.abs()[kept].min() >= a.abs()[~kept].max()
        assert torch.equal(a[kept], b[kept])
    assert all(torch.equal(a, b) for a, b in zip(g, D.prune(g, 0.0), strict=True))
    with pytest.raises(AttackError):
        D.prune(g, 1.5)


def test_noise_is_relative_to_each_tensors_rms_and_seeded():
    g = [torch.full((20000,), 2.0), torch.full((20000,), -0.01)]
    out = D.gaussian_noise(g, 0.1, seed=3)
    assert (out[0] - g[0]).std().item() == pytest.approx(0.2, rel=0.05)
    assert (out[1] - g[1]).std().item() == pytest.approx(0.001, rel=0.05)
    assert all(torch.equal(a, b) for a, b in zip(out, D.gaussian_noise(g, 0.1, seed=3), strict=True))
    by_norm = D.gaussian_noise(g, 0.1, relative_to="norm")
    assert (by_norm[0] - g[0]).std().item() == pytest.approx(0.1 * g[0].norm().item(), rel=0.05)


def test_aggregated_view_is_the_mean_of_workers_gradients():
    model = lenet_sigmoid(1, 10)
    batches = [digits([i]) for i in range(3)]
    view = D.aggregated_view(model, batches)
    singles = [observe_gradients(model, x, y) for x, y in batches]
    for i, v in enumerate(view):
        torch.testing.assert_close(v, sum(s[i] for s in singles) / 3, rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="known: noise, none, prune"):
        D.DEFENCES.get("dropout")


# --- views, registry, restarts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dlg", "idlg", "inverting-gradients", "label-recovery"])
def test_malformed_views_are_one_line_attack_errors(name):
    model = lenet_sigmoid(1, 10)
    x, y = digits([0])
    g = observe_gradients(model, x, y)
    bad_views = [
        g[:-1],  # a parameter missing
        [g[0].reshape(-1), *g[1:]],  # wrong shape
        [torch.full_like(g[0], float("nan")), *g[1:]],  # not finite
        observe_gradients(lenet_sigmoid(1, 100), x, y),  # another model's head
        "not a list",
    ]
    for view in bad_views:
        with pytest.raises(AttackError) as info:
            run_attack(name, model, view, spec=InputSpec())
        assert "\n" not in str(info.value) and str(info.value)


def test_registry_lists_attacks_and_rejects_unknown_names():
    assert ATTACKS.names() == ["data-free", "dlg", "idlg", "inverting-gradients", "label-recovery"]
    with pytest.raises(ConfigError, match="known: data-free, dlg"):
        run_attack("deep-leakage", lenet_sigmoid(1, 10), [], spec=InputSpec())
    with pytest.raises(AttackError):
        InputSpec(batch_size=0)


def test_restarts_keep_the_best_finite_trial_and_stop_at_target():
    distances = iter([math.nan, 5.0, 0.5, 1e-9, 0.1])
    calls = []

    def run_one(gen: torch.Generator) -> Trial:
        calls.append(torch.rand(1, generator=gen).item())
        return Trial(torch.zeros(1), [], next(distances), 1)

    best, used, _ = best_of_restarts("t", run_one, restarts=5, seed=0, target_distance=1e-6)
    assert best.distance == 1e-9 and used == 4
    assert len(set(calls)) == 4  # every restart draws a fresh start
    only_nan, used, _ = best_of_restarts(
        "t", lambda g: Trial(torch.zeros(1), [], math.inf, 1), restarts=2, seed=0, target_distance=0.0
    )
    assert only_nan.distance == math.inf and used == 2


def test_data_free_baseline_needs_no_gradients():
    x, y = digits(range(4))
    spec = InputSpec((1, 32, 32), batch_size=4)
    r = run_attack("data-free", lenet_sigmoid(1, 10), [], spec=spec, truth=GroundTruth(x, y))
    assert 5.0 < r.metrics["psnr"] < 12.0 and r.metrics["ssim"] < 0.1
    assert r.metrics["label_accuracy_expected"] == 0.1
    assert r.as_dict()["attack"] == "data-free"


def test_idlg_label_rule_reads_the_head():
    model = lenet_sigmoid(1, 10)
    x, y = digits([8])
    r = run_attack("label-recovery", model, observe_gradients(model, x, y), spec=InputSpec(), method="sign")
    assert r.labels == (8,)


# --- images, models, plots ---------------------------------------------------------------------------------------


def test_images_are_deterministic_and_in_range():
    x, y = digits([5, 10])
    assert x.shape == (2, 1, 32, 32) and y.tolist() == [5, 0] and x.min() >= 0 and x.max() <= 1
    a, b = photo_crops(3, seed=7), photo_crops(3, seed=7)
    assert a.shape == (3, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, photo_crops(3, seed=8))


@pytest.mark.parametrize("make", [lenet_sigmoid, lenet_relu, mlp_relu])
@pytest.mark.parametrize("channels", [1, 3])
def test_models_take_32x32_inputs_with_any_class_count(make, channels):
    model = make(channels, 7)
    assert model(torch.zeros(2, channels, 32, 32)).shape == (2, 7)
    again = make(channels, 7)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters(), strict=True))


def test_lenet_weights_are_uniform_half():
    params = torch.cat([p.detach().flatten() for p in lenet_sigmoid(3, 10).parameters()])
    assert params.min() >= -0.5 and params.max() <= 0.5 and params.std() > 0.25


def test_grid_png_is_written(tmp_path):
    x, _ = digits(range(3))
    path = save_grid(tmp_path / "grid.png", x, x.flip(0), title="identity")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rgb = photo_crops(2)
    assert save_grid(tmp_path / "rgb.png", rgb, torch.full_like(rgb, 0.5)).stat().st_size > 0


@pytest.mark.parametrize(
    "module", ["__init__", "base", "metrics", "nets", "images", "labels", "dlg", "baseline", "defences"]
)
def test_docstring_examples_run(module):
    import doctest
    import importlib

    name = "trustgrad.attacks.leakage" + ("" if module == "__init__" else f".{module}")
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
