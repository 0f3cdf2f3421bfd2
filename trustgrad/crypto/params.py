"""CKKS parameters: one frozen dataclass, validated at construction, with presets for encrypted aggregation.

How the numbers were chosen (CKKS, Cheon-Kim-Kim-Song 2017; OpenFHE's RNS variant):

- A real value ``x`` is encoded as ``round(x * 2**scale_bits)`` in one of ``ring_dim / 2`` slots. Encryption adds a
  small noise ``e`` (a few bits), so a fresh decryption returns ``x + e / 2**scale_bits``. Aggregation adds ``W``
  ciphertexts (noise grows by about ``sqrt(W)``) and, for a mean, multiplies by ``1/W`` (one level, one rescale).
- ``first_mod_bits`` is the last modulus left at decryption; decrypted magnitudes must stay below
  ``2**(first_mod_bits - scale_bits - 1)`` (512 at 60/50, 2**19 at 60/40), so a *sum* of W updates must too.
- Security: OpenFHE picks the smallest ring dimension whose total modulus meets the HE standard for the requested
  level. With BV key switching a depth-1 or depth-2 CKKS context at 128-bit security fits N = 8192 (4096 slots);
  OpenFHE's default HYBRID key switching adds an auxiliary modulus P and is then refused at N = 8192 (it asks for
  16384, twice the cost for the same slots). Aggregation needs no key switching at all, so BV is the right choice
  there; deeper circuits (many relinearisations or rotations) are where HYBRID pays off.

Measured precision of the presets (N = 8192, 128-bit, 4 workers, values ~ N(0, 1), max error of the mean of 4
vectors of 8195 values over 5 runs; see ``tests/crypto/test_aggregation.py`` for the bound the tests enforce):
shared keys at 2**40: 3.7e-9 to 4.9e-9 (float64 out); threshold keys (3 parties) at 2**50: 4.1e-12 to 4.9e-12.
Each partial decryption adds OpenFHE's multiparty smudging noise. For CKKS OpenFHE offers only
``FIXED_NOISE_MULTIPARTY`` (a fixed ~20-bit noise; ``NOISE_FLOODING_MULTIPARTY`` is refused for CKKS), which here
cost little: a 3-party mean at 2**40 measured 5.7e-9. The threshold preset still uses 2**50: it is free at N = 8192
(same ring, same ciphertext size) and leaves 10 bits of headroom for a larger flooding noise, which is what provable
security of shared partial decryptions against key-recovery attacks (Li-Micciancio 2021) would require.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import openfhe

from trustgrad.errors import ConfigError, CryptoError

__all__ = ["CKKSParams"]

_SECURITY = {
    "128": openfhe.HEStd_128_classic,
    "192": openfhe.HEStd_192_classic,
    "256": openfhe.HEStd_256_classic,
    "none": openfhe.HEStd_NotSet,
}
_KEY_SWITCHING = ("auto", "bv", "hybrid")
# OpenFHE's native integers are 64-bit; moduli above 60 bits are refused by its RNS prime generator.
_MAX_MOD_BITS = 60
# Above this depth HYBRID's smaller key-switching keys outweigh BV's smaller modulus (OpenFHE's own recommendation
# is HYBRID for most circuits; BV wins for the shallow aggregation circuits this project runs per step).
_AUTO_BV_MAX_DEPTH = 4


@dataclass(frozen=True)
class CKKSParams:
    """Parameters of a CKKS crypto context (OpenFHE ``CCParamsCKKSRNS``).

    Args:
        ring_dim: polynomial ring dimension N (a power of two); 0 lets OpenFHE pick the smallest secure one.
        scale_bits: bits of the scaling factor Delta = 2**scale_bits (the precision of a slot).
        first_mod_bits: bits of the first (decryption) modulus: headroom for the integer part of values.
        depth: multiplicative depth (1 is enough for sum + multiply-by-1/W).
        batch_size: slots per ciphertext; 0 means ring_dim / 2 (full packing).
        security: ``"128"`` (default), ``"192"``, ``"256"`` (HE standard, classical) or ``"none"`` (insecure).
        key_switching: ``"auto"`` (BV up to depth 4, else HYBRID), ``"bv"`` or ``"hybrid"``.
        digit_bits: BV digit size for key switching (relinearisation, rotations). OpenFHE's default (0: one digit
            per 60-bit modulus) makes BV key switching useless: a rotation fails to decrypt and a square is off by
            1e-2. Measured at N=8192: 20 bits gives errors ~3e-8 with a 2.8 MB eval-mult key, 10 bits ~1e-8 with
            5.1 MB, 30 bits 3e-5. Encryption and aggregation do not depend on it.
        allow_insecure: must be True for ``security="none"``; tests and toy experiments only.

    >>> CKKSParams.for_aggregation("threshold").scale_bits
    50
    """

    ring_dim: int = 0
    scale_bits: int = 40
    first_mod_bits: int = 60
    depth: int = 1
    batch_size: int = 0
    security: str = "128"
    key_switching: str = "auto"
    digit_bits: int = 20
    allow_insecure: bool = False

    def __post_init__(self) -> None:
        if self.security not in _SECURITY:
            raise ConfigError(f"security must be one of {sorted(_SECURITY)}, got {self.security!r}")
        if self.security == "none" and not self.allow_insecure:
            raise CryptoError(
                "security='none' disables the HE-standard security check (insecure parameters); "
                "pass allow_insecure=True only for tests and toy experiments"
            )
        if self.key_switching not in _KEY_SWITCHING:
            raise ConfigError(f"key_switching must be one of {list(_KEY_SWITCHING)}, got {self.key_switching!r}")
        if self.ring_dim != 0 and (not _is_pow2(self.ring_dim) or not 16 <= self.ring_dim <= 1 << 17):
            raise ConfigError(f"ring_dim must be 0 (auto) or a power of two in [16, 131072], got {self.ring_dim}")
        if self.security == "none" and self.ring_dim == 0:
            raise ConfigError("ring_dim must be set explicitly when security='none' (there is no standard to pick it)")
        if not 20 <= self.scale_bits <= _MAX_MOD_BITS - 1:
            raise ConfigError(f"scale_bits must be in [20, {_MAX_MOD_BITS - 1}], got {self.scale_bits}")
        if not self.scale_bits < self.first_mod_bits <= _MAX_MOD_BITS:
            raise ConfigError(
                f"first_mod_bits must be in ({self.scale_bits}, {_MAX_MOD_BITS}] (above scale_bits, to hold the "
                f"integer part), got {self.first_mod_bits}"
            )
        if not 1 <= self.depth <= 30:
            raise ConfigError(f"depth must be in [1, 30], got {self.depth}")
        if not 0 <= self.digit_bits <= _MAX_MOD_BITS:
            raise ConfigError(f"digit_bits must be in [0, {_MAX_MOD_BITS}], got {self.digit_bits}")
        if self.batch_size != 0 and not _is_pow2(self.batch_size):
            raise ConfigError(f"batch_size must be 0 (ring_dim / 2) or a power of two, got {self.batch_size}")
        if self.batch_size and self.ring_dim and self.batch_size > self.ring_dim // 2:
            raise ConfigError(f"batch_size {self.batch_size} exceeds ring_dim / 2 = {self.ring_dim // 2}")

    @classmethod
    def for_aggregation(cls, keys: str = "shared", **overrides: Any) -> CKKSParams:
        """Preset for encrypted aggregation (sum of W vectors, then one multiply by 1/W).

        ``keys="shared"``: depth 1, Delta = 2**40 (max error about 5e-9 on a mean of unit-scale values).
        ``keys="threshold"``: depth 1, Delta = 2**50 (headroom for multiparty smudging noise; about 5e-12).
        Both give N = 8192 (4096 slots) at 128-bit security with BV key switching.
        """
        if keys not in ("shared", "threshold"):
            raise ConfigError(f"keys must be 'shared' or 'threshold', got {keys!r}")
        base: dict[str, Any] = {"depth": 1, "scale_bits": 40 if keys == "shared" else 50, "first_mod_bits": 60}
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_config(cls, config: Any) -> CKKSParams:
        """Build from a ``trustgrad.config.CryptoConfig`` (``keys``, ``ring_dim``, ``scale_bits``, ``security``)."""
        over: dict[str, Any] = {"ring_dim": config.ring_dim, "security": str(config.security)}
        if config.scale_bits:
            over["scale_bits"] = config.scale_bits
        if over["security"] == "none":
            over["allow_insecure"] = True  # the config layer already made the user spell out "none"
        return cls.for_aggregation(config.keys, **over)

    # -- internal -------------------------------------------------------------------------------------------------

    def _to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def _from_json(cls, text: str) -> CKKSParams:
        try:
            fields = json.loads(text)
            if not isinstance(fields, dict) or set(fields) != {f.name for f in dataclasses.fields(cls)}:
                raise ValueError("unexpected fields")
            return cls(**fields)
        except RecursionError:  # json recurses on nesting: refuse, never a traceback
            raise CryptoError("context parameters are malformed: nested too deeply") from None
        except (ValueError, TypeError) as exc:
            raise CryptoError(f"context parameters are malformed: {str(exc).splitlines()[0][:200]}") from None

    def _key_switch(self) -> Any:
        if self.key_switching == "bv" or (self.key_switching == "auto" and self.depth <= _AUTO_BV_MAX_DEPTH):
            return openfhe.BV
        return openfhe.HYBRID

    def _openfhe(self) -> Any:
        p = openfhe.CCParamsCKKSRNS()
        p.SetMultiplicativeDepth(self.depth)
        p.SetScalingModSize(self.scale_bits)
        p.SetFirstModSize(self.first_mod_bits)
        p.SetSecurityLevel(_SECURITY[self.security])
        p.SetKeySwitchTechnique(self._key_switch())
        if self._key_switch() == openfhe.BV:
            p.SetDigitSize(self.digit_bits)
        if self.ring_dim:
            p.SetRingDim(self.ring_dim)
        if self.batch_size:
            p.SetBatchSize(self.batch_size)
        return p


def _is_pow2(n: int) -> bool:
    return isinstance(n, int) and n > 0 and n & (n - 1) == 0
