"""``trustgrad bench NAME [options]``: run one benchmark and print its table (or JSON)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench",
        help="measure speed/overhead against an anchor in the same run",
        description="Run a benchmark; it prints ratios against its anchor measured in the same run. "
        "`trustgrad bench list` names them; `trustgrad bench NAME --help` shows a benchmark's options.",
    )
    parser.add_argument("name", help="benchmark name, or 'list'")
    parser.add_argument("--json", action="store_true", help="print the numbers as one JSON object on the last line")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="options of the benchmark")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from ..bench import BENCHMARKS

    if "--json" in args.options:  # given after NAME, it lands among the forwarded options
        args.options.remove("--json")
        args.json = True
    if args.name == "list":
        print("\n".join(BENCHMARKS.names()))
        return 0
    result = BENCHMARKS.get(args.name)(list(args.options))
    print(result.table)
    if args.json:
        print(json.dumps({"name": result.name, "passed": result.passed, **result.data}))
    return 0
