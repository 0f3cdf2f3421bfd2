"""Each codec and gate in one process, fed claims made here (the way Flower tests a strategy), beside the
multi-process tests that run them inside real jobs (test_ps.py, test_audit.py, test_robust_ps.py, ...)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trustgrad import protect
from trustgrad.config import RunConfig
from trustgrad.data import load_dataset
from trustgrad.errors import ConfigError, LaunchError
from trustgrad.models import build_model
from trustgrad.patterns import PATTERNS
from trustgrad.protect import Batch, Claim, Verdict
from trustgrad.protect.codecs.plain import PlainServer, PlainWorker, mean
from trustgrad.protect.gates.audit import ServerAudit
from trustgrad.protect.gates.robust import RobustGate
from trustgrad.replica import Replica, make_optimizer


# ------------------------------------------------------------------ the plaintext codec
def test_plain_codec_round_trips_and_takes_the_mean_in_sender_order():
    grads = [torch.randn(37, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    server, worker = PlainServer(), PlainWorker()
    decoded = [server.decode(worker.encode(g), rank, 37) for rank, g in enumerate(grads, start=1)]
    assert all(torch.equal(d, g) for d, g in zip(decoded, grads))
    assert torch.equal(server.combine(decoded), (grads[0] + grads[1] + grads[2]) / 3)
    assert not server.encrypted and not server.excludes_refused and server.refused_at_setup() == {}


def test_plain_codec_refuses_a_push_of_the_wrong_size_naming_its_sender():
    with pytest.raises(LaunchError, match=r"worker 1 pushed 8 bytes, expected 12 \(float32 x 3\)"):
        PlainServer().decode(b"\0" * 8, 2, 3)


# ------------------------------------------------------------------ the robust gate
def test_robust_gate_admits_every_claim_and_replaces_the_mean():
    gate = RobustGate("median")
    values = {1: torch.tensor([0.0, 1.0]), 2: torch.tensor([0.2, 1.2]), 3: torch.tensor([90.0, -90.0])}
    verdict = gate.screen(Batch(0, values, dict.fromkeys(values, 0), frozenset(values)))
    assert verdict == Verdict.admit_all(values)
    assert torch.equal(gate.combine(list(values.values()), [0, 1, 2]), torch.tensor([0.2, 1.0]))
    assert gate.summary()["aggregate"] == "median" and gate.summary()["aggregate_rounds"] == 1


# ------------------------------------------------------------------ the audit gate
def _audit(rate: float, seed: int = 3) -> tuple[ServerAudit, Replica]:
    cfg = RunConfig(workers=3, seed=seed, lr=0.1, momentum=0.9, progress=False).replace(
        pattern={"name": "ps"}, proof={"mode": "audit", "audit_rate": rate}
    )
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, cfg.seed, cfg.model)
    replica = Replica(model, make_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay))
    return ServerAudit(cfg, ds, cfg.workers, replica.num_params, asynchronous=False), replica


def _round(gate: ServerAudit, replica: Replica, step: int, liar: int) -> tuple[Batch, dict[int, torch.Tensor]]:
    """Every worker's claim of ``step`` at the replica's parameters; the liar pushes half its gradient."""
    params = replica.flat_params()
    grads = {r: gate.auditor.replay(r - 1, step, params) * (0.5 if r == liar else 1.0) for r in (1, 2, 3)}
    for r, g in grads.items():
        gate.observe(Claim(r, step, step, g.numpy().tobytes(), g))
    return Batch(step, grads, dict.fromkeys(grads, step), frozenset(grads), replica, mean), grads


def test_audit_gate_excludes_a_liar_at_once_and_never_edits_the_server():
    gate, replica = _audit(rate=1.0)
    before = replica.flat_params()
    batch, grads = _round(gate, replica, 0, liar=2)
    verdict = gate.screen(batch)
    assert set(verdict.excluded) == {2} and verdict.excluded[2].startswith("audit: ")
    assert sorted(verdict.admitted) == [1, 3] and torch.equal(verdict.admitted[1], grads[1])
    assert verdict.corrections == ()  # caught at its first lie: nothing of it reached the model
    assert torch.equal(replica.flat_params(), before) and replica.flat_momentum() is None


def _until_caught(seed: int) -> tuple[ServerAudit, Replica, Verdict, int, torch.Tensor]:
    """Rounds of a sync server at audit rate 0.5 with worker 2 lying every round, until its lie is drawn."""
    gate, replica = _audit(rate=0.5, seed=seed)
    start = replica.flat_params()
    for step in range(12):
        batch, _ = _round(gate, replica, step, liar=2)
        verdict = gate.screen(batch)
        if verdict.excluded:
            return gate, replica, verdict, step, start
        gate.applied(batch)
        replica.set_flat_grad(mean([verdict.admitted[r] for r in sorted(verdict.admitted)]))
        replica.step()
    raise AssertionError(f"seed {seed}: a liar drawn with probability 1/2 per round went uncaught for 12 rounds")


def test_audit_gate_repairs_a_late_catch_as_a_correction_equal_to_the_liar_free_trajectory():
    """Audit rate 0.5: the liar's lies reach the model until one is drawn; the verdict carries the parameters and
    momentum of the rounds replayed without it (the server applies them), computed here independently."""
    caught = (_until_caught(seed) for seed in range(3, 13))
    gate, replica, verdict, step, start = next((c for c in caught if c[3] >= 1), (None,) * 5)
    assert verdict is not None, "in 10 seeds the liar was always caught at its first lie"
    assert set(verdict.excluded) == {2} and verdict.excluded[2].startswith("audit: ")
    (correction,) = verdict.corrections
    reference = Replica(*_fresh_model_and_optimizer(replica))
    reference.set_flat_params(start)
    for k in range(step):  # the rounds the repair replays, with the honest workers' gradients only
        params = reference.flat_params()
        reference.set_flat_grad(mean([gate.auditor.replay(r - 1, k, params) for r in (1, 3)]))
        reference.step()
    assert torch.equal(correction.params, reference.flat_params())
    assert torch.equal(correction.momentum, reference.flat_momentum())
    # the current round is recomputed at the repaired model, and the liar has no say in it
    assert sorted(verdict.admitted) == [1, 3]
    assert torch.equal(verdict.admitted[1], gate.auditor.replay(0, step, reference.flat_params()))
    assert not torch.equal(replica.flat_params(), correction.params)  # the server's model is the server's to move


def _fresh_model_and_optimizer(like: Replica) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    import copy

    model = copy.deepcopy(like.model)
    group = like.optimizer.param_groups[0]
    return model, make_optimizer(model, group["lr"], group["momentum"], group["weight_decay"])


# ------------------------------------------------------------------ which protections a pattern can run
@pytest.mark.parametrize(
    "pattern, changes, needle",
    [
        ("ring", {"crypto": {"encrypt": "ckks", "keys": "shared"}}, "patterns that support it: ps"),
        ("allreduce", {"crypto": {"encrypt": "ckks", "keys": "threshold"}}, "patterns that support it: ps, ring"),
        ("ring", {"proof": {"mode": "audit"}}, "--proof audit is not supported by pattern 'ring'"),
        ("gossip", {"proof": {"mode": "record"}, "out": "x"}, "patterns that support it: allreduce, ring"),
        ("ps", {"proof": {"mode": "record"}, "out": "x"}, "patterns that support it: allreduce, ring"),
    ],
)
def test_what_a_pattern_offers_decides_which_protections_it_runs(pattern, changes, needle):
    cfg = RunConfig(workers=4).replace(pattern={"name": pattern}, **changes)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        PATTERNS.get(pattern).check(cfg)


def test_a_job_shape_can_take_a_capability_away():
    ps = PATTERNS.get("ps")
    sync = RunConfig(workers=4).replace(pattern={"name": "ps"})
    assert {"sync-rounds", "no-plaintext-state"} <= ps.offers_for(sync)
    assert "sync-rounds" not in ps.offers_for(sync.replace(pattern={"schedule": "async"}))
    assert "no-plaintext-state" not in ps.offers_for(sync.replace(pattern={"checkpoint_every": 2}, out="x"))
    encrypted = sync.replace(crypto={"encrypt": "ckks", "keys": "threshold"}, pattern={"schedule": "async"})
    with pytest.raises(ConfigError, match="ps --encrypt ckks runs --schedule sync without checkpoints"):
        ps.check(encrypted)


def test_build_names_the_codec_and_gates_from_the_flags():
    cfg = RunConfig(workers=3).replace(pattern={"name": "ps"})
    assert protect.build(cfg).codec == "plain" and protect.build(cfg).gates == ()
    audited = protect.build(cfg.replace(proof={"mode": "audit"}, aggregate="median"))
    assert audited.gates == ("audit", "robust") and audited.extra_ranks == 0
    remote = protect.build(cfg.replace(proof={"mode": "audit"}, crypto={"encrypt": "ckks", "keys": "shared"}))
    assert (remote.codec, remote.gates, remote.extra_ranks, remote.parties) == ("ckks-shared", ("cipher-audit",), 1,
                                                                                  (1, 2, 3, 4))  # fmt: skip
    assert protect.key_modes(PATTERNS.get("ring").offers) == ["threshold"]
    assert protect.key_modes(PATTERNS.get("ps").offers) == ["shared", "threshold"]


# ------------------------------------------------------------------ the CKKS codec's receiver check
@pytest.fixture(scope="module")
def shared_ring():
    from trustgrad.crypto import CKKSParams, Context, keygen
    from trustgrad.secure import KeyRing

    context = Context(
        CKKSParams.for_aggregation("shared", depth=2, ring_dim=1024, security="none", allow_insecure=True)
    )
    public, secret = keygen(context)
    return KeyRing("shared", context, public, secret, (1, 2))


def test_ckks_codec_admits_a_fresh_encryption_of_the_model_length(shared_ring):
    from trustgrad.crypto import decrypt, encrypt
    from trustgrad.protect.codecs.ckks import decode_fresh

    values = np.linspace(-1, 1, 700)
    vector = decode_fresh(shared_ring, encrypt(shared_ring.public_key, values).to_bytes(), 2, 700)
    np.testing.assert_allclose(decrypt(shared_ring.secret, vector), values, atol=1e-6)


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda ring, v: (v * 0.5).to_bytes(), "expected a fresh encryption, got one at level"),  # a product
        (lambda ring, v: v.to_bytes()[:-9], "worker 1 \\(rank 2\\) pushed an invalid ciphertext"),  # truncated
        (lambda ring, v: b"\x00" * 64, "worker 1 \\(rank 2\\) pushed an invalid ciphertext"),  # not a frame
    ],
)
def test_ckks_codec_refuses_what_a_fresh_push_is_not_naming_its_sender(shared_ring, make, needle):
    from trustgrad.crypto import encrypt
    from trustgrad.protect.codecs.ckks import RefusedPayload, decode_fresh

    vector = encrypt(shared_ring.public_key, np.linspace(-1, 1, 700))
    with pytest.raises(RefusedPayload, match=needle) as caught:
        decode_fresh(shared_ring, make(shared_ring, vector), 2, 700)
    assert caught.value.rank == 2


def test_ckks_codec_refuses_a_push_of_another_length(shared_ring):
    from trustgrad.crypto import encrypt
    from trustgrad.protect.codecs.ckks import RefusedPayload, decode_fresh

    with pytest.raises(RefusedPayload, match="worker 0 \\(rank 1\\)"):
        decode_fresh(shared_ring, encrypt(shared_ring.public_key, np.ones(300)).to_bytes(), 1, 700)
