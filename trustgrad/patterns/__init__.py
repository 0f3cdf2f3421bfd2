"""Communication patterns, one module each, resolved by name through ``PATTERNS`` (every module here registers)."""

import sys

from ..plugins import import_submodules
from .base import PATTERNS, GradientAveraging, Pattern

import_submodules(sys.modules[__name__])

__all__ = ["PATTERNS", "Pattern", "GradientAveraging"]
