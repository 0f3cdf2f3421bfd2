"""Per-worker claims in the parameter server: honest workers pass, every poisoning worker is caught and excluded."""

from __future__ import annotations

import pytest
import torch

from trustgrad.audit.claims import ClaimChain, audit_draw
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
        assert s["worst_accepted_rel_l2"] == 0.0  # the replay reproduces the worker's gradient bit for bit
        # the threshold is calibrated on this platform: replay at the workers' thread count is bit-exact, so exact
        cal = s["audit_calibration"]
        assert s["audit_threshold"] == 0.0 and s["audit_threshold_policy"] == "calibrated"
        assert s["audit_threshold_basis"].startswith("exact: replay at the workers' thread count was bit-exact")
        assert cal["same_threads"] == 0.0 and cal["samples"] == 8 and cal["threads"] == 1
        assert 0 < cal["float64"] < 1e-5 and 0 <= cal["cross_threads"] < 1e-5  # float32 rounding: ~1e-7


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
        (["--pattern", "ps", "--audit-threshold", "loose"], "audit_threshold must be one of calibrated, cross-thread"),
        (["--pattern", "ps", "--audit-threshold", "-1"], "or a number in [0, 1), got '-1'"),
        (["--pattern", "ps", "--audit-threshold", "nan"], "or a number in [0, 1), got 'nan'"),
        (["--pattern", "ps", "--excluded-shard", "auditor"], "--excluded-shard auditor needs --proof audit"),
        (["--pattern", "ps", "--excluded-shard", "keep"], "excluded_shard must be one of drop, auditor"),
        (
            ["--pattern", "ps", "--proof", "audit", "--excluded-shard", "auditor", "--schedule", "async"],
            "--excluded-shard auditor runs plaintext --schedule sync audits",
        ),
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
    stats = result.ranks[3]["stats"]  # the auditor calibrated on the CKKS round trip: 10x its absolute error
    cal = stats["audit_calibration"]
    assert stats["audit_threshold"] == 0.0 and cal["channel"] > 0 and cal["channel_abs"] > 0
    assert stats["audit_threshold_abs"] == 10 * cal["channel_abs"]
    server, auditor = result.ranks[0], result.ranks[3]
    assert server["stats"]["server_key_material"] == ["context", "public key (shared, 3 parties)"]
    assert auditor["role"] == "server" and auditor["stats"]["audited_claims"] >= 6  # a non-training rank


def test_encrypted_audit_needs_full_rate(capsys):
    argv = ["train", "--pattern", "ps", "--encrypt", "ckks", "--proof", "audit", "--keys", "threshold"]
    assert main([*argv, "--audit-rate", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs --audit-rate 1" in err and len(err.splitlines()) == 1, err


_THRESHOLD_AUDIT = RunConfig(workers=3, epochs=1, max_steps=5, seed=3, progress=False).replace(
    pattern={"name": "ps"}, proof={"mode": "audit", "audit_rate": 1.0}
)


@pytest.fixture(scope="module")
def plaintext_reference():
    """The plaintext audited run whose worker 2 is excluded at step 2 (its noise is rejected there)."""
    return run(_THRESHOLD_AUDIT.replace(malicious=("rank=3,attack=noise,from-step=2",)))


def _matches_plaintext(enc, ref) -> None:
    """The threshold run's model is the plaintext run's up to the auditor's grid (secure/grid.GainedGrid): each
    round's mean is off by at most half a step per claim, step * W / (2 gain); SGD with momentum carries an error e
    into the weights as at most lr * T * e / (1 - momentum); 1e-6 more for float32 summation order."""
    from trustgrad.crypto.flooding import FLOODING
    from trustgrad.crypto.params import CKKSParams
    from trustgrad.secure.grid import GainedGrid

    cfg, s = _THRESHOLD_AUDIT, enc.summary
    sigma = FLOODING.sigma(CKKSParams.for_aggregation("threshold").scale_bits)
    step = GainedGrid.for_round([], sigma, parties=3).step  # the widest step of the run (3 parties, then 2)
    error = step * cfg.workers / (2 * s["encryption_gain_min"])
    bound = cfg.lr * cfg.max_steps * error / (1 - cfg.momentum) + 1e-6
    diff = max(float((enc.state[k] - ref.state[k]).abs().max()) for k in ref.state)
    assert diff <= bound, (diff, bound)
    assert s["test_accuracy"] == ref.summary["test_accuracy"] and s["fused_noise_max_steps"] < 0.5
    # the server never held a key share (nor, by construction, a plaintext claim: digests and ciphertexts only)
    assert enc.ranks[0]["stats"]["server_key_material"] == ["context", "public key (threshold, 2 parties)"]


def test_under_threshold_keys_a_liar_is_excluded_at_its_first_lie_and_the_run_matches_plaintext(
    plaintext_reference, tmp_path
):
    """The auditor gets plaintext claims and encrypts the admitted ones (protect/codecs/audited.py): the liar is
    caught at its first lie and the survivors re-key before anything of that round is encrypted."""
    from safetensors.torch import load_file

    liar = ("rank=3,attack=noise,from-step=2",)
    enc = run(_THRESHOLD_AUDIT.replace(crypto={"encrypt": "ckks", "keys": "threshold"}, out=str(tmp_path),
                                       record_server_view=True, malicious=liar))  # fmt: skip
    s = enc.summary
    # what the server received from the workers: one 32-byte salted digest per push, never a gradient
    views = sorted((tmp_path / "server_view").glob("*.safetensors"))
    assert views and all(load_file(str(v))["ciphertext"].numel() == 32 for v in views)
    assert s["excluded_workers"] == [2] == plaintext_reference.summary["excluded_workers"]
    assert [(r["worker"], r["step"]) for r in s["rejections"]] == [(2, 2)]  # its first lie, nothing before
    assert s["audited_claims"] == 13 and s["worst_accepted_rel_l2"] == 0.0  # claims arrive as exact bits
    assert s["rekeys"] == 1  # the liar's share decrypts nothing of step 2
    assert enc.ranks[4]["role"] == "server" and enc.ranks[4]["stats"]["audited_claims"] == 13  # the auditor rank
    _matches_plaintext(enc, plaintext_reference)


@pytest.mark.parametrize(
    "attack, check",
    [
        # step 5 of protect/codecs/audited.py: the auditor refuses its partial of round 2, the server excludes it,
        # the survivors re-key and the auditor encrypts round 2's claims again
        ("crafted-partial", lambda s: "(rank 3) sent the auditor an invalid partial" in s["dropped_reasons"]["2"]),
        # step 2: what it committed to at the server is not the claim it sent the auditor: rejected like a lie
        ("split-claim", lambda s: s["rejections"][0]["reason"].startswith("its claim to the auditor is not the one")),
    ],
)
def test_under_threshold_audits_a_forger_is_named_and_the_round_is_the_survivors(plaintext_reference, attack, check):
    enc = run(_THRESHOLD_AUDIT.replace(crypto={"encrypt": "ckks", "keys": "threshold"},
                                       malicious=(f"rank=3,attack={attack},from-step=2",)))  # fmt: skip
    s = enc.summary
    assert s["dropped_workers"] == [2] and s["rekeys"] == 1 and check(s)
    _matches_plaintext(enc, plaintext_reference)


def _sync_rounds(cfg, auditor, rounds, lie_from, log=None, caught_at=None, lies=None, verified_at=()):
    """A synchronous ps in one process: worker ranks 1..3, rank 2 pushes half its gradient from ``lie_from`` on
    (or at the steps in ``lies``); with a log, rank 2's claims at the steps ``verified_at`` were audited and honest.

    With ``log`` the rounds are logged unverified (audit rate ~0) and the liar is caught at ``caught_at``; without,
    the liar is dropped at its first lie (a rate-1 audit). Returns the final parameters and momentum."""
    from trustgrad.audit.repair import Round
    from trustgrad.data import load_dataset
    from trustgrad.models import build_model
    from trustgrad.replica import Replica, make_optimizer

    ds = load_dataset(cfg.dataset)
    model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, cfg.seed, cfg.model)
    server = Replica(model, make_optimizer(model, cfg.lr, cfg.momentum))
    worker_model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, cfg.seed, cfg.model)
    worker = Replica(worker_model, make_optimizer(worker_model, cfg.lr))  # the workers' own code path
    live = {1, 2, 3}

    def push(rank, step, params):
        idx = torch.from_numpy(auditor.plan.at(rank - 1, step))
        worker.set_flat_params(params)
        worker.compute_gradients(ds.x_train[idx], ds.y_train[idx])
        g = worker.flat_grad().clone()
        lying = step in lies if lies is not None else step >= lie_from
        return 0.5 * g if rank == 2 and lying else g

    def mean(grads):
        return torch.stack(grads).sum(0) / len(grads)

    for step in range(rounds):
        params = server.flat_params()
        grads = {r: push(r, step, params) for r in sorted(live)}
        if log is None and step >= lie_from:
            grads.pop(2, None)
            live.discard(2)
        if log is not None and step == caught_at:
            current = Round(step, params, server.flat_momentum(), {r: (step, g) for r, g in grads.items()})
            judge = lambda r, s, v, p, g: auditor.check(r - 1, s, v, p, g).ok  # noqa: E731
            recompute = lambda r, s, p: auditor.replay(r - 1, s, p)  # noqa: E731
            repaired = log.repair({2}, current, server, mean, judge, recompute)
            assert repaired.liars == {2} and repaired.rounds == caught_at  # nothing verified: the window opened at 0
            grads, live = repaired.contributions, live - {2}
        elif log is not None:
            members = {r: (step, g) for r, g in grads.items()}
            log.record(Round(step, params, server.flat_momentum(), members, {2} if step in verified_at else set()))
        server.set_flat_grad(mean([grads[r] for r in sorted(grads)]))
        server.step()
    return server.flat_params(), server.flat_momentum()


def test_a_late_catch_is_repaired_to_the_run_that_caught_the_liar_at_its_first_lie():
    from trustgrad.audit import Auditor
    from trustgrad.audit.repair import RepairLog
    from trustgrad.data import load_dataset

    cfg = RunConfig(workers=3, seed=4, progress=False)
    auditor = Auditor(cfg, load_dataset(cfg.dataset), 3)
    at_once = _sync_rounds(cfg, auditor, rounds=10, lie_from=2)
    log = RepairLog()
    late = _sync_rounds(cfg, auditor, rounds=10, lie_from=2, log=log, caught_at=7)
    unrepaired = _sync_rounds(cfg, auditor, rounds=10, lie_from=99)  # never lies: a different trajectory
    # replayed from round 0: the liar's honest rounds 0-1 are kept (they reproduce), its lies 2-6 dropped, the
    # honest gradients of rounds 2-7 recomputed at the repaired parameters: bit-exact, as a rate-1 audit would run
    assert torch.equal(late[0], at_once[0]) and torch.equal(late[1], at_once[1])
    assert not torch.equal(late[0], unrepaired[0])
    # everything up to the catch is audited or recomputed: only the (unverified) rounds 8-9 after it are logged
    assert log.window == {1: 8, 3: 8} and [r.version for r in log.rounds] == [8, 9]


def test_an_intermittent_liar_loses_every_lie_within_the_reach_even_after_a_verified_honest_claim():
    from trustgrad.audit import Auditor
    from trustgrad.audit.repair import RepairLog
    from trustgrad.data import load_dataset

    cfg = RunConfig(workers=3, seed=6, progress=False)
    auditor = Auditor(cfg, load_dataset(cfg.dataset), 3)
    at_once = _sync_rounds(cfg, auditor, rounds=9, lie_from=2)  # dropped at its first lie
    # lies at rounds 2 and 6 only, honest (and audited) at round 4, caught at round 6: round 2's lie is found too
    late = _sync_rounds(cfg, auditor, 9, 2, log=RepairLog(), caught_at=6, lies={2, 6}, verified_at={4})
    assert torch.equal(late[0], at_once[0]) and torch.equal(late[1], at_once[1])


def test_the_repair_log_keeps_unverified_windows_open_within_its_reach():
    from trustgrad.audit.repair import RepairLog, Round

    log = RepairLog(max_rounds=3)
    for v in range(5):  # rank 1 verified at round 2 only: a later verified claim does not vouch for earlier ones
        verified = {2, 1} if v == 2 else {2}
        log.record(Round(v, torch.zeros(2), None, {1: (v, torch.ones(2)), 2: (v, torch.ones(2))}, verified=verified))
        assert len(log.rounds) <= 3
    assert log.window == {1: 3} and [r.version for r in log.rounds] == [3, 4]  # rounds 0-1 are past the reach
    log.record(Round(5, torch.zeros(2), None, {2: (5, torch.ones(2))}, verified={2}))
    assert log.window == {1: 3} and [r.version for r in log.rounds] == [3, 4, 5]
    log.record(Round(6, torch.zeros(2), None, {2: (6, torch.ones(2))}, verified={2}))
    assert log.window == {1: 4}  # round 3 left the reach: its contribution is final


def test_a_late_caught_ps_run_ends_bit_exactly_where_the_run_caught_at_once_ends(tmp_path):
    from safetensors.torch import load_file

    def job(rate, folder):
        cfg = RunConfig(
            workers=3, epochs=100, max_steps=12, seed=5, progress=False, out=str(tmp_path / folder),
            malicious=("rank=2,attack=scale,strength=0.5",),  # half its gradient: never the round's largest
        )  # fmt: skip
        cfg = cfg.replace(pattern={"name": "ps"}, proof={"mode": "audit", "audit_rate": rate})
        return run(cfg).summary, load_file(str(tmp_path / folder / "model.safetensors"))

    (s1, m1), (s2, m2) = job(1.0, "at-once"), job(0.5, "sampled")
    assert s1["excluded_workers"] == [1] and s1["rejections"][0]["step"] == 0
    assert s2["excluded_workers"] == [1] and s2["audit_repairs"][0]["workers"] == [1]  # P(never caught) = 2^-12
    assert s2["rolled_back_steps"] == s2["audit_repairs"][0]["caught_at_version"]  # every round since step 0
    assert all(torch.equal(m1[k], m2[k]) for k in m1) and s1["test_accuracy"] == s2["test_accuracy"]


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_with_the_auditor_standing_in_an_attacked_skewed_run_ends_on_the_all_honest_model(tmp_path, rate):
    """--excluded-shard auditor: the liar's shard (label-skewed, so dropping it costs accuracy) keeps contributing the
    gradient the auditor computes, from the liar's first lie on (rate 0.5: a late catch, repaired from step 0)."""
    from safetensors.torch import load_file

    def job(folder, malicious):
        cfg = RunConfig(
            workers=3, epochs=100, max_steps=10, seed=3, progress=False, out=str(tmp_path / folder),
            malicious=malicious, partition="dirichlet", partition_alpha=0.1,
        )  # fmt: skip
        proof = {"mode": "audit", "audit_rate": rate, "excluded_shard": "auditor"}
        summary = run(cfg.replace(pattern={"name": "ps"}, proof=proof)).summary
        return summary, load_file(str(tmp_path / folder / "model.safetensors"))

    (s, m), (h, mh) = job("attacked", ("rank=2,attack=scale,strength=0.5",)), job("honest", ())
    assert s["excluded_workers"] == [1] and h["excluded_workers"] == []
    assert s["excluded_shard"] == "auditor" and s["stand_in_gradients"] >= 1
    # bit-exact: the auditor's replay reproduces a worker's gradient bit for bit at its thread count, and rounds are
    # summed in worker order, so standing in changes nothing but who computed the shard's gradient
    assert all(torch.equal(m[k], mh[k]) for k in m) and s["test_accuracy"] == h["test_accuracy"]


def test_a_steering_worker_passes_the_old_fixed_threshold_and_is_caught_by_the_calibrated_one():
    def job(threshold):
        cfg = RunConfig(workers=3, epochs=1, max_steps=4, seed=2, progress=False, malicious=("rank=2,attack=steer",))
        cfg = cfg.replace(pattern={"name": "ps"}, proof={"mode": "audit", "audit_threshold": threshold})
        return run(cfg).summary

    old, calibrated = job("3e-4"), job("calibrated")
    # g + 2.9e-4 |g| u toward the backdoor: every claim accepted under 3e-4 ...
    assert old["rejected_claims"] == 0 and old["excluded_workers"] == [] and old["audited_claims"] == 12
    assert 2.8e-4 < old["worst_accepted_rel_l2"] < 3e-4 and old["audit_threshold_policy"] == "explicit"
    # ... and rejected at its first push where replay is exact
    assert calibrated["excluded_workers"] == [1] and calibrated["rejections"][0]["step"] == 0
    assert calibrated["rejections"][0]["rel_l2"] > 2.8e-4 and calibrated["worst_accepted_rel_l2"] == 0.0


def test_calibration_measures_each_source_and_policies_set_stated_multiples():
    from trustgrad.audit import Auditor
    from trustgrad.audit.calibration import MULTIPLE, Measured, decide
    from trustgrad.data import load_dataset

    cfg = RunConfig(workers=3, seed=1, progress=False)
    auditor = Auditor(cfg, load_dataset(cfg.dataset), 3)
    m = auditor.calibration.measured
    assert m.same_threads == 0.0 and m.channel == 0.0 and m.float64 > 0  # float32 vs float64 is never bit-exact
    fake = Measured(
        0.0, cross_threads=2e-8, float64=1.5e-7, channel=0.0, channel_abs=0.0, samples=8, threads=1, seconds=0
    )
    assert decide("calibrated", fake).threshold == 0.0
    assert decide("cross-thread", fake).threshold == MULTIPLE * 1.5e-7
    noisy = Measured(
        0.0, cross_threads=0.0, float64=0.0, channel=2e-6, channel_abs=3e-6, samples=8, threads=1, seconds=0
    )
    ckks = decide("calibrated", noisy)  # CKKS noise is absolute: it does not shrink with the gradient
    assert ckks.threshold == 0.0 and ckks.abs_threshold == MULTIPLE * 3e-6 and "claim-channel" in ckks.basis
    explicit = decide("3e-4", fake)
    assert explicit.threshold == 3e-4 and explicit.policy == "explicit" and "not calibrated" in explicit.basis


def test_an_exact_threshold_refuses_a_single_ulp_and_accepts_only_the_honest_bits():
    """The strongest push an exact rule could miss is the smallest one: one float32 ulp on one coordinate."""
    from trustgrad.audit import Auditor
    from trustgrad.data import load_dataset

    cfg = RunConfig(workers=3, seed=3, progress=False)
    auditor = Auditor(cfg, load_dataset(cfg.dataset), 3)
    params = auditor.replica.flat_params()
    honest = auditor.replay(0, 0, params)
    assert auditor.check(0, 0, 0, params, honest.clone()).ok
    gen = torch.Generator().manual_seed(0)
    accepted = 0
    for _ in range(200):  # a random coordinate (non-zero entries: moving a zero gradient is a push too) by one ulp
        claim = honest.clone()
        i = int(torch.randint(0, len(claim), (1,), generator=gen))
        claim[i] = torch.nextafter(claim[i], torch.tensor(float("inf")))
        accepted += auditor.check(0, 0, 0, params, claim).ok
    assert accepted == 0
