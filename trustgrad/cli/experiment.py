"""``trustgrad experiment NAME [options]``: run one experiment; it writes JSON, markdown and PNGs under --out."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "experiment",
        help="run one of the paper's experiments end to end (tables and plots)",
        description="Run an experiment. `trustgrad experiment list` names them; "
        "`trustgrad experiment NAME --help` shows its options.",
    )
    parser.add_argument("name", help="experiment name, or 'list'")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="options of the experiment")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from ..experiments import EXPERIMENTS

    if "--json" in args.options:  # given after NAME, it lands among the forwarded options
        args.options.remove("--json")
        args.json = True
    if args.name == "list":
        print("\n".join(EXPERIMENTS.names()))
        return 0
    result = EXPERIMENTS.get(args.name)(list(args.options))
    print(result.table)
    print(f"\nwritten to {result.out}")
    if args.json:
        print(json.dumps({"name": result.name, "out": str(result.out), **result.data}))
    return 0
