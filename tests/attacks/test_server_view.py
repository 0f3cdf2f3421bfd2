"""A server view recorded by a real run is attackable from the CLI; corrupt or foreign views fail cleanly."""

from __future__ import annotations

import json

import pytest
import torch

from trustgrad.attacks.on_view import attack_view
from trustgrad.attacks.view import load_view, save_view
from trustgrad.cli import main
from trustgrad.config import RunConfig
from trustgrad.run import run


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    out = tmp_path_factory.mktemp("view")
    cfg = RunConfig(
        workers=2, dataset="digits32", batch_size=1, max_steps=1, record_server_view=True, out=str(out), progress=False
    ).replace(model={"name": "lenet-sigmoid"})
    result = run(cfg)
    assert result.summary["server_view"].endswith("server_view")
    return out / "server_view"


def test_idlg_reconstructs_a_worker_gradient_from_the_recorded_view(recorded, capsys):
    code = main(["attack", "idlg", "--view", str(recorded / "gradient-step0.safetensors"), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["kind"] == "gradient"
    assert result["metrics"]["psnr"] >= 30 and result["metrics"]["label_accuracy"] == 1.0


def test_aggregate_view_covers_every_workers_batch(recorded):
    view = load_view(recorded / "aggregate-step0.safetensors")
    assert view.kind == "aggregate" and view.contributors == 2 and view.batch_size == 2
    result = attack_view("label-recovery", view)
    assert sorted(result.labels) == sorted(set(view.truth_y.tolist()))


def test_corrupt_and_foreign_views_are_one_line_errors(recorded, tmp_path, capsys):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    assert main(["attack", "idlg", "--view", str(garbage)]) == 2
    assert "corrupt or not a trustgrad view" in capsys.readouterr().err

    view = load_view(recorded / "gradient-step0.safetensors")
    foreign = view.__class__(**{**view.__dict__, "model": "mlp", "input_shape": (1, 32, 32)})
    save_view(tmp_path / "foreign.safetensors", foreign)
    assert main(["attack", "idlg", "--view", str(tmp_path / "foreign.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not fit model 'mlp'" in err and len(err.splitlines()) == 1

    huge = view.__class__(**{**view.__dict__, "input_shape": (3, 100_000, 100_000)})
    save_view(tmp_path / "huge.safetensors", huge)
    assert main(["attack", "idlg", "--view", str(tmp_path / "huge.safetensors")]) == 2
    assert "implausibly large" in capsys.readouterr().err

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((recorded / "gradient-step0.safetensors").read_bytes()[:500])
    assert main(["attack", "idlg", "--view", str(truncated)]) == 2


def test_ciphertext_views_feed_bytes_as_the_update(recorded, tmp_path):
    view = load_view(recorded / "gradient-step0.safetensors")
    noise = torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes()
    ct = view.__class__(**{**view.__dict__, "kind": "ciphertext", "gradients": None, "ciphertext": noise})
    save_view(tmp_path / "ct.safetensors", ct)
    result = attack_view("idlg", load_view(tmp_path / "ct.safetensors"), steps=20)
    assert result.metrics["psnr"] < 20
