"""``python -m tests.fuzz``: run every fuzz target (``make fuzz``) and print the outcome table.

Examples::

    python -m tests.fuzz --cases 10000            # split evenly over every target; exit 1 on any finding
    python -m tests.fuzz --target proof:500       # one target, 500 cases
    python -m tests.fuzz --target proof --seed 3 --replay 41   # re-run one case here, with its traceback
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tests.fuzz import harness


def _targets(specs: list[str], total: int) -> list[tuple[str, int]]:
    names = harness.target_names()
    if not specs:
        return [(name, max(1, -(-total // len(names)))) for name in names]  # rounded up: at least --cases in all
    chosen = []
    for spec in specs:
        name, _, count = spec.partition(":")
        harness.load_target(name)  # unknown names exit with the list of known ones
        chosen.append((name, int(count) if count else max(1, -(-total // len(specs)))))
    return chosen


def _replay(name: str, seed: int, index: int) -> int:
    module = harness.load_target(name)
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as workdir:
        state = module.setup(Path(workdir))
        print(module.case(state, harness.case_rng(seed, name, index)))  # let any traceback show
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000, help="total cases, split evenly over the targets")
    parser.add_argument("--target", action="append", default=[], metavar="NAME[:COUNT]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-mb", type=int, default=2048, help="memory a case may allocate beyond the set-up")
    parser.add_argument("--case-timeout", type=float, default=20.0, help="seconds before a case counts as a hang")
    parser.add_argument("--replay", type=int, metavar="INDEX", help="run one case in this process (needs --target)")
    parser.add_argument("--json", type=Path, help="also write the counts and every finding here")
    args = parser.parse_args(argv)
    if args.replay is not None:
        if len(args.target) != 1:
            parser.error("--replay needs exactly one --target")
        return _replay(args.target[0].partition(":")[0], args.seed, args.replay)
    reports = []
    for name, count in _targets(args.target, args.cases):
        print(f"fuzzing {name}: {count} cases (seed {args.seed})", file=sys.stderr, flush=True)
        reports.append(
            harness.run_target(name, count, seed=args.seed, budget_mb=args.budget_mb, case_timeout=args.case_timeout)
        )
    print(harness.format_table(reports))
    findings = [f for r in reports for f in r.findings]
    for f in findings[:50]:
        print(f"FINDING {f.target} #{f.index} {f.outcome}: {f.detail[:300]}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "seed": args.seed,
                    "targets": {r.target: dict(r.counts) | {"seconds": round(r.seconds, 1)} for r in reports},
                    "findings": [vars(f) for f in findings],
                },
                indent=1,
            )
        )
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
