"""Part 2: real ``ps --proof audit`` jobs with one malicious worker; the same attacks unverified; honest seeds.

Every run is a full job through :func:`trustgrad.run.run` (a server rank and W worker ranks over gloo). Worker 1
(rank 2) turns malicious at step ``from_step`` (:mod:`trustgrad.attacks.poisoning`). Recorded per run: was the
malicious worker excluded, the step of its first rejected claim, rolled-back contributions, honest workers wrongly
excluded, the final test accuracy, and the server's loop time. A run that fails is recorded with its error, never
dropped.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from ...config import RunConfig
from ...errors import TrustgradError

__all__ = ["measure", "base_config", "one_run", "mean_of", "MALICIOUS_WORKER"]

log = logging.getLogger(__name__)

MALICIOUS_WORKER = 1  # rank 2: rank 0 is the server


def base_config(s: Any, seed: int, schedule: str = "sync") -> RunConfig:
    # --steps decides the length (epochs only cap it: 1,000 is never the binding limit here)
    cfg = RunConfig(workers=s.workers, dataset="digits", epochs=1000, max_steps=s.steps, seed=seed, progress=False)
    staleness = {"staleness": 2} if schedule == "ssp" else {}  # SSP's bound S (ssp needs one)
    return cfg.replace(pattern={"name": "ps", "schedule": schedule, **staleness})


def one_run(cfg: RunConfig) -> dict[str, Any]:
    """The fields of one job's summary this experiment reads (``error`` if the job failed)."""
    from ...run import run

    try:
        s = run(cfg).summary
    except TrustgradError as exc:
        log.error("pol-he: run failed: %s", exc)
        return {"error": str(exc).splitlines()[0]}
    keys = ("test_accuracy", "steps", "wall_seconds", "train_seconds", "audited_claims", "claims", "rejected_claims")
    row = {k: s.get(k) for k in keys}
    row["excluded_workers"] = s.get("excluded_workers", [])
    row["rolled_back_steps"] = s.get("rolled_back_steps", 0)
    row["worst_accepted_rel_l2"] = s.get("worst_accepted_rel_l2")
    row["rejections"] = [{k: r[k] for k in ("worker", "step", "rel_l2")} for r in s.get("rejections", [])]
    row["repairs"] = s.get("audit_repairs", [])
    row["audit_threshold"] = s.get("audit_threshold")
    for k, v in s.items():
        if k.startswith("he_") or k in ("encrypted_bytes", "plaintext_equivalent_bytes", "ciphertext_expansion"):
            row[k] = v
    return row


def _attacked(s: Any, attack: str, seed: int, schedule: str, rate: float | None) -> dict[str, Any]:
    cfg = base_config(s, seed, schedule).replace(
        malicious=(f"rank={MALICIOUS_WORKER + 1},attack={attack},from-step={s.from_step}",)
    )
    if rate is not None:
        cfg = cfg.replace(proof={"mode": "audit", "audit_rate": rate})
    row = one_run(cfg)
    if "error" not in row and rate is not None:
        mine = [r for r in row["rejections"] if r["worker"] == MALICIOUS_WORKER]
        row["detected"] = MALICIOUS_WORKER in row["excluded_workers"]
        # sync: the round the liar was caught in (a late audit also rejects its earlier, logged lies)
        caught = [r["caught_at_version"] for r in row["repairs"] if MALICIOUS_WORKER in r["workers"]]
        first = caught[0] if caught else (mine[0]["step"] if mine else None)
        row["steps_to_detection"] = first - s.from_step if first is not None else None
        row["false_exclusions"] = [w for w in row["excluded_workers"] if w != MALICIOUS_WORKER]
    return row


def mean_of(rows: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in rows if r.get(key) is not None and "error" not in r]
    return float(np.mean(vals)) if vals else math.nan


def _summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if "error" not in r]
    return {
        "runs": len(rows),
        "errors": len(rows) - len(ok),
        "detected": sum(bool(r.get("detected")) for r in ok),
        "steps_to_detection_mean": mean_of(ok, "steps_to_detection"),
        "rolled_back_mean": mean_of(ok, "rolled_back_steps"),
        "caught_late": sum((r.get("steps_to_detection") or 0) > 0 for r in ok),
        "false_exclusions": sum(len(r.get("false_exclusions", [])) for r in ok),
        "accuracy_mean": mean_of(ok, "test_accuracy"),
        "min_rejected_rel_l2": min(
            (x["rel_l2"] for r in ok for x in r["rejections"] if x["worker"] == MALICIOUS_WORKER), default=math.nan
        ),
    }


def measure(s: Any, out: Path, data: dict[str, Any]) -> dict[str, Any]:
    seeds = range(s.seeds)
    result: dict[str, Any] = {"workers": s.workers, "steps": s.steps, "from_step": s.from_step, "rows": []}
    honest: dict[str, list[dict[str, Any]]] = {}
    for schedule in s.schedules:
        honest[f"{schedule}/unverified"] = [one_run(base_config(s, seed, schedule)) for seed in seeds]
    audit = {"mode": "audit", "audit_rate": 1.0}
    for schedule in s.schedules:
        honest[f"{schedule}/audit 1.0"] = [
            one_run(base_config(s, seed, schedule).replace(proof=audit)) for seed in range(max(s.honest_seeds, s.seeds))
        ]
    result["honest"] = {k: {"summary": _honest_summary(v), "runs": v} for k, v in honest.items()}
    for schedule in s.schedules:
        rates = s.rates if schedule == "sync" else (1.0,)
        ref = result["honest"][f"{schedule}/unverified"]["summary"]["accuracy_mean"]
        same_seed = honest[f"{schedule}/unverified"]
        for attack in s.attacks:
            unverified = [_attacked(s, attack, seed, schedule, None) for seed in seeds] if schedule == "sync" else []
            if unverified:
                result.setdefault("unverified", {})[attack] = unverified
            by_rate = {rate: [_attacked(s, attack, seed, schedule, rate) for seed in seeds] for rate in rates}
            for rate, runs in by_rate.items():
                row = {"schedule": schedule, "attack": attack, "audit_rate": rate, **_summarise(runs)}
                row["honest_accuracy"] = ref
                # the all-honest run of the same seed minus this run (positive: the attack cost accuracy)
                gaps = [h["test_accuracy"] - r["test_accuracy"] for h, r in zip(same_seed, runs)
                        if "error" not in h and "error" not in r]  # fmt: skip
                row["accuracy_gap_max"] = max(gaps, default=math.nan)
                row["unverified_accuracy"] = mean_of(unverified, "test_accuracy") if unverified else math.nan
                # the acceptance of exact repair: a run caught late ends where the run caught at once (rate 1) ends
                full = by_rate.get(1.0, [])
                gaps = [abs(f["test_accuracy"] - r["test_accuracy"]) for f, r in zip(full, runs)
                        if rate < 1.0 and "error" not in f and "error" not in r]  # fmt: skip
                row["gap_to_rate_1_max"] = max(gaps, default=math.nan)
                row["runs_detail"] = runs
                log.info("pol-he detection %s %s rate %g: %d/%d", schedule, attack, rate, row["detected"], row["runs"])
                result["rows"].append(row)
    return result


def _honest_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if "error" not in r]
    return {
        "runs": len(rows),
        "errors": len(rows) - len(ok),
        "audited_claims": sum(r.get("audited_claims") or 0 for r in ok),
        "false_rejections": sum(r.get("rejected_claims") or 0 for r in ok),
        "excluded": sum(len(r["excluded_workers"]) for r in ok),
        "worst_accepted_rel_l2": max((r.get("worst_accepted_rel_l2") or 0.0 for r in ok), default=math.nan),
        "accuracy_mean": mean_of(ok, "test_accuracy"),
        "server_seconds_per_step": mean_of([{"x": r["train_seconds"] / r["steps"]} for r in ok if r.get("steps")], "x"),
        "wall_seconds_mean": mean_of(ok, "wall_seconds"),
    }
