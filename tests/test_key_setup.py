"""Threshold key set-up against rogue key parties, in real ps and ring jobs: each attack is stopped and named at set-up,
before any ciphertext exists (docs/threshold-keys.md)."""

from __future__ import annotations

import re

import pytest

from trustgrad.config import RunConfig
from trustgrad.errors import LaunchError
from trustgrad.run import run

# what each attack leaves for the honest parties to see, naming the rogue (party index, rank)
CHAIN = r"{who}'s public key contribution is not on the common public element"
CANCEL = r"{who} revealed a public key share that does not open its commitment"
EQUIVOCATE = r"seen differently by different parties: {who}"


@pytest.mark.parametrize(
    "pattern, rogue, attack, expected",
    [
        ("ps", 2, "rogue-key-chain", CHAIN),
        ("ps", 2, "rogue-key-cancel", CANCEL),
        ("ps", 3, "rogue-key-equivocate", EQUIVOCATE),
        ("ring", 1, "rogue-key-chain", CHAIN),
        ("ring", 2, "rogue-key-cancel", CANCEL),
    ],
)
def test_a_rogue_key_party_is_named_at_set_up(pattern, rogue, attack, expected):
    cfg = RunConfig(workers=3, epochs=1, max_steps=2, seed=2, progress=False, timeout=60.0)
    cfg = cfg.replace(pattern={"name": pattern}, crypto={"encrypt": "ckks", "keys": "threshold"})
    cfg = cfg.replace(malicious=(f"rank={rogue},attack={attack}",))
    party = rogue if pattern == "ps" else rogue + 1  # ps: workers are ranks 1..W; ring: ranks 0..W-1
    with pytest.raises(LaunchError) as caught:
        run(cfg)
    message = str(caught.value)
    assert re.search(expected.format(who=rf"party {party} \(rank {rogue}\)"), message), message
    assert "key set-up" in message or "contribution" in message  # stopped at set-up: nothing was encrypted
