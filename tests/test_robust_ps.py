"""The robust paths in real multi-process ps jobs, each against the in-process reference (``SyncRounds``), and
``trustgrad experiment robustness --quick`` end to end."""

from __future__ import annotations

import json

import pytest
import torch

from trustgrad.cli import main
from trustgrad.config import RunConfig
from trustgrad.experiments.robustness.rounds import SyncRounds
from trustgrad.run import run


def _cfg(workers: int, **changes) -> RunConfig:
    base = RunConfig(workers=workers, max_steps=3, batch_size=16, seed=5, progress=False, timeout=120)
    return base.replace(pattern={"name": "ps", "worker_timeout": 120.0}, **changes)


def _same_model(real: dict[str, torch.Tensor], reference: torch.nn.Module) -> None:
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(real[name], value, atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_krum_gate_with_colluding_alie_on_dirichlet_shards_matches_the_reference():
    """--aggregate, a colluding omniscient attacker and --partition dirichlet in one real job: 5 worker processes
    (the last ALIE with z = 1.5) and a server; its final model is the in-process rounds' to 1e-6."""
    cfg = _cfg(5, aggregate="krum,f=1", partition="dirichlet", partition_alpha=0.1,
               malicious=("rank=5,attack=alie,strength=1.5",))  # fmt: skip
    real = run(cfg)
    ref = SyncRounds(cfg)
    out = ref.run()
    _same_model(real.state, ref.model)
    assert real.summary["aggregate"] == "krum" and real.summary["aggregate_rounds"] == 3
    assert real.summary["aggregate_admitted"] == out["gate"]["aggregate_admitted"]
    assert real.summary["test_accuracy"] == pytest.approx(out["test_accuracy"])


def test_audit_excludes_a_backdoor_at_its_first_push_on_dirichlet_shards():
    """Audits at rate 1 replay the label-skewed batches the worker loop used: the backdoor is refused at step 0, no
    honest worker is excluded, and the run ends on the reference's model."""
    cfg = _cfg(4, partition="dirichlet", partition_alpha=0.1, malicious=("rank=4,attack=backdoor",))
    cfg = cfg.replace(proof={"mode": "audit", "audit_rate": 1.0})
    real = run(cfg)
    ref = SyncRounds(cfg)
    out = ref.run()
    assert real.summary["excluded_workers"] == [3] and out["excluded_at"] == {3: 0}
    assert [r["step"] for r in real.summary["rejections"]] == [0]
    assert real.summary["rejected_claims"] == 1 and real.summary["audited_claims"] == 4 + 3 + 3
    _same_model(real.state, ref.model)


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--aggregate", "bulyan,f=2", "--workers", "8", "--oversubscribe"], "needs n >= 4f + 3 = 11"),
        (["--aggregate", "median", "--schedule", "async"], "runs under --schedule sync"),
        (["--aggregate", "krum,f=1", "--encrypt", "ckks"], "needs --pattern ps and plaintext"),
        (["--partition", "dirichlet", "--proof", "blind"], "--proof none or audit"),
        (["--partition", "skewed"], "partition must be one of iid, dirichlet"),
        (["--malicious", "rank=2,attack=alie", "--schedule", "async"], "colludes in the rounds of --pattern ps"),
        (["--malicious", "rank=2,attack=ipm", "--pattern", "ring"], "colludes in the rounds of --pattern ps"),
    ],
)
def test_bad_robustness_input_is_one_line_exit_code_2(flags, needle, capsys):
    code = main(["train", "--pattern", "ps", "--no-progress", "--max-steps", "1", *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("trustgrad: error:"), err
    assert needle in err


def test_experiment_robustness_quick(tmp_path):
    assert main(["experiment", "robustness", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    cells = {(c["attack"], c["defence"]): c for c in data["cells"]}
    assert len(cells) == 11 and (tmp_path / "robustness.png").read_bytes()[:4] == b"\x89PNG"
    assert "| ipm |" in (tmp_path / "results.md").read_text()
    assert cells[("ipm", "audit-1")]["caught_at_first_push"] and cells[("ipm", "audit-1")]["false_exclusions"] == 0
    assert cells[("none", "audit-1")]["false_exclusions"] == 0
    # the audited run trains on the honest workers' gradients only: the honest run's accuracy, or close to it, and
    # exactly the run of the honest workers alone (the attackers excluded at step 0 never pushed anything applied)
    assert abs(cells[("ipm", "audit-1")]["accuracy_mean"] - cells[("none", "mean")]["accuracy_mean"]) < 0.1
    assert cells[("ipm", "audit-1")]["accuracy"] == cells[("honest-only", "mean")]["accuracy"]
    assert cells[("ipm", "audit-1")]["drop_vs_honest_only_points"] == 0.0
    # the auditor trains the excluded shards in their place: the run is the all-honest run itself
    stand_in = cells[("ipm", "audit-1-stand-in")]
    assert stand_in["caught_at_first_push"] and stand_in["accuracy"] == cells[("none", "mean")]["accuracy"]
    assert len(data["attackers_class_share"]["iid"][0]) == 10
    assert cells[("ipm", "krum")]["colluders_admitted_per_round"] > 0.5  # Krum takes the colluders' vector
