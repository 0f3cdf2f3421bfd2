"""CKKS parameters for the blind step check: deeper circuits than aggregation, kept at N = 16384.

The aggregation presets (:class:`trustgrad.crypto.CKKSParams`) leave OpenFHE's default FLEXIBLEAUTOEXT scaling (one
extra modulus) and its default number of HYBRID key-switching digits. For the depth-5 (linear) and depth-7
(polynomial sigmoid) check circuits both push the modulus past the 128-bit bound of N = 16384 (438 bits) and OpenFHE
doubles the ring to 32768 (every operation 2-3x slower, keys 2x larger). Measured with OpenFHE 1.6.1, 128-bit classic:

=========  =====  ==========  ===========  ======
circuit    depth  first mod   HYBRID dnum  N
=========  =====  ==========  ===========  ======
linear     5      60 bits     3            16384
poly       7      60 bits     any          32768
poly       7      55 bits     8            16384
=========  =====  ==========  ===========  ======

so the presets use FLEXIBLEAUTO scaling, 40-bit scaling primes, and for depth 7 a 55-bit first modulus with one
prime per key-switching digit. The first modulus bounds what can be *decrypted*: the verdict (a squared distance)
must stay below ``2**(first_mod_bits - scale_bits - 1)`` (16384 for the poly preset, 2**19 for linear); larger
values wrap around (see :mod:`trustgrad.blind.step_check` for why that is treated as a rejection).

:class:`BlindParams` is a :class:`CKKSParams` with two more fields, so :class:`trustgrad.crypto.Context` takes it
unchanged; :func:`context_from_bytes` is the matching receiver (``Context.from_bytes`` knows only the base fields).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import openfhe

from trustgrad.crypto import CKKSParams, Context, wire
from trustgrad.errors import ConfigError, CryptoError

__all__ = ["BlindParams", "DEPTH", "context_from_bytes"]

# multiplicative depth of the check circuit per model kind (see step_check's numbered steps)
DEPTH = {"linear": 5, "poly": 7}
_SCALING = {"flexibleauto": openfhe.FLEXIBLEAUTO, "flexibleautoext": openfhe.FLEXIBLEAUTOEXT}


@dataclass(frozen=True)
class BlindParams(CKKSParams):
    """:class:`CKKSParams` plus HYBRID ``large_digits`` (0: OpenFHE's default) and the ``scaling`` technique.

    >>> BlindParams.for_check("poly").depth
    7
    """

    large_digits: int = 0
    scaling: str = "flexibleauto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.large_digits <= 32:
            raise ConfigError(f"large_digits must be in [0, 32], got {self.large_digits}")
        if self.scaling not in _SCALING:
            raise ConfigError(f"scaling must be one of {sorted(_SCALING)}, got {self.scaling!r}")

    @classmethod
    def for_check(cls, kind: str = "poly", **overrides: Any) -> BlindParams:
        """Preset for the ``kind`` check ("poly": depth 7, "linear": depth 5), both N = 16384 at 128-bit."""
        if kind not in DEPTH:
            raise ConfigError(f"blind check kind must be one of {sorted(DEPTH)}, got {kind!r}")
        base: dict[str, Any] = {
            "depth": DEPTH[kind],
            "scale_bits": 40,
            "first_mod_bits": 55 if kind == "poly" else 60,
            "key_switching": "hybrid",
            "large_digits": DEPTH[kind] + 1 if kind == "poly" else 3,
        }
        base.update(overrides)
        return cls(**base)

    def _openfhe(self) -> Any:
        p = super()._openfhe()
        if self.large_digits and self._key_switch() == openfhe.HYBRID:
            p.SetNumLargeDigits(self.large_digits)
        p.SetScalingTechnique(_SCALING[self.scaling])
        return p


def context_from_bytes(data: bytes) -> Context:
    """Receive a context sent with ``Context.to_bytes()`` whose parameters may be :class:`BlindParams`."""
    meta, _ = wire.unpack(data, wire.KIND_CONTEXT)
    text = wire.field(meta, "params", str, "context")
    try:
        params: CKKSParams = BlindParams._from_json(text)
    except CryptoError:
        params = CKKSParams._from_json(text)
    ctx = Context(params)
    if ctx.fingerprint != wire.field(meta, "ctx", str, "context"):
        raise CryptoError("context: rebuilding it from its parameters gave a different OpenFHE context")
    return ctx
