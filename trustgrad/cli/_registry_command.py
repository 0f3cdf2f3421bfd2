"""The shape shared by ``bench`` and ``experiment``: ``COMMAND NAME [options]`` dispatched through a registry."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from ..registry import Registry


def add_registry_command(
    sub: argparse._SubParsersAction,
    command: str,
    help_text: str,
    registry: Callable[[], Registry[Callable[[list[str]], Any]]],
    render: Callable[[Any], tuple[str, dict[str, Any]]],
) -> None:
    """``trustgrad COMMAND NAME [--json] [options]``; ``render(result)`` gives the text and the JSON fields."""
    parser = sub.add_parser(
        command,
        help=help_text,
        description=f"{help_text}. `trustgrad {command} list` names them; "
        f"`trustgrad {command} NAME --help` shows one's options.",
    )
    parser.add_argument("name", help=f"{command} name, or 'list'")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    parser.add_argument("options", nargs=argparse.REMAINDER, help=f"options of the {command}")

    def main(args: argparse.Namespace) -> int:
        if "--json" in args.options:  # given after NAME, it lands among the forwarded options
            args.options.remove("--json")
            args.json = True
        entries = registry()
        if args.name == "list":
            print("\n".join(entries.names()))
            return 0
        text, data = render(entries.get(args.name)(list(args.options)))
        print(text)
        if args.json:
            print(json.dumps(data))
        return 0

    parser.set_defaults(func=main)
