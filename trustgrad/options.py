"""Option parsing for the CLI, benchmarks and experiments: a usage error is a one-line ``ConfigError`` (exit code 2).

Every ``type=int`` option becomes a 64-bit integer and every ``type=float`` option a finite number, checked where
argparse parses it: ``1e400`` (inf), ``nan`` and ``2**70`` are refused there instead of overflowing a C library later
(issue 14: ``threads = 2^63-1`` and ``--timeout 1e300`` failed inside ranks). Ranges specific to an option (``>= 1``,
``in (0, 1]``) are checked by its owner, where the value is given (``trustgrad.config`` for jobs).

>>> parser = OptionParser(prog="demo")
>>> _ = parser.add_argument("--rate", type=float)
>>> parser.parse_args(["--rate", "0.5"]).rate
0.5
>>> parser.parse_args(["--rate", "inf"])
Traceback (most recent call last):
...
trustgrad.errors.ConfigError: demo: argument --rate: invalid finite number: 'inf'
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from .errors import ConfigError

__all__ = ["OptionParser", "bounded_type", "finite_float", "int64", "MAX_OPTION_TEXT"]

MAX_OPTION_TEXT = 4096  # a number longer than this is no number (int() of a million digits takes seconds)
_INT64 = 1 << 63


def int64(text: str) -> int:
    """A base-10 integer that fits a signed 64-bit word (what torch, numpy and gloo take)."""
    if len(text) > MAX_OPTION_TEXT:
        raise ValueError("too long")
    value = int(text)
    if not -_INT64 <= value < _INT64:
        raise ValueError("outside the 64-bit range")
    return value


def finite_float(text: str) -> float:
    """A number that is neither infinite nor NaN (``float('1e400')`` is inf)."""
    if len(text) > MAX_OPTION_TEXT:
        raise ValueError("too long")
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not finite")
    return value


int64.__name__ = "int"  # argparse names the type in its message: "invalid int value: 'x'"
finite_float.__name__ = "finite number"

_BOUNDED = {int: int64, float: finite_float}


def bounded_type(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``add_argument`` keyword arguments with ``int`` / ``float`` types replaced by their checked versions."""
    kind = kwargs.get("type")
    if isinstance(kind, type) and kind in _BOUNDED:
        return {**kwargs, "type": _BOUNDED[kind]}
    return kwargs


class OptionParser(argparse.ArgumentParser):
    """argparse, but usage errors are one-line ``ConfigError`` s (the usage block is noise for a typo), and every
    ``int`` / ``float`` option is range-checked where it is parsed."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # the CLI prints "trustgrad: error: ..." already; a subcommand's or tool's own name is worth repeating
        raise ConfigError(message if self.prog == "trustgrad" else f"{self.prog}: {message}")

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        return super().add_argument(*args, **bounded_type(kwargs))

    def add_argument_group(self, *args: Any, **kwargs: Any) -> Any:
        group = super().add_argument_group(*args, **kwargs)
        plain = group.add_argument
        group.add_argument = lambda *a, **kw: plain(*a, **bounded_type(kw))  # type: ignore[method-assign]
        return group
