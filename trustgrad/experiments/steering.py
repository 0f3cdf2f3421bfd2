"""``trustgrad experiment steering``: what a worker gains by steering every update just under the audit threshold.

A liar that knows the auditor's threshold can push ``g + S |g| u`` for any direction ``u`` and stay accepted while
``S`` is below it (:mod:`trustgrad.attacks.backdoor`: ``u`` points toward a trigger-patch backdoor). This runs real
``ps --proof audit`` jobs (digits/mlp, sync) for thousands of steps:

1. honest, unverified and audited (the calibrated threshold and its measured basis, from the run's summary);
2. the steering worker at ``S = 2.9e-4`` under the old fixed threshold 3e-4 (accepted every step), and under the
   calibrated threshold (exact where replay is bit-exact: caught at its first push);
3. the steering worker at 0.9 x the ``cross-thread`` threshold (the looser calibrated policy), audited under it;
4. larger pushes, unverified, to show what more slack would buy (the dose-response of the backdoor).

Per run: the step the liar was caught at, honest exclusions, test accuracy and the backdoor's success rate (test
images of other classes that the patch turns into the target class). Writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError, TrustgradError
from ..options import OptionParser
from . import EXPERIMENTS, ExperimentResult

__all__ = ["Settings", "run_steering"]

log = logging.getLogger(__name__)

LIAR = 2  # rank 2 = worker 1


@dataclass(frozen=True)
class Settings:
    """Sizes of the experiment; the defaults take a few minutes per run on 2 loaded cores."""

    workers: int = 4
    steps: int = 2000
    seeds: int = 1
    push: float = 2.9e-4  # just under the old fixed threshold
    legacy_threshold: float = 3e-4
    larger: tuple[float, ...] = (1e-2, 1e-1, 1.0)  # unverified pushes: what more slack buys

    def check(self) -> None:
        if not (3 <= self.workers <= 16 and 1 <= self.steps <= 100_000 and 1 <= self.seeds <= 20):
            raise ConfigError("experiment steering: --workers in [3, 16], --steps in [1, 100000], --seeds in [1, 20]")
        if not 0 < self.push < 1 or not all(0 < s <= 10 for s in self.larger):
            raise ConfigError("experiment steering: --push in (0, 1), --larger values in (0, 10]")


@dataclass(frozen=True)
class Case:
    name: str
    push: float | None  # None: every worker honest
    audit: str | None  # None: unverified; else the --audit-threshold policy or value


def cases(s: Settings, cross_thread: float) -> list[Case]:
    near = 0.9 * cross_thread
    return [
        Case("honest, unverified", None, None),
        Case("honest, audited (calibrated)", None, "calibrated"),
        Case(f"steer S={s.push:g}, audited at the old fixed {s.legacy_threshold:g}", s.push, f"{s.legacy_threshold!r}"),
        Case(f"steer S={s.push:g}, audited (calibrated)", s.push, "calibrated"),
        Case(f"steer S={near:.2g} (0.9 x cross-thread threshold), audited (cross-thread)", near, "cross-thread"),
        *[Case(f"steer S={p:g}, unverified", p, None) for p in s.larger],
    ]


def cross_thread_threshold(workers: int) -> float:
    """The threshold the ``cross-thread`` policy sets on this machine (what an adaptive liar would aim under)."""
    from ..audit.auditor import Auditor
    from ..audit.calibration import decide
    from ..config import RunConfig
    from ..data import load_dataset

    cfg = RunConfig(workers=workers, progress=False)
    auditor = Auditor(cfg, load_dataset(cfg.dataset), workers)
    return decide("cross-thread", auditor.calibration.measured).threshold


def one_run(s: Settings, case: Case, seed: int, folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    from ..attacks.backdoor import backdoor_success
    from ..config import RunConfig
    from ..data import load_dataset
    from ..models import build_model
    from ..run import run

    cfg = RunConfig(workers=s.workers, epochs=100_000, max_steps=s.steps, seed=seed, progress=False, out=str(folder))
    cfg = cfg.replace(pattern={"name": "ps"})
    if case.push is not None:
        cfg = cfg.replace(malicious=(f"rank={LIAR},attack=steer,strength={case.push!r}",))
    if case.audit is not None:
        cfg = cfg.replace(proof={"mode": "audit", "audit_rate": 1.0, "audit_threshold": case.audit})
    started = time.perf_counter()
    try:
        summary = run(cfg).summary
    except TrustgradError as exc:
        log.error("steering: %s seed %d failed: %s", case.name, seed, exc)
        return {"case": case.name, "seed": seed, "error": str(exc).splitlines()[0]}
    ds = load_dataset(cfg.dataset)
    model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, seed, cfg.model)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    rejections = [r for r in summary.get("rejections", []) if r["worker"] == LIAR - 1]
    return {
        "case": case.name,
        "seed": seed,
        "push": case.push,
        "audit": case.audit,
        "threshold": summary.get("audit_threshold"),
        "threshold_basis": summary.get("audit_threshold_basis"),
        "caught_at_step": rejections[0]["step"] if rejections else None,
        "honest_excluded": [w for w in summary.get("excluded_workers", []) if w != LIAR - 1],
        "worst_accepted_rel_l2": summary.get("worst_accepted_rel_l2"),
        "audited_claims": summary.get("audited_claims"),
        "test_accuracy": summary["test_accuracy"],
        "backdoor_success": backdoor_success(model, ds.x_test, ds.y_test),
        "seconds": round(time.perf_counter() - started, 1),
    }


def run_steering(s: Settings, out: Path) -> ExperimentResult:
    s.check()
    out.mkdir(parents=True, exist_ok=True)
    cross = cross_thread_threshold(s.workers)
    rows = []
    for i, case in enumerate(cases(s, cross)):
        for seed in range(s.seeds):
            row = one_run(s, case, seed, out / "runs" / f"{i}-seed{seed}")
            log.info("steering: %s", row)
            rows.append(row)
            with (out / "runs.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
    data = {"settings": asdict(s), "cross_thread_threshold": cross, "rows": rows}
    table = markdown(data)
    (out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "results.md").write_text(table + "\n")
    return ExperimentResult("steering", table, out, data)


def _g(x: Any, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def markdown(data: dict[str, Any]) -> str:
    s = data["settings"]
    out = [
        f"## Steering just under the audit threshold (ps sync, digits/mlp, {s['workers']} workers, {s['steps']} steps, "
        f"worker {LIAR - 1} steering from step 0 toward a {2}x{2}-patch backdoor, target class 0)",
        "",
        "| run | seed | threshold | caught at step | honest excluded | worst accepted rel_l2 | accuracy "
        "| backdoor success |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        if "error" in r:
            out.append(f"| {r['case']} | {r['seed']} | error: {r['error']} | | | | | |")
            continue
        out.append(
            f"| {r['case']} | {r['seed']} | {_g(r['threshold'])} | {_g(r['caught_at_step'], 'd')} "
            f"| {len(r['honest_excluded'])} | {_g(r['worst_accepted_rel_l2'])} | {r['test_accuracy']:.3f} "
            f"| {r['backdoor_success']:.3f} |"
        )
    basis = next((r["threshold_basis"] for r in data["rows"] if r.get("audit") == "calibrated"), None)
    out += [
        "",
        f"Calibrated threshold basis: {basis}.",
        f"Cross-thread threshold: {data['cross_thread_threshold']:.3g}.",
    ]
    return "\n".join(out)


@EXPERIMENTS.register("steering")
def run_experiment(argv: list[str]) -> ExperimentResult:
    parser = OptionParser(prog="trustgrad experiment steering", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/steering", help="folder for results.json, results.md, runs/")
    parser.add_argument("--workers", type=int, help="workers per job (default 4)")
    parser.add_argument("--steps", type=int, help="steps per job (default 2000)")
    parser.add_argument("--seeds", type=int, help="seeds per case (default 1)")
    parser.add_argument("--push", type=float, help="the steering bound S of the audited cases (default 2.9e-4)")
    parser.add_argument("--larger", help="comma-separated unverified pushes (default 0.01,0.1,1)")
    args = parser.parse_args(argv)
    changes: dict[str, Any] = {k: getattr(args, k) for k in ("workers", "steps", "seeds", "push")}
    changes = {k: v for k, v in changes.items() if v is not None}
    if args.larger is not None:
        try:
            changes["larger"] = tuple(float(v) for v in args.larger.split(",") if v)
        except ValueError as exc:
            raise ConfigError(f"experiment steering: --larger: {exc}") from None
    settings = replace(Settings(), **changes)
    settings.check()
    return run_steering(settings, Path(args.out))
