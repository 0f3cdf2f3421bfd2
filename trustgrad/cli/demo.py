"""``trustgrad demo``: the README's main command — a 4-worker job on the embedded digits dataset, summarized."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="the main job on the embedded default (4 workers, digits) with a short summary",
        description="Train digits/mlp with 4 worker processes and print what happened.",
    )
    parser.add_argument("--out", default="runs/demo", help="where the run records go (default runs/demo)")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from ..config import RunConfig
    from ..run import run
    from .train import render_summary

    cfg = RunConfig(workers=4, dataset="digits", epochs=10, out=args.out).replace(pattern={"name": "allreduce"})
    print("trustgrad demo: 4 workers train an MLP on scikit-learn's digits (all-reduce, synchronous)")
    result = run(cfg)
    print(render_summary(result.summary))
    print(f"  records: {args.out}/summary.json, metrics.jsonl, model.safetensors")
    return 0
