"""Noise flooding of partial decryptions: what a decryption reveals about the key is drowned in fresh noise.

Why. A CKKS decryption returns ``m + e`` where the error ``e`` depends on the secret key; whoever chose or computed
the ciphertext and sees the result can solve for the key from enough of them (Li and Micciancio, Eurocrypt 2021:
IND-CPA^D). Under threshold keys each partial decryption ``c1 * s_i + e_i`` also goes to another party. OpenFHE's
CKKS multiparty mode adds only a fixed smudging noise (``FIXED_NOISE_MULTIPARTY``; its ``NOISE_FLOODING_MULTIPARTY``
is refused for CKKS), so each key holder adds its own: a complex Gaussian of standard deviation ``sigma`` per real
component in every slot, encoded at the partial's level and scale and added to it. The fused result carries the sum
of all parties' noise; one honest party's noise suffices for the bound.

How much. For ``t`` decryptions seen by the adversary, a target of ``s`` bits of IND-CPA^D security and a bound
``E`` on the decryption error (in the units of the decrypted values), the Gaussian flooding bound of Li, Micciancio,
Schultz and Sorrell (CRYPTO 2022, "Securing approximate homomorphic encryption using differential privacy",
the Renyi-divergence bound they state for prior flooding) is::

    log2(sigma) = log2(E) + s / 2 + log2(64 * t) / 2

``E`` is ``2**noise_bits / 2**scale_bits``: the measured decryption error of trustgrad's circuits is below 2**13 in
units of the plaintext scale (aggregates at N = 8192: max 5.5e-12 at scale 2**50, i.e. 2**12.6; blind verdicts: see
docs/threshold-keys.md), so ``noise_bits = 14`` leaves a factor of 2 of margin. The defaults, and what 40 bits would
cost, are measured in docs/threshold-keys.md.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np

from trustgrad.errors import ConfigError

__all__ = ["Flooding", "FLOODING", "NO_FLOODING", "flood"]


@dataclass(frozen=True)
class Flooding:
    """Parameters of the flooding noise every key holder adds to its partial decryptions.

    Args:
        security_bits: ``s``, the IND-CPA^D security target of the bound above (0 disables flooding).
        queries: ``t``, how many decryptions under one key an adversary may see.
        noise_bits: ``log2`` of the decryption-error bound in units of the plaintext scale.
    """

    security_bits: int = 30
    queries: int = 1 << 10
    noise_bits: float = 14.0

    def __post_init__(self) -> None:
        if not 0 <= self.security_bits <= 128:
            raise ConfigError(f"flooding security_bits must be in [0, 128], got {self.security_bits}")
        if not 1 <= self.queries <= 1 << 40:
            raise ConfigError(f"flooding queries must be in [1, 2**40], got {self.queries}")
        if not 0 <= self.noise_bits <= 60:
            raise ConfigError(f"flooding noise_bits must be in [0, 60], got {self.noise_bits}")

    def log2_sigma(self, scale_bits: int) -> float:
        """``log2`` of the per-party standard deviation, in units of the decrypted values."""
        return self.noise_bits - scale_bits + self.security_bits / 2 + math.log2(64 * self.queries) / 2

    def sigma(self, scale_bits: int) -> float:
        return 0.0 if self.security_bits == 0 else 2.0 ** self.log2_sigma(scale_bits)


FLOODING = Flooding()  # on by default
NO_FLOODING = Flooding(security_bits=0)  # for measuring what flooding costs; never for decryptions that leave


def flood(cc: Any, ciphertext: Any, sigma: float, slots: int) -> Any:
    """``ciphertext`` (one party's partial decryption) plus fresh complex Gaussian noise of ``sigma`` per slot.

    Noise in both real and imaginary parts: real-only slot noise would cover only half of the coefficient space
    (the canonical embedding of real vectors), leaving the other half of the error unflooded."""
    if sigma <= 0:
        return ciphertext
    rng = np.random.default_rng(secrets.randbits(128))  # fresh per partial: the noise must never repeat
    noise = rng.normal(0.0, sigma, slots) + 1j * rng.normal(0.0, sigma, slots)
    plain = cc.MakeCKKSPackedPlaintext(noise, ciphertext.GetNoiseScaleDeg(), ciphertext.GetLevel(), None, slots)
    return cc.EvalAdd(ciphertext, plain)
