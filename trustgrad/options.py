"""Option parsing for benchmarks and experiments: a usage error is a one-line ``ConfigError`` (exit code 2)."""

from __future__ import annotations

import argparse

from .errors import ConfigError

__all__ = ["OptionParser"]


class OptionParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message}")
