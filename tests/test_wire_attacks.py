"""A malicious worker that sends crafted ciphertexts or partial decryptions (valid CRC) is refused and named; in ps and
the encrypted ring the honest workers finish the run without it (docs/wire.md). Real processes, real crafted payloads
(``attack=crafted-*``)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from harness import flooding_tolerance

from trustgrad.attacks.poisoning import craft_modulus
from trustgrad.cli import main
from trustgrad.config import RunConfig
from trustgrad.crypto import CKKSParams, Context, EncryptedVector, encrypt, keygen
from trustgrad.errors import CryptoError
from trustgrad.run import run


def _ps(keys: str, malicious: tuple[str, ...], proof: str = "none") -> RunConfig:
    cfg = RunConfig(workers=3, epochs=1, max_steps=4, seed=1, progress=False, malicious=malicious)
    cfg = cfg.replace(pattern={"name": "ps"}, proof={"mode": proof, "audit_rate": 1.0})
    return cfg if proof != "none" else cfg.replace(crypto={"encrypt": "ckks", "keys": keys})


def test_the_crafted_payload_is_what_a_forger_sends():
    """Valid frame and CRC, one OpenFHE modulus changed: only the layout check stands between it and OpenFHE."""
    ctx = Context(CKKSParams.for_aggregation("shared", ring_dim=1024, security="none", allow_insecure=True))
    pk, _ = keygen(ctx)
    honest = encrypt(pk, np.ones(10)).to_bytes()
    crafted = craft_modulus(honest)
    assert len(crafted) == len(honest) and sum(a != b for a, b in zip(crafted, honest)) <= 6  # 1 bit + the CRC
    with pytest.raises(CryptoError, match="differs from this context's layout") as err:
        EncryptedVector.from_bytes(ctx, crafted)
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize(
    "keys, attack, reason",
    [
        ("shared", "crafted-ciphertext", "worker 1 (rank 2) pushed an invalid ciphertext"),
        ("threshold", "crafted-ciphertext", "worker 1 (rank 2) pushed an invalid ciphertext"),
        ("threshold", "crafted-partial", "worker 1 (rank 2) showed the server an invalid partial decryption"),
        ("threshold", "crafted-key", "rank 2 sent an invalid joint public key"),
    ],
)
def test_ps_excludes_the_forger_and_follows_the_plaintext_audit(keys, attack, reason):
    """The round is the mean of the survivors' gradients, exactly as in a plaintext audit that rejects the same worker
    at the same step (shared keys: the round's other pushes; threshold keys: the survivors re-key and push again, the
    forger keeping a share of the old key only); the models agree within CKKS noise. A crafted partial decryption of
    round 2 is reported by the honest workers, shown to the server by its sender, refused there, and the round is
    decrypted again among the survivors: the same model. A crafted copy of the joint key handed to the server at
    set-up excludes its sender before round 0 (the survivors re-key before anything is decrypted): the model of a
    plaintext audit that rejects it at step 0."""
    s = run(_ps(keys, (f"rank=2,attack={attack},from-step=2",)))
    assert s.summary["dropped_workers"] == [1] and s.summary["rekeys"] == (keys == "threshold")
    refused = s.summary["refused_payloads"]
    assert [r["worker"] for r in refused] == [1] and reason in refused[0]["reason"], refused
    assert s.summary.get("partials_shown", 0) == (attack == "crafted-partial")
    # shared keys: CKKS noise only; threshold keys: every partial decryption is flooded (harness.flooding_tolerance)
    cfg = _ps(keys, ())
    tolerance = 1e-5 if keys == "shared" else 1e-5 + flooding_tolerance(cfg.replace(workers=cfg.workers - 1))
    for name, ref in _plain_audit(0 if attack == "crafted-key" else 2).state.items():
        torch.testing.assert_close(s.state[name], ref, atol=tolerance, rtol=0)


@pytest.mark.parametrize("attack", ["equivocate-partial", "false-report"])
def test_ps_settles_a_disputed_decryption_without_excluding_anyone(attack):
    """A worker that sends the others a crafted partial but shows the server its honest one, and a worker that reports
    every other worker's (valid) partial invalid: the server checks what the accused shows it and relays it, nobody
    is excluded, and the run is the honest one within CKKS noise and flooding (rounds 2 and 3 disputed)."""
    s = run(_ps("threshold", (f"rank=2,attack={attack},from-step=2",)))
    assert s.summary["dropped_workers"] == [] and s.summary["refused_payloads"] == [] and s.summary["rekeys"] == 0
    shown, relayed = (1, 2) if attack == "equivocate-partial" else (2, 2)  # per disputed round, 3 workers
    assert (s.summary["partials_shown"], s.summary["partials_relayed"]) == (2 * shown, 2 * relayed), s.summary
    cfg = _ps("threshold", ())
    tolerance = 1e-5 + flooding_tolerance(cfg)
    for name, ref in _plain().state.items():
        torch.testing.assert_close(s.state[name], ref, atol=tolerance, rtol=0)


@functools.cache
def _plain():
    return run(_ps("shared", ()).replace(crypto={"encrypt": "none"}))


@functools.cache
def _plain_audit(step: int):
    return run(_ps("shared", (f"rank=2,attack=noise,from-step={step}",), proof="audit"))


def _ring(malicious: tuple[str, ...], encrypt: str = "ckks", protocol: str = "gather") -> RunConfig:
    cfg = RunConfig(workers=3, epochs=1, max_steps=4, seed=1, progress=False, malicious=malicious)
    crypto = {"encrypt": encrypt, "keys": "threshold", "ring_ciphertexts": protocol}
    return cfg.replace(pattern={"name": "ring"}, crypto=crypto)


@pytest.mark.parametrize(
    "protocol, attack, start, reason",
    [
        ("gather", "crafted-ciphertext", 1, "ring: rank 1 sent an invalid ciphertext"),
        ("gather", "crafted-partial", 1, "ring: rank 1 sent an invalid partial decryption"),
        ("reduce-scatter", "crafted-ciphertext", 3, "ring: rank 1 sent an invalid ciphertext"),
        ("reduce-scatter", "crafted-partial", 2, "ring: rank 1 sent an invalid partial decryption"),
    ],
)
def test_the_ring_excludes_the_forger_and_follows_the_plaintext_audit(protocol, attack, start, reason):
    """Rank 1's first crafted payload goes out in round 1 (a round: gather, 1 ciphertext and 1 partial; reduce-scatter,
    3 ciphertexts and 2 partials, 3 ranks). Gather: every rank refuses the same all-gathered bytes. Reduce-scatter: a
    neighbour refuses it, every rank learns the complaint, the round is done again by gather (a dispute), where every
    rank refuses the same bytes. Either way rank 1 is excluded at round 1, ranks 0 and 2 re-key and redo it, and from
    then on step on their own mean: the model of a plaintext audit that rejects worker 1 from step 1 (1e-5 +
    flooding)."""
    s = run(_ring((f"rank=1,attack={attack},from-step={start}",), protocol=protocol))
    assert s.summary["excluded_ranks"] == [1] and s.summary["dropped_ranks"] == [1] and s.summary["rekeys"] == 1
    [exclusion] = s.summary["exclusions"]
    assert exclusion["round"] == 1 and reason in exclusion["reason"], exclusion
    assert s.summary["replicas_final"] == 2 and s.summary["ring_protocol"] == protocol
    # (disputed, gathered) rounds: gather, all 4 from the first; reduce-scatter, rounds 1-3 after the complaint
    disputes, gathered = (0, 4) if protocol == "gather" else (3, 3)
    assert (s.summary["dispute_rounds"], s.summary["gather_rounds"]) == (disputes, gathered), s.summary
    assert {c["by"] for c in s.summary["complaints"] if c["against"] == [1]} <= {0, 2}  # honest complaints only
    tolerance = 1e-5 + flooding_tolerance(_ring(()).replace(workers=2))
    for name, ref in _plain_audit(1).state.items():
        torch.testing.assert_close(s.state[name], ref, atol=tolerance, rtol=0)


@pytest.mark.parametrize(
    "attack, complaints",
    [("false-report", [(1, 1, [0, 2])]), ("equivocate-partial", [(1, 0, [1]), (1, 2, [1])])],
)
def test_a_false_complaint_or_an_equivocation_in_the_ring_excludes_nobody(attack, complaints):
    """From round 1, rank 1 reports both honest neighbours' (valid) payloads invalid, resp. sends its peers crafted
    partials but hands the all-gather its honest one (``equivocate-partial``: what it would show a ps server). The
    round goes to dispute mode, where every rank holds and validates the same bytes of every sender, so nobody is
    excluded; either's only gain is that every later round is settled in dispute mode too. The model is the
    plaintext ring's (flooding)."""
    s = run(_ring((f"rank=1,attack={attack},from-step=2",), protocol="reduce-scatter"))
    assert s.summary["excluded_ranks"] == [] and s.summary["exclusions"] == [] and s.summary["rekeys"] == 0
    assert [(c["round"], c["by"], c["against"]) for c in s.summary["complaints"]] == complaints
    assert s.summary["dispute_rounds"] == 3 and "replicas_lost" not in s.summary
    assert s.summary["decrypted_received"] > 0  # round 0 on the ring: shares of chunks their owners sent
    for name, ref in _plain_ring().state.items():
        torch.testing.assert_close(s.state[name], ref, atol=flooding_tolerance(_ring(())), rtol=0)


def test_in_gather_mode_every_member_decrypts_only_the_sum_it_computed():
    """The default protocol closes the reduce-scatter's decryption oracle (docs/wire.md): every partial decryption a
    member makes is of the sum it computed itself, and every member's sums are byte for byte the same ciphertexts
    (the chained digest of what each rank decrypted), so no member can choose what the others decrypt. Rank 1
    equivocates from round 1 (crafted partials to its peers, honest ones to the all-gather): in gather mode every
    partial goes through the all-gather, so that is no attack at all: no complaint, no exclusion, no dispute, and
    the model is the plaintext ring's (flooding)."""
    s = run(_ring(("rank=1,attack=equivocate-partial,from-step=1",)))
    stats = [r["stats"] for r in s.ranks]
    assert [(t["decrypted_own_sums"], t["decrypted_received"]) for t in stats] == [(4, 0)] * 3, stats
    assert len({t["decrypted_digest"] for t in stats}) == 1, stats
    assert s.summary["ring_protocol"] == "gather" and s.summary["gather_rounds"] == 4
    assert s.summary["dispute_rounds"] == 0 and s.summary["complaints"] == [] and s.summary["exclusions"] == []
    for name, ref in _plain_ring().state.items():
        torch.testing.assert_close(s.state[name], ref, atol=flooding_tolerance(_ring(())), rtol=0)


@functools.cache
def _plain_ring():
    return run(_ring((), encrypt="none"))


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--workers", "3", "--min-replicas", "3"], "2 of 3 ranks remain, fewer than --min-replicas 3"),
        (["--workers", "2"], "1 of 2 ranks remain, fewer than --min-replicas 2"),
    ],
)
def test_a_ring_left_below_min_replicas_fails_in_one_line(capsys, argv, needle):
    """Exclusion goes on only with enough survivors (and threshold keys need two): otherwise one line, named."""
    flags = ["--pattern", "ring", "--encrypt", "ckks", "--keys", "threshold", "--max-steps", "2", "--no-progress"]
    assert main(["train", *flags, *argv, "--malicious", "rank=1,attack=crafted-ciphertext"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ring: rank 1 sent an invalid ciphertext" in err[0] and needle in err[0], err


@pytest.mark.parametrize(
    "pattern, rank, who", [("ps", 1, "worker 0 (rank 1) evaluates the model"), ("ring", 0, "rank 0 evaluates")]
)
def test_the_coordinator_cannot_be_the_forger(capsys, pattern, rank, who):
    flags = ["--pattern", pattern, "--workers", "3", "--encrypt", "ckks", "--keys", "threshold"]
    assert main(["train", *flags, "--malicious", f"rank={rank},attack=crafted-ciphertext"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and who in err[0], err
