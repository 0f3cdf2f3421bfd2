"""Per-worker claims in the parameter server: honest workers pass, every poisoning worker is caught and excluded."""

from __future__ import annotations

import pytest
import torch

from trustgrad.audit.claims import ClaimChain, audit_draw
from trustgrad.audit.rollback import undo_shares
from trustgrad.cli import main
from trustgrad.config import RunConfig
from trustgrad.run import run

ATTACKS = ["sign-flip", "noise", "scale", "label-flip", "free-rider", "random-batch", "forged-proof"]


def _audited(seed: int, schedule: str = "sync", malicious: tuple[str, ...] = (), steps: int = 6) -> dict:
    cfg = RunConfig(workers=3, epochs=1, max_steps=steps, seed=seed, progress=False, malicious=malicious)
    cfg = cfg.replace(pattern={"name": "ps", "schedule": schedule}, proof={"mode": "audit", "audit_rate": 1.0})
    return run(cfg).summary


def test_honest_workers_are_never_rejected():
    for seed in range(3):
        s = _audited(seed)
        assert s["rejected_claims"] == 0 and s["excluded_workers"] == [] and s["audited_claims"] == 18
        assert s["worst_accepted_rel_l2"] <= 1e-6  # the replay reproduces the worker's gradient


@pytest.mark.parametrize("attack", ATTACKS)
def test_every_poisoning_worker_is_caught_and_excluded(attack, honest_accuracy):
    s = _audited(seed=1, malicious=(f"rank=2,attack={attack},from-step=2",), steps=10)
    assert s["excluded_workers"] == [1], s  # rank 2 is worker 1
    assert {r["worker"] for r in s["rejections"]} == {1} and s["rejections"][0]["step"] == 2
    assert s["dropped_workers"] == [1] and s["rolled_back_steps"] == 0  # rate 1: nothing unverified was applied
    assert s["test_accuracy"] >= honest_accuracy - 0.1  # two honest workers carry on


@pytest.fixture(scope="module")
def honest_accuracy() -> float:
    return _audited(seed=1, steps=10)["test_accuracy"]


def test_asynchronous_claims_are_replayed_at_the_version_they_were_computed_on():
    honest = _audited(seed=2, schedule="async", steps=8)
    assert honest["rejected_claims"] == 0 and honest["max_update_lag"] > 0  # stale claims were audited too
    s = _audited(seed=2, schedule="async", malicious=("rank=3,attack=scale",), steps=8)
    assert s["excluded_workers"] == [2]


def test_rollback_restores_the_trajectory_without_the_excluded_shares():
    torch.manual_seed(0)
    lr, mu, steps = 0.1, 0.9, 7
    honest = [torch.randn(5) for _ in range(steps)]
    bad = {2: torch.randn(5), 4: torch.randn(5)}

    def train(extra):
        p, m = torch.zeros(5), torch.zeros(5)
        for t, g in enumerate(honest):
            m = mu * m + g + extra.get(t, 0)
            p = p - lr * m
        return p, m

    p, m = train(bad)
    assert undo_shares(p, m, bad.items(), lr, mu, steps) == 2
    p_ref, m_ref = train({})
    torch.testing.assert_close(p, p_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(m, m_ref, atol=1e-6, rtol=0)


def test_claim_chains_bind_bytes_and_audit_draws_are_uniform():
    a, b = ClaimChain(0, 1), ClaimChain(0, 1)
    assert a.extend(0, 0, b"g") == b.extend(0, 0, b"g") and a.extend(1, 1, b"x") != b.extend(1, 1, b"y")
    draws = [audit_draw(b"nonce", [i.to_bytes(2, "little")], 0) for i in range(2000)]
    assert 0.45 < sum(d < 0.5 for d in draws) / len(draws) < 0.55


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--pattern", "ps", "--malicious", "rank=1"], "rank= and attack= are required"),
        (["--pattern", "ps", "--malicious", "rank=1,attack=bribe"], "unknown malicious attack 'bribe'"),
        (["--pattern", "ps", "--malicious", "rank=9,attack=noise"], "outside the job's 5 processes"),
        (["--pattern", "ps", "--proof", "audit", "--audit-rate", "0"], "audit_rate must be in (0, 1]"),
        (["--pattern", "ring", "--proof", "audit"], "patterns that support it: ps"),
    ],
)
def test_bad_audit_input_is_one_line_exit_2(capsys, argv, needle):
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_claims_are_audited_on_ciphertexts_by_a_rank_that_is_not_the_server():
    cfg = RunConfig(
        workers=2, epochs=1, max_steps=6, seed=3, progress=False, malicious=("rank=2,attack=noise,from-step=2",)
    )
    cfg = cfg.replace(
        pattern={"name": "ps"}, crypto={"encrypt": "ckks", "keys": "shared"}, proof={"mode": "audit", "audit_rate": 1.0}
    )
    result = run(cfg)
    s = result.summary
    assert s["world_size"] == 4  # server, 2 workers, auditor
    assert s["excluded_workers"] == [1] and s["dropped_workers"] == [1] and s["rejections"][0]["step"] == 2
    assert 0 < s["worst_accepted_rel_l2"] < 1e-4  # honest claims: only CKKS noise (~1e-6) separates them from replay
    server, auditor = result.ranks[0], result.ranks[3]
    assert server["stats"]["server_key_material"] == ["context", "public key (shared, 3 parties)"]
    assert auditor["role"] == "server" and auditor["stats"]["audited_claims"] >= 6  # a non-training rank


def test_encrypted_audit_needs_shared_keys_and_full_rate(capsys):
    argv = ["train", "--pattern", "ps", "--encrypt", "ckks", "--proof", "audit", "--keys", "threshold"]
    assert main(argv) == 2
    assert "needs --keys shared and --audit-rate 1" in capsys.readouterr().err
