"""``trustgrad attack NAME --view FILE``: what a compromised server reconstructs from what it received."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "attack",
        help="run a gradient-leakage attack on a recorded server view",
        description="Run an attack on a view recorded by `trustgrad train ... --record-server-view --out DIR` "
        "(files under DIR/server_view/). Attacks: dlg, idlg, inverting-gradients, label-recovery, data-free.",
    )
    parser.add_argument("name", help="attack name (dlg, idlg, inverting-gradients, label-recovery, data-free)")
    parser.add_argument("--view", required=True, metavar="FILE", help="a server view (.safetensors)")
    parser.add_argument("--restarts", type=int, help="random restarts; the best by gradient distance is kept")
    parser.add_argument("--steps", type=int, help="optimizer steps (DLG/iDLG)")
    parser.add_argument("--iterations", type=int, help="optimizer iterations (Inverting Gradients)")
    parser.add_argument("--seed", type=int, help="the attack's seed")
    parser.add_argument("--png", metavar="FILE", help="write a grid of true vs reconstructed images")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    parser.set_defaults(func=_main)


#: ranges of the attack's numeric options: an L-BFGS run of 1e6 steps is hours, not a useful attack
_RANGES = {"restarts": (1, 1000), "steps": (1, 1_000_000), "iterations": (1, 1_000_000), "seed": (0, (1 << 63) - 1)}


def check_args(args: argparse.Namespace) -> None:
    """Every option in range and the --png folder writable, before the view is read (one-line ``ConfigError``)."""
    from ..errors import ConfigError
    from ..resources import check_output_folder

    for name, (low, high) in _RANGES.items():
        value = getattr(args, name)
        if value is not None and not low <= value <= high:
            raise ConfigError(f"--{name} must be in [{low}, {high}], got {value}")
    if args.png:
        from pathlib import Path

        check_output_folder(Path(args.png).parent, "--png")


def _main(args: argparse.Namespace) -> int:
    import torch

    from ..attacks.leakage import ATTACKS
    from ..attacks.on_view import attack_view
    from ..attacks.view import load_view

    ATTACKS.get(args.name)  # unknown names fail before the file is read
    check_args(args)
    torch.set_num_threads(1)  # L-BFGS on small models: threads only add contention
    view = load_view(args.view)
    result = attack_view(
        args.name, view, restarts=args.restarts, steps=args.steps, iterations=args.iterations, seed=args.seed
    )
    if args.png and result.reconstruction is not None and view.truth_x is not None:
        from pathlib import Path

        from ..attacks.leakage.plots import save_grid

        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        save_grid(args.png, view.truth_x, result.reconstruction, title=f"{args.name} on a {view.kind} view")
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items())
    print(f"{args.name} on a {view.kind} view ({view.model}, batch {view.batch_size}): {metrics or 'no ground truth'}")
    print(f"  recovered labels: {list(result.labels)}; {result.seconds:.1f} s, {result.restarts} restart(s)")
    if args.json:
        print(json.dumps({"view": args.view, "kind": view.kind, **result.as_dict()}))
    return 0
