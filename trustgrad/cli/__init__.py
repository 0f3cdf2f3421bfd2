"""``trustgrad`` command line: a thin layer that parses, calls the library and renders typed results.

Every subcommand is a module of this package with ``add_parser(subparsers)``; errors the user can fix exit with code
2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from ..errors import ConfigError, LaunchError, TrustgradError
from ..options import OptionParser

__all__ = ["main"]

#: subcommand modules, in the order ``--help`` lists them
COMMANDS = ("train", "verify", "attack", "experiment", "bench", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = OptionParser(
        prog="trustgrad",
        description="Secure distributed training on torch.distributed: every pattern of the taxonomy, "
        "Proof-of-Learning and CKKS-encrypted updates.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log progress (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OptionParser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # a subcommand not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help or --version; callers get a code, not an exit
        return int(exc.code or 0) if isinstance(exc.code, int) else 2
    except ConfigError as exc:  # a usage error: one line, exit 2
        print(f"trustgrad: error: {_line(exc)}", file=sys.stderr)
        return exc.exit_code
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except LaunchError as exc:
        if exc.remote_traceback and logging.getLogger().isEnabledFor(logging.INFO):
            sys.stderr.write(exc.remote_traceback)
        print(f"trustgrad: error: {_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except TrustgradError as exc:
        print(f"trustgrad: error: {_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # an unwritable --out, a missing folder: the user's to fix, so one line, exit 2
        print(f"trustgrad: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except MemoryError as exc:  # a size the user asked for (a benchmark's --values 1e12): theirs to fix, one line
        print(f"trustgrad: error: out of memory: {_line(exc)} (see docs/limits.md)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("trustgrad: interrupted", file=sys.stderr)
        return 130


def _line(exc: BaseException, limit: int = 1000) -> str:
    """One line, whatever the message holds: a value an attacker chose may carry newlines or a C++ stack trace."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    text = lines[0] + (" [...]" if len(lines) > 1 else "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
