"""``trustgrad experiment staleness``: the bounded-asynchrony trade-off (Ho et al., NIPS 2013, Fig. 3 and 4).

Real ``ps`` jobs (a server process and W worker processes over gloo) train digits/mlp under ``sync``, ``ssp`` with
each bound S, and ``async``, with injected *transient* stragglers: every step of every worker is slowed ``slowdown``
times with probability ``prob``, the same steps under every schedule (a PRF of the seed, worker and step). Every
worker step lasts at least ``--step-ms`` (a sleep standing in for compute, so that the 2-core scheduling noise stays
small against the delays); the delays are real sleeps and the times are wall-clock seconds measured by the server.

The server evaluates the training loss about once per W applied gradients; the table reports, per schedule, the time
and the number of gradients until that loss first reaches ``--target-loss``. Expected (and docs/architecture.md §6's
simulation: sync 883, SSP(3) 579, async 474 step units): sync waits for the slowest of W workers at every version, SSP
only when a worker gets S clocks ahead, async never; staleness costs statistical efficiency, so async may need more
gradients.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import ConfigError
from ..options import OptionParser
from . import EXPERIMENTS, ExperimentResult

__all__ = ["time_to_target"]

log = logging.getLogger(__name__)


def time_to_target(trace: list[tuple[float, int, float]], target: float) -> tuple[float | None, int | None]:
    """(seconds, gradients) at the first trace point whose loss is <= ``target``; (None, None) if never reached.

    >>> time_to_target([(0.5, 4, 1.2), (1.0, 8, 0.4), (1.5, 12, 0.2)], 0.5)
    (1.0, 8)
    """
    for seconds, grads, loss in trace:
        if loss <= target:
            return seconds, grads
    return None, None


def _arms(bounds: list[int]) -> list[tuple[str, str, int | None]]:
    return [("sync", "sync", None), *((f"ssp(S={s})", "ssp", s) for s in bounds), ("async", "async", None)]


@EXPERIMENTS.register("staleness")
def run_experiment(argv: list[str]) -> ExperimentResult:
    parser = OptionParser(prog="trustgrad experiment staleness", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/staleness", help="folder for results.json, results.md, staleness.png")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--staleness", type=int, nargs="+", default=[1, 3], help="SSP bounds to run")
    parser.add_argument("--prob", type=float, default=0.1, help="probability that a step straggles")
    parser.add_argument("--slowdown", type=float, default=6.0, help="how many times longer a straggling step lasts")
    parser.add_argument("--step-ms", type=float, default=25.0, help="nominal duration of one worker step")
    parser.add_argument("--target-loss", type=float, default=0.3, help="training loss that counts as reached")
    parser.add_argument("--repeats", type=int, default=1, help="runs per schedule (seeds seed..seed+R-1); medians")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeats < 1 or any(s < 0 for s in args.staleness):
        raise ConfigError("experiment staleness: --repeats must be >= 1 and every --staleness >= 0")
    from ..run import run

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    straggler = f"rank=all,prob={args.prob},slowdown={args.slowdown},step-ms={args.step_ms}"
    rows: list[dict[str, Any]] = []
    traces: dict[str, list] = {}
    for label, schedule, bound in _arms(args.staleness):
        runs = []
        for r in range(args.repeats):
            cfg = RunConfig(workers=args.workers, epochs=args.epochs, seed=args.seed + r, progress=False)
            cfg = cfg.replace(pattern={"name": "ps", "schedule": schedule, "staleness": bound, "straggler": straggler})
            result = run(cfg)
            trace = [tuple(p) for p in result.ranks[0]["trace"]]
            seconds, grads = time_to_target(trace, args.target_loss)
            runs.append((result.summary, trace, seconds, grads))
            log.info("%s seed %d: target at %s s, %s gradients", label, cfg.seed, seconds, grads)
        traces[label] = runs[0][1]
        reached = [x for x in runs if x[2] is not None]
        rows.append(
            {
                "schedule": label,
                "seconds_to_target": statistics.median(x[2] for x in reached) if reached else None,
                "gradients_to_target": statistics.median(x[3] for x in reached) if reached else None,
                "reached": f"{len(reached)}/{len(runs)}",
                "train_seconds": statistics.median(x[0]["train_seconds"] for x in runs),
                "test_accuracy": statistics.median(x[0]["test_accuracy"] for x in runs),
                "max_staleness": max(x[0]["max_staleness"] for x in runs),
                "mean_staleness": statistics.mean(x[0]["mean_staleness"] for x in runs),
                "mean_update_lag": statistics.mean(x[0]["mean_update_lag"] for x in runs),
            }
        )
    data = {"settings": vars(args), "straggler": straggler, "rows": rows, **_ordering(rows, args.staleness)}
    table = _table(rows, args)
    (out / "results.json").write_text(json.dumps({**data, "traces": traces}, indent=2) + "\n")
    (out / "results.md").write_text(table + "\n")
    _plot(traces, args.target_loss, out / "staleness.png")
    return ExperimentResult("staleness", table, out, data)


def _ordering(rows: list[dict[str, Any]], bounds: list[int]) -> dict[str, Any]:
    """Whether time-to-target is ordered async <= ssp(S=3) < sync (with the largest S run when 3 was not)."""
    t = {r["schedule"]: r["seconds_to_target"] for r in rows}
    ssp = f"ssp(S={3 if 3 in bounds else max(bounds)})" if bounds else None
    vals = [t.get("async"), t.get(ssp) if ssp else None, t.get("sync")]
    ok = all(v is not None for v in vals) and vals[0] <= vals[1] < vals[2]  # type: ignore[operator]
    return {"ordered_async_le_ssp_lt_sync": bool(ok), "ssp_compared": ssp}


def _fmt(v: Any, spec: str) -> str:
    return "not reached" if v is None else format(v, spec)


def _table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Time to training loss <= {args.target_loss} on digits/mlp, {args.workers} workers + 1 server, transient "
        f"stragglers (each step {args.slowdown:g}x slower with probability {args.prob:g}; nominal step "
        f"{args.step_ms:g} ms; median of {args.repeats} run(s); wall-clock seconds of real runs)",
        "",
        "| schedule | seconds to target | gradients to target | reached | train s | test acc | max staleness "
        "| mean staleness | mean update lag |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['schedule']} | {_fmt(r['seconds_to_target'], '.2f')} | {_fmt(r['gradients_to_target'], '.0f')} "
            f"| {r['reached']} | {r['train_seconds']:.2f} | {r['test_accuracy']:.3f} | {r['max_staleness']} "
            f"| {r['mean_staleness']:.2f} | {r['mean_update_lag']:.2f} |"
        )
    return "\n".join(lines)


def _plot(traces: dict[str, list], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_grads) = plt.subplots(1, 2, figsize=(11, 4))
    for label, trace in traces.items():
        secs, grads, loss = zip(*trace) if trace else ((), (), ())
        by_time.plot(secs, loss, label=label)
        by_grads.plot(grads, loss, label=label)
    for ax, xlabel in ((by_time, "wall-clock seconds"), (by_grads, "gradients applied")):
        ax.axhline(target, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.legend()
    fig.suptitle("Parameter server under transient stragglers: sync vs SSP vs async")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
