"""``ps --encrypt ckks --keys threshold --proof blind``: the server checks every claim on ciphertexts."""

from __future__ import annotations

import pytest
import torch

from trustgrad.cli import main
from trustgrad.config import RunConfig
from trustgrad.crypto import FLOODING
from trustgrad.models import build_model, poly_bce
from trustgrad.protect.codecs.blind import K, check_threads
from trustgrad.run import run

# a blind job reserves about 8 GB (trustgrad.admission): beside `make demo`'s blind job it may wait for that one to end
# (about 5 minutes under load) before its own 1-2 minutes
pytestmark = pytest.mark.timeout(1200)


def _cfg(steps: int, blind: bool = True, malicious: tuple[str, ...] = ()) -> RunConfig:
    cfg = RunConfig(workers=3, epochs=1, max_steps=steps, seed=5, lr=0.3, momentum=0.0, progress=False)
    cfg = cfg.replace(pattern={"name": "ps"}, model={"name": "logreg-poly"}, malicious=malicious)
    if blind:
        # the server's threads as the demo chooses them (the idle cores)
        cfg = cfg.replace(
            crypto={"encrypt": "ckks", "keys": "threshold"}, proof={"mode": "blind"}, server_threads=check_threads()
        )
    return cfg


def test_logreg_poly_trains_on_the_loss_the_blind_check_recomputes():
    model = build_model("logreg-poly", (1, 8, 8), 10, seed=0)
    assert model.trustgrad_loss == "poly-bce" and "trustgrad_loss" not in dict(model.named_modules())
    z = torch.randn(4, 10, requires_grad=True)
    y = torch.tensor([1, 2, 3, 4])
    poly_bce(z, y).backward()
    s = 0.5 + 0.197 * z - 0.004 * z**3
    expected = (s - torch.nn.functional.one_hot(y, 10)) / 4
    torch.testing.assert_close(z.grad, expected.detach(), rtol=0, atol=1e-6)


def test_honest_blind_training_equals_plaintext_and_the_server_holds_no_share():
    blind, plain = run(_cfg(2)), run(_cfg(2, blind=False))
    s = blind.summary
    assert s["audited_claims"] == 6 and s["rejected_claims"] == 0 and s["excluded_workers"] == []
    # CKKS noise (~1e-11) plus the flooding noise of the verdicts (sigma ~3.4e-3) against the bound 7 sigma + 2.3e-10
    assert 0 <= s["worst_accepted_distance"] <= s["bound"] and s["bound"] > 7 * s["flooding_sigma"] > 0
    assert "SECRET KEY" not in s["server_key_material"] and "3 parties" in s["server_key_material"][1]
    # the same two SGD steps, up to the noise of the decrypted K-scaled mean: CKKS's (~1e-9) and, dominating, the 3
    # parties' flooding (docs/threshold-keys.md): lr * sqrt(3) * sigma / K per weight and step, 6 sigma, 2 steps
    tolerance = 6 * 0.3 * 3**0.5 * FLOODING.sigma(40) / K * 2**0.5
    for k, v in plain.state.items():
        torch.testing.assert_close(blind.state[k], v, rtol=0, atol=tolerance)


def test_a_lying_worker_is_caught_before_its_update_lands_and_the_survivors_rekey():
    s = run(_cfg(3, malicious=("rank=2,attack=scale,from-step=1",))).summary
    assert s["excluded_workers"] == [1] and s["dropped_workers"] == [1]
    (rejection,) = s["rejections"]
    assert rejection["worker"] == 1 and rejection["step"] == 1
    # the weighted distance of a 10x gradient (measured 172) against the bound with the verdicts' flooding (0.0237)
    assert rejection["distance"] > 1000 * rejection["bound"]
    assert s["rekeys"] == 1 and s["discarded_claims"] == 2  # workers 0 and 2's honest claims of that round
    assert s["audited_claims"] == 3 + 3 + 2  # round 2 ran under the new 2-party keys
    assert s["worst_accepted_distance"] <= s["bound"]
    assert "2 parties" in s["server_key_material"][1]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--model", "mlp"], "HE-friendly models whose SGD step it recomputes on ciphertexts: logreg-poly"),
        (["--model", "logreg-poly", "--keys", "shared"], "needs --keys threshold"),
        (["--model", "logreg-poly", "--schedule", "async"], "runs --schedule sync"),
        (["--model", "logreg-poly"], "needs --momentum 0"),
        (["--model", "logreg-poly", "--momentum", "0", "--audit-rate", "1.5"], "audit_rate must be in (0, 1]"),
        (["--model", "logreg-poly", "--momentum", "0", "--audit-rate", "0.5"], "needs --audit-rate 1"),
        (["--model", "logreg-poly", "--momentum", "0", "--malicious", "rank=2,attack"], "malformed"),
        (["--model", "logreg-poly", "--momentum", "0", "--malicious", "rank=1,attack=noise"], "make another rank"),
    ],
)
def test_bad_blind_input_is_one_line_exit_2(capsys, argv, needle):
    base = ["train", "--pattern", "ps", "--encrypt", "ckks", "--keys", "threshold", "--proof", "blind"]
    assert main([*base, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_blind_is_refused_by_other_patterns(capsys):
    argv = ["train", "--pattern", "allreduce", "--model", "logreg-poly", "--proof", "blind"]
    assert main(argv) == 2
    assert "patterns that support it: ps" in capsys.readouterr().err
