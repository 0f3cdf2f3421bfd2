"""``trustgrad experiment robustness``: attack x defence x partition on the ps sync round, several seeds.

Each cell trains digits/mlp with n workers of which the last f are malicious and colluding, under one defence: the
plain mean, a robust rule (``--aggregate``) or audits (``--proof audit`` at a rate), on IID or Dirichlet label-skewed
shards. The cells run on ``rounds.SyncRounds`` (the ps sync server's arithmetic in one process; a real multi-process
job ends on the same model, tests/test_robust_ps.py), so the whole table fits a small shared machine. Reported per cell:
test accuracy (mean over seeds and each seed's), its drop from two anchors of the same seed and partition (the
all-honest plain run of all n workers, and the n - f honest workers alone: the run an exclusion at step 0 can at best
end on), backdoor success on triggered test images, what the defence decided (attackers excluded and when, honest
workers excluded, the share of rounds whose update took an attacker's vector whole) and its cost per step; per
partition and seed, the share of each class the attackers' shards hold.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from ...config import PatternConfig, ProofConfig, RunConfig
from ...errors import ConfigError
from ...options import OptionParser
from .. import EXPERIMENTS, ExperimentResult
from .report import plot, table

__all__ = ["DEFENCES", "ATTACKS", "HONEST_ONLY", "cell_config", "run_experiment"]

log = logging.getLogger(__name__)


def _rule(spec: str):  # noqa: ANN202 - (n, f) -> config changes
    return lambda n, f: {"aggregate": spec.format(f=f, trim=f / n, fb=min(f, max(0, (n - 3) // 4)))}


#: defence -> (n, f) -> the RunConfig fields it sets; every rule is told the true f (Bulyan: the largest f it allows).
#: Each variant is a named defence with its parameters fixed, so one command makes the whole table.
DEFENCES = {
    "mean": lambda n, f: {},
    "krum": _rule("krum,f={f}"),
    "multi-krum": _rule("multi-krum,f={f}"),
    "median": _rule("median"),
    "trimmed-mean": _rule("trimmed-mean,trim={trim}"),
    "bulyan": _rule("bulyan,f={fb}"),
    "centered-clipping": _rule("centered-clipping,tau=1"),
    "cc-tau2": _rule("centered-clipping,tau=2"),
    # Karimireddy et al.'s setting: momentum at the workers (the gate keeps it per sender), clipped; the server steps
    # plain SGD at lr / (1 - momentum), the same steady-state step as the other cells' heavy ball
    "cc-momentum": lambda n, f: {"aggregate": "centered-clipping,tau=1,beta=0.9", "momentum": 0.0},
    "audit-1": lambda n, f: {"proof": ProofConfig(mode="audit", audit_rate=1.0)},
    "audit-0.1": lambda n, f: {"proof": ProofConfig(mode="audit", audit_rate=0.1)},
    # the auditor holds every shard's data: it trains an excluded worker's shard in its place (--excluded-shard)
    "audit-1-stand-in": lambda n, f: {"proof": ProofConfig(mode="audit", audit_rate=1.0, excluded_shard="auditor")},
}
#: attacks (``--malicious attack=``); ``none`` is the all-honest job
ATTACKS = ("none", "alie", "ipm", "min-max", "min-sum", "backdoor", "sign-flip", "label-flip")
#: the second anchor, a row of its own: the n - f honest workers alone (the last f never push), plain mean, on the
#: n-worker shards. An exclusion at step 0 can at best end here: the excluded workers' data leaves with them.
HONEST_ONLY = "honest-only"
QUICK = {
    "attacks": ["none", "ipm"],
    "defences": ["mean", "krum", "median", "audit-1", "audit-1-stand-in"],
    "partitions": ["iid"],
    "epochs": 2,
    "seeds": 1,
}


def cell_config(base: RunConfig, attack: str, defence: str, partition: str, f: int, seed: int) -> RunConfig:
    n = base.workers
    bad = () if attack in ("none", HONEST_ONLY) else tuple(f"rank={n - i},attack={attack}" for i in range(f))
    fields: dict[str, Any] = {"malicious": bad, "partition": partition, "seed": seed}
    fields.update(DEFENCES[defence](n, f))
    if fields.get("momentum") == 0.0 and base.momentum:
        fields["lr"] = base.lr / (1 - base.momentum)
    return RunConfig(**{**{k: getattr(base, k) for k in base.__dataclass_fields__}, **fields})


def _parse(argv: list[str]) -> Any:
    parser = OptionParser(prog="trustgrad experiment robustness", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/robustness", help="folder for results.json, results.md, PNGs")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--malicious", type=int, default=2, help="colluding malicious workers f (the last f)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=3, help="seeds seed..seed+S-1 per cell")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dirichlet-alpha", type=float, default=0.1)
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--defences", nargs="+", default=list(DEFENCES), choices=list(DEFENCES))
    parser.add_argument("--partitions", nargs="+", default=["iid", "dirichlet"], choices=["iid", "dirichlet"])
    parser.add_argument(
        "--dirichlet-attacks", nargs="+", default=["none", "alie", "ipm"], choices=ATTACKS,
        help="attacks also run on Dirichlet shards (all of --attacks run on IID)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a small version (seconds): " + json.dumps(QUICK))
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        args.dirichlet_attacks = args.attacks
    if not 1 <= args.seeds <= 100 or not 0 <= args.malicious < args.workers / 2 or not 2 <= args.workers <= 64:
        raise ConfigError("experiment robustness: --seeds in [1, 100], --workers in [2, 64], 0 <= --malicious < n/2")
    return args


@EXPERIMENTS.register("robustness")
def run_experiment(argv: list[str]) -> ExperimentResult:
    args = _parse(argv)
    base = RunConfig(
        pattern=PatternConfig(name="ps"), workers=args.workers, epochs=args.epochs, batch_size=args.batch_size,
        partition_alpha=args.dirichlet_alpha, progress=False,
    )  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # every cell installs its malicious wrappers and audits log each exclusion: the table reports them, the log need not
    quiet = [logging.getLogger(name) for name in ("trustgrad.attacks", "trustgrad.audit", "trustgrad.patterns.ps")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        cells = _cells(args, base, out / "cells.jsonl")
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    _add_drops(cells)
    wall = time.perf_counter() - started
    seeds = list(range(args.seed, args.seed + args.seeds))
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    data = {
        "settings": settings, "seeds": seeds, "wall_seconds": wall, "num_params": _num_params(base), "cells": cells,
        "attackers_class_share": _class_shares(base, args.partitions, args.malicious, seeds),
    }  # fmt: skip
    text = table(data)
    (out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "results.md").write_text(text + "\n")
    plot(data, out / "robustness.png")
    return ExperimentResult("robustness", text, out, data)


def _cells(args: Any, base: RunConfig, progress: Path) -> list[dict[str, Any]]:
    """Every cell, each appended to ``progress`` as it completes (a long table keeps what it has if stopped)."""
    from .rounds import SyncRounds

    progress.write_text("")
    cells: list[dict[str, Any]] = []
    seeds = list(range(args.seed, args.seed + args.seeds))
    n, f = args.workers, args.malicious
    for partition in args.partitions:
        attacks = args.attacks if partition == "iid" else [a for a in args.attacks if a in args.dirichlet_attacks]
        anchor = [(HONEST_ONLY, "mean")] if f and "mean" in args.defences else []
        for attack, defence in anchor + [(a, d) for a in attacks for d in args.defences]:
            absent = range(n - f + 1, n + 1) if attack == HONEST_ONLY else ()
            runs = []
            for seed in seeds:
                cfg = cell_config(base, attack, defence, partition, f, seed)
                runs.append(SyncRounds(cfg, absent).run())
                log.info("%s %s %s seed %d: %.3f", partition, attack, defence, seed, runs[-1]["test_accuracy"])
            cells.append(_cell(partition, attack, defence, runs, args))
            with progress.open("a") as fh:
                fh.write(json.dumps(cells[-1]) + "\n")
    return cells


def _cell(partition: str, attack: str, defence: str, runs: list[dict[str, Any]], args: Any) -> dict[str, Any]:
    n, f = args.workers, args.malicious
    bad = set(range(n - f, n)) if attack not in ("none", HONEST_ONLY) else set()
    excluded = [r["excluded_at"] for r in runs]
    admitted_bad = []
    for r in runs:
        counts = r["gate"].get("aggregate_admitted")
        if counts is not None and bad and r["gate"]["aggregate"] in ("krum", "multi-krum", "bulyan"):
            admitted_bad.append(sum(counts.get(str(w), 0) for w in bad) / max(1, r["steps"]))
    return {
        "partition": partition,
        "attack": attack,
        "defence": defence,
        "accuracy": [r["test_accuracy"] for r in runs],
        "accuracy_mean": statistics.mean(r["test_accuracy"] for r in runs),
        "class_accuracy": [r["class_accuracy"] for r in runs],  # per seed, per class
        "backdoor_success": [r["backdoor_success"] for r in runs] if attack == "backdoor" else None,
        "attackers_excluded": [sorted(w for w in e if w in bad) for e in excluded],
        "first_exclusion_step": [min((e[w] for w in bad if w in e), default=None) for e in excluded],
        "caught_at_first_push": bool(bad) and all(all(e.get(w) == 0 for w in bad) for e in excluded),
        "false_exclusions": sum(len([w for w in e if w not in bad]) for e in excluded),
        # colluders' vectors the rule kept whole, per round (Krum keeps one vector a round: 1.0 = every round)
        "colluders_admitted_per_round": statistics.mean(admitted_bad) if admitted_bad else None,
        "defence_seconds_per_step": statistics.mean(r["defence_seconds_per_step"] for r in runs),
        "seconds_per_run": statistics.mean(r["seconds"] for r in runs),
    }


def _add_drops(cells: list[dict[str, Any]]) -> None:
    """Each cell's accuracy drop, seed by seed, from the two anchors of its partition: the all-honest plain-mean run
    (``drop_points``) and the honest workers alone (``drop_vs_honest_only_points``)."""
    for key, attack in (("drop_points", "none"), ("drop_vs_honest_only_points", HONEST_ONLY)):
        ref = {c["partition"]: c["accuracy"] for c in cells if c["attack"] == attack and c["defence"] == "mean"}
        for c in cells:
            r = ref.get(c["partition"])
            c[key] = statistics.mean(100 * (h - a) for h, a in zip(r, c["accuracy"])) if r is not None else None


def _class_shares(base: RunConfig, partitions: list[str], f: int, seeds: list[int]) -> dict[str, list[list[float]]]:
    """Per partition and seed, the share of each class's training samples that sits in the last f workers' shards:
    what an exclusion of those workers takes out of the run (the cause of the honest-only anchor's drop)."""
    import numpy as np

    from ...data import BatchPlan, load_dataset

    ds = load_dataset(base.dataset)
    labels = ds.y_train.numpy()
    out: dict[str, list[list[float]]] = {}
    for partition in partitions:
        out[partition] = []
        for seed in seeds:
            shards = BatchPlan.for_run(cell_config(base, "none", "mean", partition, f, seed), ds, base.workers).shards
            total = np.bincount(labels[np.concatenate(shards)], minlength=ds.num_classes)
            theirs = np.bincount(labels[np.concatenate(shards[len(shards) - f :])].astype(np.int64),
                                 minlength=ds.num_classes) if f else np.zeros_like(total)  # fmt: skip
            out[partition].append([round(float(t / max(1, a)), 3) for t, a in zip(theirs, total)])
    return out


def _num_params(base: RunConfig) -> int:
    from ...data import load_dataset
    from ...models import build_model

    ds = load_dataset(base.dataset)
    return sum(
        p.numel() for p in build_model(base.model.name, ds.input_shape, ds.num_classes, 0, base.model).parameters()
    )
