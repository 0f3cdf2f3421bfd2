"""The Python API and users' own code: factories by name, Adam replayed by proofs and audits, TensorBoard records.

Real processes throughout (the launcher's spawned ranks; ``trustgrad`` CLI subprocesses where the command line itself
is under test). The user's code lives in ``tests/userzoo.py``, an ordinary importable module.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import trustgrad
from tests import userzoo
from trustgrad.cli import main
from trustgrad.errors import ProofError
from trustgrad.proof import verify, verify_naive
from trustgrad.proof.format import checkpoint_name
from trustgrad.proof.writer import recommit

ROOT = Path(__file__).resolve().parents[1]
MODEL, DATA = "tests.userzoo:residual_cnn", "tests.userzoo:digits_tensors"


def _cli(*argv: str, cwd: Path = ROOT, path: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    """``python -m trustgrad ARGV`` in a fresh process (the import rule is per process: nothing carries over)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(map(str, (*path, ROOT)))}
    cmd = [sys.executable, "-m", "trustgrad", *argv]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def adam_proof(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adam") / "run"
    job = ["--optimizer", "adam", "--lr", "0.01", "--workers", "2", "--max-steps", "20", "--epochs", "1"]
    job += ["--no-progress"]
    done = _cli("train", "--model", MODEL, "--dataset", DATA, *job, "--proof", "record", "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out / "proof"


def test_a_proof_of_a_users_model_trained_with_adam_verifies_only_with_its_factory_named(adam_proof):
    manifest = json.loads((adam_proof / "manifest.json").read_text())
    assert manifest["config"]["model"]["name"] == MODEL and manifest["config"]["dataset"] == DATA
    assert manifest["training"]["optimizer"] == {"name": "adam", "lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-08,
                                                 "weight_decay": 0.0}  # fmt: skip
    # Adam's moments and step count are in every checkpoint after W0
    ckpt = load_file(str(adam_proof / checkpoint_name(10)))
    assert {k.split("/")[0] for k in ckpt} == {"model", "exp_avg", "exp_avg_sq", "step", "rng"}
    assert all(float(v) == 10.0 for k, v in ckpt.items() if k.startswith("step/"))
    ok = _cli("verify", str(adam_proof), "--all", "--model", MODEL, "--dataset", DATA)
    assert ok.returncode == 0 and "proof VALID" in ok.stdout, ok.stdout + ok.stderr
    for extra, needle in [
        ((), f"pass --model {MODEL}"),  # named by the proof only: never imported
        (("--model", MODEL), f"pass --dataset {DATA}"),
        (("--model", "tests.userzoo:raises", "--dataset", DATA), "you named 'tests.userzoo:raises'"),
        (("--model", "a b:c"), "dotted Python identifiers"),
    ]:
        refused = _cli("verify", str(adam_proof), *extra)
        assert refused.returncode == 2 and needle in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr


@pytest.mark.parametrize(
    "tamper, needle",
    [
        (lambda s: {**s, "exp_avg_sq/a.weight": s["exp_avg_sq/a.weight"] * 1.01}, "do not reproduce"),
        (lambda s: {**s, "exp_avg/head.bias": s["exp_avg/head.bias"] + 1e-3}, "do not reproduce"),
        (lambda s: {k: v + 1 if k.startswith("step/") else v for k, v in s.items()}, "step count"),
    ],
)
def test_a_tampered_adam_proof_is_rejected(tmp_path, adam_proof, tamper, needle):
    import shutil

    path = tmp_path / "proof"
    shutil.copytree(adam_proof, path)
    name = str(path / checkpoint_name(10))
    save_file(tamper(load_file(name)), name)
    recommit(path)  # a forger recomputes every digest: only the replay of Adam's state can tell
    done = _cli("verify", str(path), "--all", "--model", MODEL, "--dataset", DATA)
    assert done.returncode == 1 and "proof INVALID" in done.stdout and needle in done.stdout, done.stdout


def test_the_verifier_never_imports_a_module_a_proof_names(tmp_path, adam_proof):
    import shutil

    path = tmp_path / "proof"
    shutil.copytree(adam_proof, path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["config"]["model"]["name"] = "tests.gate_canary:make"
    (path / "manifest.json").write_text(json.dumps(manifest))
    recommit(path)
    for check in (verify, verify_naive):
        with pytest.raises(ProofError, match="verify imports only code you name"):
            check(path)
    assert "tests.gate_canary" not in sys.modules


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--model", "a b:c"], "dotted Python identifiers"),
        (["--model", "tests.userzoo:_hidden"], "must not be private"),
        (["--model", "tests.nosuch:f"], "module 'tests.nosuch' is not importable"),
        (["--model", "tests.userzoo:nope"], "has no attribute 'nope'"),
        (["--model", "tests.userzoo:raises"], "raised RuntimeError: this factory is broken on purpose"),
        (["--model", "tests.userzoo:not_a_module"], "returned a str, not a torch.nn.Module"),
        (["--dataset", "tests.userzoo:residual_cnn"], "raised TypeError"),
        (["--loss", "nope"], "unknown loss 'nope'"),
        (["--optimizer", "rmsprop"], "optimizer must be one of sgd, adam"),
        (["--optimizer", "adam", "--betas", "0.9"], "betas must be two numbers"),
        (["--optimizer", "adam", "--encrypt", "ckks", "--keys", "threshold"], "needs --pattern ps --proof audit"),
        (["--optimizer", "adam", "--pattern", "ring", "--encrypt", "ckks", "--keys", "threshold"], "rounds the noise"),
        (["--optimizer", "adam", "--pattern", "ps", "--schedule", "async"], "needs --pattern ps --schedule sync"),
        (["--pattern", "pipeline", "--workers", "2", "--model", MODEL], "return an nn.Sequential"),
    ],
)
def test_bad_factories_and_optimizers_are_one_line_exit_2(capsys, argv, needle):
    assert main(["train", "--max-steps", "1", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def _scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _f32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


def test_the_api_trains_a_users_model_and_tensorboard_holds_the_json_records(tmp_path):
    result = trustgrad.fit(
        userzoo.residual_cnn, userzoo.digits_tensors, loss="tests.userzoo:smooth_ce", optimizer="adam", lr=0.01,
        pattern="ps", workers=2, epochs=2, max_steps=30, proof="audit", out=tmp_path / "run",
        tensorboard=tmp_path / "tb",
    )  # fmt: skip
    assert isinstance(result, trustgrad.TrainResult) and result.config.model.name == MODEL
    assert result.config.model.loss == "tests.userzoo:smooth_ce" and result.summary["rejected_claims"] == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result.test_accuracy == summary["test_accuracy"] > 0.3 and len(result.metrics) == len(lines) == 2
    assert [m.test_accuracy for m in result.metrics] == [line["test_accuracy"] for line in lines]
    events = _scalars(tmp_path / "tb")
    for line in lines:
        for key in ("loss", "test_loss", "test_accuracy", "bytes_sent", "model_versions"):
            assert events[f"epoch/{key}"][line["epoch"]] == _f32(line[key]), key
    last = lines[-1]["epoch"]
    for key in ("test_accuracy", "final_loss", "audited_claims", "rejected_claims", "mean_staleness", "bytes_sent"):
        assert events[f"summary/{key}"][last] == _f32(summary[key]), key
    assert summary["audited_claims"] == 60 and "summary/encryption" not in events  # strings are not scalars


def test_an_adam_run_caught_late_is_repaired_bit_exactly_to_the_run_caught_at_once(tmp_path):
    def job(rate: float, folder: str):
        result = trustgrad.fit(
            MODEL, "digits", optimizer="adam", lr=0.01, pattern="ps", workers=3, epochs=100, max_steps=12, seed=5,
            proof="audit", audit_rate=rate, malicious=("rank=2,attack=scale,strength=0.5",), out=tmp_path / folder,
        )  # fmt: skip
        return result.summary, load_file(str(tmp_path / folder / "model.safetensors"))

    (s1, m1), (s2, m2) = job(1.0, "at-once"), job(0.5, "sampled")
    assert s1["excluded_workers"] == [1] and s2["excluded_workers"] == [1] and s2["audit_repairs"]
    # the repair restored Adam's moments and step count and replayed the rounds with them: the same bits
    assert all(torch.equal(m1[k], m2[k]) for k in m1) and s1["test_accuracy"] == s2["test_accuracy"]


def _readme_block() -> tuple[str, list[str]]:
    """The README's Python example and the CLI command it says is the same job."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The Python API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]
    command = re.search(r"`(trustgrad train --model digits_resnet:make_model[^`]*)`", section, re.S).group(1)  # type: ignore[union-attr]
    return code, command.split()[1:]


def test_the_readme_example_runs_and_matches_the_same_job_through_the_cli(tmp_path):
    code, argv = _readme_block()
    (tmp_path / "digits_resnet.py").write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "digits_resnet.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0 and "rejected 0" in done.stdout, done.stdout + done.stderr
    api = json.loads((tmp_path / "runs" / "readme" / "summary.json").read_text())
    assert api["encryption"] == "ckks" and api["proof"] == "audit" and api["audited_claims"] == 24
    assert api["server_key_material"] == ["context", "public key (threshold, 2 parties)"]  # no share, no secret
    cli = _cli(*argv, "--out", str(tmp_path / "cli"), "--no-progress", cwd=tmp_path, path=(tmp_path,))
    assert cli.returncode == 0, cli.stderr
    via_cli = json.loads((tmp_path / "cli" / "summary.json").read_text())
    # tolerance 0: under threshold keys the auditor encrypts the admitted claims on its grid and rounds each fused
    # mean back to it (secure/grid.GainedGrid), so the flooding noise of the two runs' decryptions leaves no trace
    # and the two runs are the same computation (plaintext jobs are bit-exact anyway)
    for key in ("test_accuracy", "final_loss", "test_loss", "steps", "audited_claims", "rejected_claims"):
        assert api[key] == via_cli[key], key
    assert _scalars(tmp_path / "runs" / "readme" / "tb")["summary/test_accuracy"][0] == _f32(api["test_accuracy"])


def test_in_memory_data_and_its_factory_train_the_same_bits_and_the_proof_verifies(tmp_path):
    from torch.utils.data import TensorDataset

    (x, y), (xt, yt) = userzoo.digits_tensors()
    job = dict(optimizer="adam", lr=0.01, workers=2, epochs=1, max_steps=10, proof="record")
    held = trustgrad.fit(MODEL, (TensorDataset(x, y), TensorDataset(xt, yt)), out=tmp_path / "mem", **job)
    named = trustgrad.fit(MODEL, DATA, out=tmp_path / "named", **job)
    assert held.config.dataset == "tensors" and held.config.data_dir == str(tmp_path / "mem" / "data")
    assert all(torch.equal(held.state[k], named.state[k]) for k in named.state)
    done = _cli("verify", str(held.proof), "--model", MODEL, "--data-dir", str(tmp_path / "mem" / "data"))
    assert done.returncode == 0 and "proof VALID" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize(
    "manifest, named, needle",
    [
        ({"config": {"model": {"name": "mlp", "loss": ""}}, "training": {"loss": "x.y:z"}}, {}, "pass --loss x.y:z"),
        ({"config": {"model": {"name": "mlp"}, "dataset": "d:f"}}, {}, "pass --dataset d:f"),
        ({"config": {"model": {"name": "mlp"}}}, {"model_factory": "a:b"}, "the proof's model is 'mlp'"),
        ({"config": "not a table"}, {"loss_factory": "a:b"}, "the proof's loss is 'None'"),
    ],
)
def test_the_import_rule_reads_every_place_a_manifest_names_code(manifest, named, needle):
    from trustgrad.proof import VerifyOptions
    from trustgrad.proof.verifier import trust_named_factories

    with pytest.raises(ProofError, match=re.escape(needle)):
        trust_named_factories(manifest, VerifyOptions(**named))
