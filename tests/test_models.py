"""Real models at real size (issue 17): the BatchNorm models, seeded augmentation, CIFAR-shaped data, and what every
pattern, proof and audit does with BatchNorm statistics and augmentation (docs/models.md).

ResNet-18 costs ~0.5 s per forward and backward at batch 8 on one core: it runs on a tiny CIFAR-10 folder for one
step; everything else uses the 24k-parameter ``cnn-bn``.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from trustgrad.augment import PAD, Augment, apply_decisions
from trustgrad.cli import main
from trustgrad.config import config_from_dict
from trustgrad.data import BatchPlan, load_dataset
from trustgrad.models import build_model, has_batch_stats, splittable
from trustgrad.proof.format import checkpoint_name
from trustgrad.proof.replay import Hyper, replay_segment
from trustgrad.proof.writer import recommit


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train(out: Path, *flags: str) -> dict:
    """``trustgrad train`` (real processes) with ``flags``; the run's summary."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["train", "--no-progress", "--out", str(out), *flags])
    assert rc == 0, err.getvalue()[-2000:]
    return json.loads((out / "summary.json").read_text())


def _refusal(*flags: str) -> str:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["train", "--no-progress", *flags])
    lines = err.getvalue().strip().splitlines()
    assert rc == 2 and len(lines) == 1, err.getvalue()
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------- zoo


def test_zoo_builds_batchnorm_models_from_the_seed():
    resnet = build_model("resnet18", (3, 32, 32), 10, seed=3)
    again = build_model("resnet18", (3, 32, 32), 10, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(resnet.state_dict().values(), again.state_dict().values()))
    assert sum(p.numel() for p in resnet.parameters()) == 11_173_962  # torchvision's, 3x3 stem, no max-pool
    assert resnet.conv1.stride == (1, 1) and isinstance(resnet.maxpool, torch.nn.Identity)
    cnn = build_model("cnn-bn", (3, 32, 32), 10, seed=3)
    assert cnn(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert has_batch_stats(cnn) and has_batch_stats(resnet)
    assert not has_batch_stats(build_model("lenet", (1, 8, 8), 10, seed=0))
    assert splittable(build_model("mlp", (1, 8, 8), 10, seed=0)) is None
    assert "BatchNorm" in splittable(cnn) and "not an nn.Sequential" in splittable(resnet)


@pytest.mark.parametrize("pattern,model", [("pipeline", "cnn-bn"), ("tensor", "cnn-bn")])
def test_model_parallel_patterns_refuse_what_they_cannot_split(pattern, model):
    line = _refusal("--pattern", pattern, "--workers", "2", "--model", model, "--dataset", "synthetic-cifar")
    assert f"cannot split model {model!r}" in line and "data-parallel" in line


def test_cuda_on_a_machine_without_one_is_one_line_before_launch():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal is for machines without one")
    assert "no CUDA device" in _refusal("--device", "cuda", "--workers", "2", "--max-steps", "1")


def test_augmentation_refuses_non_images_and_blind_checks():
    assert "crops and flips images" in _refusal("--augment", "crop-flip", "--dataset", "breast-cancer")
    line = _refusal(
        "--pattern",
        "ps",
        "--augment",
        "flip",
        "--encrypt",
        "ckks",
        "--keys",
        "threshold",
        "--proof",
        "blind",
        "--model",
        "logreg-poly",
        "--momentum",
        "0",
        "--dataset",
        "digits32",
    )
    assert "--proof blind" in line


# ------------------------------------------------------------------------------------------------- data, augmentation


def test_synthetic_cifar_is_seeded_and_cifar_shaped():
    ds = load_dataset("synthetic-cifar")
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10 and len(ds.x_train) == 2048
    again = load_dataset("synthetic-cifar", n=2560)  # the same options by hand: not the cached copy
    assert torch.equal(ds.x_train, again.x_train) and torch.equal(ds.y_train, again.y_train)


def test_augmentation_is_a_prf_of_seed_worker_step_and_sample():
    aug = Augment("crop-flip", seed=7)
    d = aug.decisions(1, 5, 64)
    assert np.array_equal(d, Augment("crop-flip", seed=7).decisions(1, 5, 64))
    for other in (Augment("crop-flip", 8).decisions(1, 5, 64), aug.decisions(0, 5, 64), aug.decisions(1, 6, 64)):
        assert not np.array_equal(d, other)
    assert d[:, :2].min() >= 0 and d[:, :2].max() <= 2 * PAD and set(d[:, 2]) == {0, 1}
    x = torch.rand(3, 3, 32, 32)
    centre = np.array([[PAD, PAD, 0], [PAD, PAD, 1], [0, 2 * PAD, 0]])
    out = apply_decisions(x, centre)
    assert torch.equal(out[0], x[0]) and torch.equal(out[1], x[1].flip(-1))
    assert torch.equal(out[2], F.pad(x[2], (PAD,) * 4)[:, 0:32, 2 * PAD : 2 * PAD + 32])
    assert Augment("none", 7).apply(x, 0, 0) is x


def _cifar_folder(root: Path, rows: int = 8) -> Path:
    """A tiny CIFAR-10 folder in the binary format (``cifar-10-batches-bin``): label byte, then 3072 pixel bytes."""
    g = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = g.integers(0, 10, size=(rows, 1), dtype=np.uint8)
        (root / name).write_bytes(np.hstack([labels, g.integers(0, 256, (rows, 3072), dtype=np.uint8)]).tobytes())
    return root


def test_resnet18_trains_on_a_cifar10_folder_with_four_allreduce_workers(tmp_path):
    data = _cifar_folder(tmp_path / "cifar-10-batches-bin")
    s = _train(
        tmp_path / "run",
        "--pattern",
        "allreduce",
        "--workers",
        "4",
        "--model",
        "resnet18",
        "--dataset",
        "cifar10",
        "--data-dir",
        str(data),
        "--batch-size",
        "2",
        "--max-steps",
        "1",
        "--augment",
        "crop-flip",
    )
    assert s["steps"] == 1 and s["num_params"] == 11_173_962 and np.isfinite(s["final_loss"])


@pytest.mark.parametrize(
    "pattern", [["ring"], ["ps"], ["gossip"], ["local-sgd", "--local-steps", "1"]], ids=lambda p: p[0]
)
def test_resnet18_takes_two_steps_on_every_other_data_parallel_pattern(tmp_path, pattern):
    data = _cifar_folder(tmp_path / "cifar-10-batches-bin", rows=4)  # 20 training images: evaluation stays cheap
    s = _train(
        tmp_path / "run",
        "--pattern",
        *pattern,
        "--workers",
        "2",
        "--model",
        "resnet18",
        "--dataset",
        "cifar10",
        "--data-dir",
        str(data),
        "--batch-size",
        "2",
        "--max-steps",
        "2",
        "--augment",
        "crop-flip",
    )
    assert s["steps"] == 2 and np.isfinite(s["final_loss"])


# -------------------------------------------------------------------------------------- patterns and BatchNorm state


@pytest.mark.parametrize(
    "pattern", [["allreduce"], ["ring"], ["ps"], ["gossip"], ["local-sgd", "--local-steps", "2"]], ids=lambda p: p[0]
)
def test_every_data_parallel_pattern_trains_the_batchnorm_cnn(tmp_path, pattern):
    s = _train(
        tmp_path,
        "--pattern",
        *pattern,
        "--workers",
        "2",
        "--model",
        "cnn-bn",
        "--dataset",
        "synthetic-cifar",
        "--batch-size",
        "8",
        "--max-steps",
        "4",
        "--augment",
        "crop-flip",
        "--lr",
        "0.05",
    )
    state = load_file(str(tmp_path / "model.safetensors"))
    assert s["steps"] == 4 and np.isfinite(s["final_loss"]) and s["test_accuracy"] > 0
    # the running statistics moved off their initial values (mean 0, variance 1): what evaluation used is trained
    assert float(state["1.running_mean"].abs().sum()) > 0 and not torch.allclose(state["1.running_var"], torch.ones(16))


def _per_worker_reference(cfg, steps: int) -> dict[str, torch.Tensor]:
    """One process on the combined batch, BatchNorm normalising each worker's half by its own statistics (the
    workers' semantics: DDP's without SyncBatchNorm), running statistics averaged after each step."""
    ds = load_dataset(cfg.dataset)
    model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, cfg.seed, cfg.model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    plan, aug = BatchPlan.for_run(cfg, ds, cfg.workers), Augment(cfg.augment, cfg.seed)
    buffers = list(model.buffers())
    model.train()
    for t in range(steps):
        start, grads, ends = [b.clone() for b in buffers], [], []
        for w in range(cfg.workers):
            with torch.no_grad():
                for b, s0 in zip(buffers, start):
                    b.copy_(s0)
            opt.zero_grad()
            idx = torch.from_numpy(plan.at(w, t))
            F.cross_entropy(model(aug.apply(ds.x_train[idx], w, t)), ds.y_train[idx]).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            ends.append([b.clone() for b in buffers])
        for p, *gs in zip(model.parameters(), *grads):
            p.grad = torch.stack(gs).mean(0)
        opt.step()
        with torch.no_grad():
            for b, *bs in zip(buffers, *ends):
                b.copy_(torch.stack(bs).double().mean(0) if b.is_floating_point() else bs[0])
    return model.state_dict()


def test_two_allreduce_workers_match_one_process_with_per_worker_batchnorm(tmp_path):
    """Compared: every tensor of the final state (weights, running means and variances) after 4 steps; tolerance
    1e-5 absolute (float32 rounding of the sums). The combined batch with BatchNorm over all 16 samples is a different
    computation (batch statistics of 16, not 2 x 8) and is measurably off: that is the semantics, not an error."""
    flags = {
        "workers": 2,
        "model": {"name": "cnn-bn"},
        "dataset": "synthetic-cifar",
        "batch_size": 8,
        "max_steps": 4,
        "augment": "crop-flip",
        "lr": 0.05,
    }
    cfg = config_from_dict(flags)
    _train(
        tmp_path,
        "--workers",
        "2",
        "--model",
        "cnn-bn",
        "--dataset",
        "synthetic-cifar",
        "--batch-size",
        "8",
        "--max-steps",
        "4",
        "--augment",
        "crop-flip",
        "--lr",
        "0.05",
    )
    got = load_file(str(tmp_path / "model.safetensors"))
    ref = _per_worker_reference(cfg, 4)
    worst = max(float((got[k].double() - v.double()).abs().max()) for k, v in ref.items())
    assert worst < 1e-5, worst
    assert torch.equal(got["1.num_batches_tracked"], torch.tensor(4))
    combined = _combined_batch_reference(cfg, 4)
    assert max(float((got[k] - v).abs().max()) for k, v in combined.items() if v.is_floating_point()) > 1e-3


def _combined_batch_reference(cfg, steps: int) -> dict[str, torch.Tensor]:
    ds = load_dataset(cfg.dataset)
    model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, cfg.seed, cfg.model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    plan, aug = BatchPlan.for_run(cfg, ds, cfg.workers), Augment(cfg.augment, cfg.seed)
    for t in range(steps):
        xs = [aug.apply(ds.x_train[torch.from_numpy(plan.at(w, t))], w, t) for w in range(cfg.workers)]
        ys = [ds.y_train[torch.from_numpy(plan.at(w, t))] for w in range(cfg.workers)]
        opt.zero_grad()
        F.cross_entropy(model(torch.cat(xs)), torch.cat(ys)).backward()
        opt.step()
    return model.state_dict()


def test_audits_replay_the_augmented_batchnorm_claims_exactly(tmp_path):
    s = _train(
        tmp_path,
        "--pattern",
        "ps",
        "--workers",
        "2",
        "--model",
        "cnn-bn",
        "--dataset",
        "synthetic-cifar",
        "--batch-size",
        "8",
        "--max-steps",
        "3",
        "--augment",
        "crop-flip",
        "--proof",
        "audit",
    )
    assert s["audited_claims"] == 6 and s["rejected_claims"] == 0, s


# ----------------------------------------------------------------------------------------------------------- proofs


class _OneFlipped:
    """The run's augmentation but for one decision: worker 1's first sample at step 2 is flipped the other way."""

    active = True

    def __init__(self, real: Augment):
        self.real = real

    def apply(self, x: torch.Tensor, worker: int, step: int) -> torch.Tensor:
        decisions = self.real.decisions(worker, step, len(x))
        if (worker, step) == (1, 2):
            decisions[0, 2] ^= 1
        return apply_decisions(x, decisions)


def _verify(proof: Path) -> tuple[int, str]:
    res = subprocess.run(
        [sys.executable, "-m", "trustgrad", "verify", str(proof), "--all", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "Traceback" not in res.stderr, res.stderr
    return res.returncode, res.stdout + res.stderr  # stderr: a refusal (exit 2) says why


def test_proof_of_a_batchnorm_run_with_augmentation_verifies_and_one_changed_flip_is_rejected(tmp_path):
    _train(
        tmp_path / "run",
        "--pattern",
        "allreduce",
        "--workers",
        "2",
        "--model",
        "cnn-bn",
        "--dataset",
        "synthetic-cifar",
        "--batch-size",
        "8",
        "--max-steps",
        "4",
        "--augment",
        "crop-flip",
        "--proof",
        "record",
        "--proof-k",
        "2",
        "--lr",
        "0.05",
    )
    proof = tmp_path / "run" / "proof"
    rc, out = _verify(proof)
    assert rc == 0, out[-2000:]
    # the prover trained segment 2-4 with one crop-and-flip decision of its own and re-committed the proof
    manifest = json.loads((proof / "manifest.json").read_text())
    cfg = config_from_dict(manifest["config"])
    ds = load_dataset(cfg.dataset)
    model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, cfg.seed, cfg.model)
    indices = load_file(str(proof / "indices.safetensors"))["indices"]
    start = load_file(str(proof / checkpoint_name(2)))
    batches = [indices[t].reshape(-1) for t in (2, 3)]
    hyper = Hyper.from_config(cfg)
    forged = replay_segment(
        model,
        start,
        batches,
        ds.x_train,
        ds.y_train,
        hyper,
        workers=2,
        augment=_OneFlipped(Augment(cfg.augment, cfg.seed)),
        first_step=2,
    )
    save_file({k: v.contiguous() for k, v in forged.items()}, str(proof / checkpoint_name(4)))
    recommit(proof)
    rc, out = _verify(proof)
    assert rc == 1 and '"valid": false' in out and "2-4" in out, out[-2000:]


def test_bench_scale_refuses_bad_options(capsys):
    assert main(["bench", "scale", "--steps", "0"]) == 2
    assert main(["bench", "scale", "--workers", "4", "--batch-size", "64", "--steps", "10"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "--steps must be >= 1" in err[0] and "one epoch" in err[1], err
