"""The exception hierarchy of trustgrad.

Everything raised on purpose at a boundary (CLI input, config files, proofs, ciphertexts, keys, data files) is a
``TrustgradError``. The CLI renders these as one line and exits with ``exit_code`` (2: the input was unusable), never
with a traceback. Anything else escaping the library is a bug.
"""

from __future__ import annotations

__all__ = [
    "TrustgradError",
    "ConfigError",
    "DataError",
    "LaunchError",
    "CryptoError",
    "ProofError",
    "AttackError",
]


class TrustgradError(Exception):
    """Base class: a problem with what the user (or a remote party) gave us."""

    exit_code = 2


class ConfigError(TrustgradError, ValueError):
    """A configuration value, flag or TOML key is missing, unknown or out of range."""


class DataError(TrustgradError):
    """A dataset is missing, malformed or does not match what was asked for."""


class LaunchError(TrustgradError):
    """A distributed job failed: a rank crashed or timed out. Carries the failing rank's traceback."""

    exit_code = 1

    def __init__(self, message: str, rank: int | None = None, remote_traceback: str | None = None):
        super().__init__(message)
        self.rank = rank
        self.remote_traceback = remote_traceback


class CryptoError(TrustgradError):
    """Key material, parameters or ciphertext bytes are invalid, mismatched or insecure."""


class ProofError(TrustgradError):
    """A proof is malformed or unreadable (a well-formed but wrong proof is an *invalid verdict*, not an error)."""


class AttackError(TrustgradError):
    """An attack was given a view it cannot use (wrong model, corrupt file)."""
