"""The seeded subset of the fuzz suite that ``make test`` runs (``make fuzz`` runs 10,000+ cases)."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.fuzz import harness
from tests.fuzz.targets import _selftest

SEEDED_CASES = 40  # per target: enough to reach every mutation family of a target a few times, seconds each


def test_harness_classifies_every_outcome():
    count = 10  # seed 5: every outcome, one hang and one crash (each costs a new worker)
    want = Counter(_selftest.behaviour(harness.case_rng(5, "_selftest", i)) for i in range(count))
    assert set(want) == set(harness.OUTCOMES), "the seed must exercise every outcome"
    report = harness.run_target("_selftest", count, seed=5, budget_mb=256, case_timeout=3.0, setup_timeout=120)
    assert report.counts == want
    assert {f.outcome for f in report.findings} == set(harness.FINDINGS)
    crash = next(f for f in report.findings if f.outcome == "crash")
    assert "SIGSEGV" in crash.detail


@pytest.mark.parametrize("target", harness.target_names())
def test_seeded_fuzz_finds_nothing(target):
    report = harness.run_target(target, SEEDED_CASES, seed=2026, case_timeout=60.0, setup_timeout=240)
    assert report.cases == SEEDED_CASES
    assert not report.findings, harness.format_table([report]) + "".join(
        f"\n{f.outcome} #{f.index}: {f.detail[:300]}" for f in report.findings
    )
