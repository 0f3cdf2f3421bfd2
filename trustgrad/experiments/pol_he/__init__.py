"""``trustgrad experiment pol-he``: does CKKS noise make the verifier reject honest proofs? The proposal, measured.

Rorat & Niyomufasha (2022) proposed Proof-of-Learning + homomorphic encryption for distributed training and left it
untested, worried that encryption noise would make the verifier reject valid proofs. This experiment answers with
numbers, in four parts, each on what trustgrad builds today:

1. **Honest acceptance vs CKKS scale and threshold** (:mod:`.acceptance`): honest gradients from a real digits/mlp
   trajectory (4 workers, PRF batches) are encrypted as ``ps --encrypt ckks`` workers do (pre-scaled by 1/W, scale
   2**s, 128-bit parameters), summed as the server does, decrypted (shared key, or 3-/4-party threshold keys whose
   partial decryptions add smudging noise), and audited against the plaintext replay with the auditor's relative-l2
   rule (:class:`trustgrad.audit.Auditor`), for each threshold.
2. **Detection per attack vs audit rate** (:mod:`.detection`): real ``ps --proof audit`` jobs (server + 3 workers
   over gloo), one malicious worker from step 2; the same attacks unverified; honest runs over many seeds.
3. **Cost per verified step** (:mod:`.cost`): one audit replay vs one plaintext step; ``ps --encrypt ckks`` (shared,
   threshold) vs plaintext ``ps``; the blind step check (:mod:`trustgrad.bench.blind`).
4. **What the server's view leaks** (:mod:`.leak`): iDLG on the view a ``ps`` server recorded, plaintext vs
   ciphertext (sigmoid LeNet, digits 32x32, batch 1).
5. **Blind verification inside training** (:mod:`.blind`): real ``ps --encrypt ckks --keys threshold --proof blind``
   jobs (logreg-poly, 4 workers): detection and exclusion per attack, honest seeds, accuracy against the all-honest
   run, and what a verified step and an epoch cost.

``--parts`` runs a subset (the report has a section per part run); the other options size the parts, so the issue's
acceptance sweeps are one command each (see docs/proposal.md).

Writes ``results.json``, ``results.md`` and PNG plots under ``--out``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ...options import OptionParser
from .. import EXPERIMENTS, ExperimentResult

__all__ = ["Settings", "QUICK", "run_pol_he"]

log = logging.getLogger(__name__)

ATTACKS = ("sign-flip", "noise", "scale", "label-flip", "free-rider", "random-batch", "forged-proof")
PARTS = ("acceptance", "detection", "cost", "leakage", "blind")


@dataclass(frozen=True)
class Settings:
    """Sizes of the experiment; the defaults take about 10 minutes on a loaded 2-core machine."""

    seeds: int = 3
    # part 1
    scales: tuple[int, ...] = (25, 30, 35, 40, 45, 50)
    thresholds: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 3e-4, 1e-3)
    key_modes: tuple[str, ...] = ("shared", "threshold-3", "threshold-4")
    he_workers: int = 4
    he_steps: int = 8  # rounds of the honest trajectory per seed
    # part 2
    workers: int = 3
    steps: int = 20
    from_step: int = 2
    rates: tuple[float, ...] = (0.1, 0.3, 1.0)
    attacks: tuple[str, ...] = ATTACKS
    honest_seeds: int = 20
    schedules: tuple[str, ...] = ("sync", "async")  # async: at audit rate 1.0 only
    # part 3
    encrypted_keys: tuple[str, ...] = ("shared", "threshold")
    blind_kinds: tuple[str, ...] = ("linear", "poly")
    blind_repeats: int = 2
    # part 4
    leak_steps: int = 50  # iDLG L-BFGS steps
    # part 5
    blind_workers: int = 4
    blind_steps: int = 2  # rounds per detection run: the attack's round (rejected, re-key), one round after
    blind_seeds: int = 1  # per attack
    blind_honest_seeds: int = 2
    blind_attacks: tuple[str, ...] = ATTACKS
    blind_accuracy_seeds: int = 0  # longer runs (all honest vs worker 1 excluded at step 0), per seed
    blind_accuracy_epochs: int = 3
    blind_lr: float = 0.3
    owner_poison_steps: int = 8  # rounds of the owner-poisoned-data runs (blind, audited, unverified); 0 skips
    owner_poison_seeds: int = 1
    parts: tuple[str, ...] = ("acceptance", "detection", "cost", "leakage", "blind")

    def check(self) -> None:
        if not 1 <= self.seeds <= 100:
            raise ConfigError(f"experiment pol-he: --seeds must be in [1, 100], got {self.seeds}")
        unknown = sorted(set(self.parts) - set(PARTS))
        if unknown or not self.parts:
            raise ConfigError(f"experiment pol-he: --parts must name some of {', '.join(PARTS)}; got {unknown}")
        if "cost" in self.parts and not {"acceptance", "detection"} <= set(self.parts):
            raise ConfigError("experiment pol-he: the cost part reads the acceptance and detection parts; run them too")
        bad = sorted(set(self.attacks + self.blind_attacks) - set(ATTACKS))
        if bad:
            raise ConfigError(f"experiment pol-he: unknown attacks {bad}; choose from {', '.join(ATTACKS)}")
        if not set(self.schedules) <= {"sync", "async", "ssp"} or not all(0 < r <= 1 for r in self.rates):
            raise ConfigError("experiment pol-he: --schedules from sync, async, ssp; --rates in (0, 1]")
        if self.owner_poison_steps < 0 or self.owner_poison_seeds < 1:
            raise ConfigError("experiment pol-he: --owner-poison-steps >= 0 and --owner-poison-seeds >= 1")
        if min(self.workers, self.blind_workers) < 3 or min(self.steps, self.blind_steps) < 1:
            raise ConfigError("experiment pol-he: --workers and --blind-workers >= 3, --steps >= 1")


QUICK = Settings(
    seeds=1,
    scales=(25, 50),
    key_modes=("shared", "threshold-3"),
    he_steps=1,
    steps=8,
    rates=(0.1, 1.0),
    attacks=("sign-flip", "label-flip"),
    honest_seeds=1,
    schedules=("sync",),
    encrypted_keys=("threshold",),
    blind_kinds=("linear",),
    blind_repeats=1,
    leak_steps=10,
    blind_workers=3,
    blind_steps=1,
    blind_honest_seeds=0,  # the attacked run's honest claims stand in (tests/test_ps_blind.py runs an honest job)
    blind_attacks=("sign-flip",),
    owner_poison_steps=1,
)


def run_pol_he(s: Settings, out: Path) -> ExperimentResult:
    """Run the four parts; write ``results.json``, ``results.md`` and the PNGs under ``out``."""
    from . import acceptance, blind, cost, detection, leak, report

    s.check()
    out.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"settings": asdict(s), "machine": _machine(), "seconds": {}}
    measures = {
        "acceptance": acceptance.measure,
        "detection": detection.measure,
        "cost": cost.measure,
        "leakage": leak.measure,
        "blind": blind.measure,
    }
    for name in PARTS:
        if name not in s.parts:
            continue
        part = measures[name]
        started = time.perf_counter()
        log.info("pol-he: part %s", name)
        data[name] = part(s, out, data)
        data["seconds"][name] = round(time.perf_counter() - started, 1)
    data["answer"] = report.answer(data)
    data["pngs"] = [p.name for p in report.plots(data, out)]
    table = report.markdown(data)
    (out / "results.json").write_text(json.dumps(_clean(data), indent=2, allow_nan=False) + "\n")
    (out / "results.md").write_text(table + "\n")
    return ExperimentResult("pol-he", table, out, data)


def _machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cpus": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in load]}


def _clean(value: Any) -> Any:
    """Strict JSON: non-finite floats become strings ("inf", "nan"), tuples lists, other objects their str()."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


@EXPERIMENTS.register("pol-he")
def run_experiment(argv: list[str]) -> ExperimentResult:
    parser = OptionParser(prog="trustgrad experiment pol-he", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/pol-he", help="folder for results.json, results.md and the PNGs")
    parser.add_argument("--seeds", type=int, help="seeds per configuration (default 3; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="a small version of every part (for tests)")
    parser.add_argument("--parts", help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    lists = {"schedules": str, "rates": float, "attacks": str, "blind_attacks": str}
    numbers = {"workers": int, "steps": int, "from_step": int, "honest_seeds": int, "blind_workers": int,
               "blind_steps": int, "blind_seeds": int, "blind_honest_seeds": int, "blind_accuracy_seeds": int,
               "blind_accuracy_epochs": int, "blind_lr": float, "owner_poison_steps": int,
               "owner_poison_seeds": int}  # fmt: skip
    for name in [*lists, *numbers]:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, help=f"Settings.{name} (see the module doc)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    changes: dict[str, Any] = {}
    try:
        for name, kind in {**lists, "parts": str}.items():
            if getattr(args, name) is not None:
                changes[name] = tuple(kind(v) for v in getattr(args, name).split(",") if v)
        for name, kind in numbers.items():
            if getattr(args, name) is not None:
                changes[name] = kind(getattr(args, name))
    except ValueError as exc:
        raise ConfigError(f"experiment pol-he: {exc}") from None
    if args.seeds is not None:
        changes["seeds"] = args.seeds
    settings = replace(settings, **changes)
    settings.check()
    return run_pol_he(settings, Path(args.out))
