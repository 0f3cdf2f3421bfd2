"""Communication patterns, one module each, resolved by name through ``PATTERNS``."""

from . import allreduce, ring  # noqa: F401  (registration)
from .base import PATTERNS, GradientAveraging, Pattern

__all__ = ["PATTERNS", "Pattern", "GradientAveraging"]
