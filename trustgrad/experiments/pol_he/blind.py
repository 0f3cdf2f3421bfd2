"""Part 5: blind verification inside training, in real ``ps --encrypt ckks --keys threshold --proof blind`` jobs.

``logreg-poly`` on digits, ``blind_workers`` workers (4), batch 32, SGD at ``blind_lr`` without momentum (what the
server's encrypted model can take, ``protect/codecs/blind.py``):

1. **Detection**: per attack and seed, worker 1 (rank 2) malicious from step 0, ``blind_steps`` rounds (the attack's
   round: rejected, the survivors re-key; then rounds checked under the new keys). Recorded: excluded or not, at
   which step, the decrypted distance against the bound, honest workers excluded, re-key seconds.
2. **Honest runs** (``blind_honest_seeds``): false rejections and the worst honest distance.
3. **Accuracy** (``blind_accuracy_seeds`` > 0): per seed, ``blind_accuracy_epochs`` epochs of the blind run with
   worker 1 sign-flipping from step 0, of the same attack unverified, and of the all-honest run in plaintext ``ps``;
   the all-honest *blind* run on the first seed only. An honest blind run computes the plaintext run's SGD steps
   (``tests/test_ps_blind.py`` checks them step by step to 1e-6; the first seed shows the whole run ending at the
   same accuracy), so later seeds spend the machine on the caught runs instead. With every claim checked before
   aggregation and the rejected round discarded, the malicious worker's updates never reach the model, so after its
   exclusion every attack leaves the same three honest workers training: one attack stands for all seven here (the
   detection runs show each attack excluded at step 0).
4. **Owner-poisoned data** (``owner_poison_steps`` > 0): worker 1 shifts the labels of its own shard before it
   trains *and* before it encrypts its samples at set-up (``--malicious ...,attack=owner-poison``). Blind checks
   compare claims with the owner's own ciphertexts, so they accept it; a verifier that holds the true data (the
   plaintext auditor, or the auditor rank of ``--encrypt ckks --keys shared --proof audit``) replays on the true
   labels and rejects it. Same shape and seed for every row, plus the unverified and all-honest runs.
5. **Cost**, from those runs: setup, seconds per check and per verdict decryption, re-keying, the server's seconds per
   round against a plaintext ``ps`` job of the same shape run back to back.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from ...config import RunConfig
from ...errors import TrustgradError
from ...protect.codecs.blind import check_threads
from .detection import MALICIOUS_WORKER, mean_of

__all__ = ["measure", "blind_config"]

log = logging.getLogger(__name__)


def blind_config(s: Any, seed: int, *, steps: int | None = None, epochs: int = 10, blind: bool = True) -> RunConfig:
    cfg = RunConfig(
        workers=s.blind_workers, dataset="digits", seed=seed, progress=False, lr=s.blind_lr, momentum=0.0,
        max_steps=steps, epochs=epochs, timeout=600.0,  # a blind round on loaded cores can pass the default 120 s
    ).replace(pattern={"name": "ps"}, model={"name": "logreg-poly"})  # fmt: skip
    if blind:
        cfg = cfg.replace(
            crypto={"encrypt": "ckks", "keys": "threshold"},
            proof={"mode": "blind", "audit_rate": 1.0},
            server_threads=check_threads(),
        )
    return cfg


_LOG: list[Path] = []  # where each finished run is appended (runs.jsonl), so a long sweep keeps what it measured


def _run(cfg: RunConfig) -> dict[str, Any]:
    from ...run import run

    try:
        s = run(cfg).summary
    except TrustgradError as exc:
        log.error("pol-he blind: run failed: %s", exc)
        return _logged(cfg, {"error": str(exc).splitlines()[0]})
    keys = (
        "test_accuracy", "steps", "wall_seconds", "train_seconds", "audited_claims", "rejected_claims",
        "excluded_workers", "rejections", "discarded_claims", "rekeys", "rekey_seconds", "check_seconds_per_claim",
        "verdict_seconds_per_claim", "setup_seconds", "worst_accepted_distance", "bound", "model_versions",
        "bytes_sent", "server_key_material",
    )  # fmt: skip
    return _logged(cfg, {k: s.get(k) for k in keys})


def _logged(cfg: RunConfig, row: dict[str, Any]) -> dict[str, Any]:
    if _LOG:
        what = {"seed": cfg.seed, "proof": cfg.proof.mode, "malicious": list(cfg.malicious), "epochs": cfg.epochs}
        with _LOG[0].open("a") as f:
            f.write(json.dumps({**what, **row}, default=str) + "\n")
    return row


def _attacked(s: Any, attack: str, seed: int, **kw: Any) -> dict[str, Any]:
    cfg = blind_config(s, seed, **kw).replace(malicious=(f"rank={MALICIOUS_WORKER + 1},attack={attack},from-step=0",))
    row = _run(cfg)
    if "error" not in row and cfg.proof.mode == "blind":
        mine = [r for r in row["rejections"] or [] if r["worker"] == MALICIOUS_WORKER]
        row["detected"] = MALICIOUS_WORKER in (row["excluded_workers"] or [])
        row["detection_step"] = mine[0]["step"] if mine else None
        row["distance"] = mine[0]["distance"] if mine else None
        row["false_exclusions"] = [w for w in row["excluded_workers"] or [] if w != MALICIOUS_WORKER]
    return row


def measure(s: Any, out: Path, data: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"workers": s.blind_workers, "steps": s.blind_steps, "lr": s.blind_lr, "rows": []}
    _LOG[:] = [out / "blind-runs.jsonl"]
    by_attack: dict[str, list[dict[str, Any]]] = {a: [] for a in s.blind_attacks}
    for seed in range(s.blind_seeds):  # seed-major: a sweep cut short still has every attack at similar counts
        for attack in s.blind_attacks:
            by_attack[attack].append(_attacked(s, attack, seed, steps=s.blind_steps))
    for attack, runs in by_attack.items():
        ok = [r for r in runs if "error" not in r]
        distances = [r["distance"] for r in ok if r.get("distance") is not None]
        result["rows"].append(
            {
                "attack": attack,
                "runs": len(runs),
                "errors": len(runs) - len(ok),
                "detected": sum(bool(r.get("detected")) for r in ok),
                "detection_step_max": max((r["detection_step"] for r in ok if r.get("detected")), default=None),
                "false_exclusions": sum(len(r.get("false_exclusions", [])) for r in ok),
                "min_distance": min(distances, default=math.nan),
                "bound": ok[0]["bound"] if ok else math.nan,
                "worst_honest_distance": max((r["worst_accepted_distance"] or 0.0 for r in ok), default=math.nan),
                "honest_claims_checked": sum((r["audited_claims"] or 0) - (r["rejected_claims"] or 0) for r in ok),
                "rekey_seconds": mean_of(ok, "rekey_seconds"),
                "runs_detail": runs,
            }
        )
        log.info("pol-he blind %s: %d/%d detected", attack, result["rows"][-1]["detected"], len(runs))
    honest = [_run(blind_config(s, seed, steps=s.blind_steps)) for seed in range(s.blind_honest_seeds)]
    ok = [r for r in honest if "error" not in r]
    result["honest"] = {
        "runs": len(honest),
        "errors": len(honest) - len(ok),
        "claims": sum(r["audited_claims"] or 0 for r in ok),
        "false_rejections": sum(r["rejected_claims"] or 0 for r in ok),
        "excluded": sum(len(r["excluded_workers"] or []) for r in ok),
        "worst_distance": max((r["worst_accepted_distance"] or 0.0 for r in ok), default=math.nan),
        "bound": ok[0]["bound"] if ok else math.nan,
        "runs_detail": honest,
    }
    result["accuracy"] = _accuracy(s)
    result["owner_poison"] = _owner_poison(s) if s.owner_poison_steps else []
    # with no all-honest run (--quick), the attacked runs' rounds price a verified round: set-up and checks are the
    # same work whether a claim passes or not
    attacked = [r for row in result["rows"] for r in row["runs_detail"] if "error" not in r]
    result["cost"] = _cost(s, ok or attacked)
    return result


def _accuracy(s: Any) -> list[dict[str, Any]]:
    rows = []
    for seed in range(s.blind_accuracy_seeds):
        kw = {"epochs": s.blind_accuracy_epochs}
        runs = {
            "caught": _attacked(s, "sign-flip", seed, **kw),
            "unverified": _attacked(s, "sign-flip", seed, blind=False, **kw),
            "plain": _run(blind_config(s, seed, blind=False, **kw)),
        }
        if seed == 0:  # the all-honest blind run: on the first seed only (module docstring)
            runs["honest"] = _run(blind_config(s, seed, **kw))
        row: dict[str, Any] = {"seed": seed, "epochs": s.blind_accuracy_epochs}
        for name in ("honest", "caught", "unverified", "plain"):
            r = runs.get(name, {})
            row[name] = r.get("test_accuracy") if "error" not in r else None
            row[f"{name}_error"] = r.get("error")
        caught = runs["caught"]
        row["caught_detected"] = bool(caught.get("detected"))
        row["caught_server_seconds_per_round"] = (
            caught["train_seconds"] / max(1, caught["model_versions"]) if "error" not in caught else None
        )
        rows.append(row)
        log.info("pol-he blind accuracy seed %d: %s", seed, row)
    return rows


#: how each row of the owner-poisoned-data table checks claims: (label, who holds the true data, config changes)
_OWNER_ROWS = (
    ("blind (threshold CKKS, server checks on ciphertexts)", "nobody but the owner", {"blind": True}),
    ("plaintext audit (ps --proof audit)", "the auditor (data holder)", {"proof": "audit"}),
    ("encrypted audit (ckks shared, auditor rank)", "the auditor rank (data holder, key holder)", {"proof": "audit",
     "crypto": {"encrypt": "ckks", "keys": "shared"}}),
    ("unverified", "-", {}),
)  # fmt: skip


def _owner_poison(s: Any) -> list[dict[str, Any]]:
    rows = []
    spec = (f"rank={MALICIOUS_WORKER + 1},attack=owner-poison",)
    for seed in range(s.owner_poison_seeds):
        honest = _run(blind_config(s, seed, steps=s.owner_poison_steps, blind=False))
        for label, holder, how in _OWNER_ROWS:
            cfg = blind_config(s, seed, steps=s.owner_poison_steps, blind=bool(how.get("blind")))
            if "proof" in how:
                cfg = cfg.replace(proof={"mode": "audit", "audit_rate": 1.0}, crypto=how.get("crypto", {}))
            run = _run(cfg.replace(malicious=spec))
            row = {"seed": seed, "check": label, "true_data_held_by": holder, "steps": s.owner_poison_steps}
            if "error" in run:
                rows.append({**row, "error": run["error"]})
                continue
            mine = [r for r in run["rejections"] or [] if r["worker"] == MALICIOUS_WORKER]
            verified = cfg.proof.mode != "none"
            row.update(
                caught=(MALICIOUS_WORKER in (run["excluded_workers"] or [])) if verified else None,
                caught_at_step=mine[0]["step"] if mine else None,
                claims_checked=run["audited_claims"] if verified else None,
                claims_accepted=(run["audited_claims"] or 0) - (run["rejected_claims"] or 0) if verified else None,
                honest_excluded=len([w for w in run["excluded_workers"] or [] if w != MALICIOUS_WORKER]),
                accuracy=run["test_accuracy"],
                honest_accuracy=honest.get("test_accuracy"),
            )
            rows.append(row)
            log.info("pol-he owner-poisoned data: %s", row)
    return rows


def _cost(s: Any, honest: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds of the honest blind runs, and a plaintext ps job of the same shape and steps run right after."""
    plain = _run(blind_config(s, 0, steps=s.blind_steps, blind=False))
    return {
        "setup_seconds": mean_of(honest, "setup_seconds"),
        "check_seconds_per_claim": mean_of(honest, "check_seconds_per_claim"),
        "verdict_seconds_per_claim": mean_of(honest, "verdict_seconds_per_claim"),
        "server_seconds_per_round": mean_of(
            [{"x": r["train_seconds"] / max(1, r["model_versions"])} for r in honest if r.get("train_seconds")], "x"
        ),
        "plaintext_seconds_per_round": plain["train_seconds"] / max(1, plain["model_versions"] or plain["steps"])
        if "error" not in plain
        else math.nan,
        "bytes_per_run": mean_of(honest, "bytes_sent"),
        "server_key_material": honest[0]["server_key_material"] if honest else None,
    }
