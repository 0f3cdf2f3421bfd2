"""Slot layout of the blind step check: where each value of X, Y, W, b and the gradient lives in a ciphertext.

A ciphertext of S slots is viewed as a 3-d array ``[f, j, c]`` (row-major, slot = f * J * Cp + j * Cp + c):

- ``f`` < Fp (features padded to a power of two) is the **outermost** axis, so a rotate-and-sum over the whole ring by
  ``J*Cp, 2*J*Cp, ..., S/2`` sums over features *and replicates the sum into every f block* (no mask needed: the
  logits come out already laid out like the labels, ready for the next product);
- ``j`` < J = S / (Fp * Cp) is a sample of the batch (J = 8 for 64 features, 10 classes, 8192 slots);
- ``c`` < Cp (classes padded to a power of two) is the class.

What each party packs (numpy in, numpy out; the encryption is :func:`trustgrad.crypto.encrypt`):

- samples (data owner): ``X[f, j, c] = x_j[f]`` for c < C (0 on padded classes), ``Y[f, j, c] = y_j[c]`` for every f;
- model and claims (same layout, so a claim can be aggregated straight into the model): a *weight* ciphertext
  ``W[f, j, c] = W[c, f]`` for every j and a *bias* ciphertext ``b[f, j, c] = b[c]`` for every f and j.

The recomputed gradient lands at ``j = 0``: ``G[f, 0, c] = dW[c, f]`` after a sum over j by rotations ``Cp, 2 Cp, ...``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trustgrad.errors import ConfigError

__all__ = ["Layout"]


@dataclass(frozen=True)
class Layout:
    """Packing geometry for ``features`` x ``classes`` in ciphertexts of ``slots`` slots.

    >>> lay = Layout(features=64, classes=10, slots=8192)
    >>> (lay.fp, lay.per_ct, lay.cp)
    (64, 8, 16)
    """

    features: int
    classes: int
    slots: int

    def __post_init__(self) -> None:
        if self.features < 1 or self.classes < 1:
            raise ConfigError(f"layout needs features and classes >= 1, got {self.features} x {self.classes}")
        if self.slots < 1 or self.slots & (self.slots - 1):
            raise ConfigError(f"slots must be a power of two, got {self.slots}")
        if self.fp * self.cp > self.slots:
            raise ConfigError(
                f"{self.features} features x {self.classes} classes (padded {self.fp} x {self.cp}) do not fit in "
                f"{self.slots} slots; use a larger ring"
            )

    @property
    def fp(self) -> int:
        return _pow2(self.features)

    @property
    def cp(self) -> int:
        return _pow2(self.classes)

    @property
    def per_ct(self) -> int:
        """J: samples per ciphertext."""
        return self.slots // (self.fp * self.cp)

    @property
    def block(self) -> int:
        """Slots per feature block (J * Cp)."""
        return self.per_ct * self.cp

    # -- rotations --------------------------------------------------------------------------------------------------

    @property
    def feature_rotations(self) -> tuple[int, ...]:
        """Rotate-and-sum over f (outermost: the sum is replicated into every f block)."""
        return tuple(self.block << i for i in range(self.fp.bit_length() - 1))

    @property
    def sample_rotations(self) -> tuple[int, ...]:
        """Rotate-and-sum over j (the sum lands at j = 0)."""
        return tuple(self.cp << i for i in range(self.per_ct.bit_length() - 1))

    @property
    def class_rotations(self) -> tuple[int, ...]:
        """Rotate-and-sum over c inside a j cell (the sum lands at c = 0)."""
        return tuple(1 << i for i in range(self.cp.bit_length() - 1))

    @property
    def rotations(self) -> tuple[int, ...]:
        """Every rotation index the server needs keys for."""
        return tuple(sorted(set(self.feature_rotations + self.sample_rotations + self.class_rotations)))

    # -- packing ----------------------------------------------------------------------------------------------------

    def _grid(self) -> np.ndarray:
        return np.zeros((self.fp, self.per_ct, self.cp))

    def pack_samples(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Up to J samples: ``x`` (n x F) and one-hot ``y`` (n x C) -> the X and Y slot vectors."""
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        n = len(x)
        if x.shape != (n, self.features) or y.shape != (n, self.classes) or not 1 <= n <= self.per_ct:
            raise ConfigError(
                f"pack_samples needs 1..{self.per_ct} rows of {self.features} features and {self.classes} one-hot "
                f"classes, got x {x.shape}, y {y.shape}"
            )
        gx, gy = self._grid(), self._grid()
        gx[: self.features, :n, : self.classes] = x.T[:, :, None]
        gy[:, :n, : self.classes] = y[None, :, :]
        return gx.reshape(-1), gy.reshape(-1)

    def pack_weights(self, w: np.ndarray) -> np.ndarray:
        """``w`` (C x F) -> ``W[f, j, c] = w[c, f]`` for every j."""
        w = np.asarray(w, np.float64)
        if w.shape != (self.classes, self.features):
            raise ConfigError(f"weights must be {self.classes} x {self.features}, got {w.shape}")
        g = self._grid()
        g[: self.features, :, : self.classes] = w.T[:, None, :]
        return g.reshape(-1)

    def pack_bias(self, b: np.ndarray) -> np.ndarray:
        """``b`` (C) -> ``b[f, j, c] = b[c]`` for every f and j."""
        b = np.asarray(b, np.float64).reshape(-1)
        if b.shape != (self.classes,):
            raise ConfigError(f"bias must have {self.classes} entries, got {b.shape}")
        g = self._grid()
        g[:, :, : self.classes] = b
        return g.reshape(-1)

    def unpack_weights(self, slots: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`pack_weights` (reads j = 0)."""
        return (
            np.asarray(slots[: self.slots]).reshape(self.fp, self.per_ct, self.cp)[: self.features, 0, : self.classes].T
        )

    def unpack_bias(self, slots: np.ndarray) -> np.ndarray:
        return np.asarray(slots[: self.slots]).reshape(self.fp, self.per_ct, self.cp)[0, 0, : self.classes].copy()

    # -- plaintext masks --------------------------------------------------------------------------------------------

    def position_mask(self, positions: list[int] | tuple[int, ...], value: float = 1.0) -> np.ndarray:
        """``value`` on every (f, j, c) with j in ``positions``: selects samples out of a data owner's ciphertext."""
        g = self._grid()
        g[:, list(positions), :] = value
        return g.reshape(-1)

    def bias_cell_mask(self, positions: list[int] | tuple[int, ...], value: float) -> np.ndarray:
        """``value`` on (f=0, j in positions, c < C): the residuals that feed the bias gradient."""
        g = self._grid()
        g[0, list(positions), : self.classes] = value
        return g.reshape(-1)

    def replica_mask(self, *, bias: bool = False) -> np.ndarray:
        """1 on (f < F, j < J - 1, c < C) (bias: every f < Fp): cells whose value must equal the next position's
        (replicas over j)."""
        g = self._grid()
        g[: self.fp if bias else self.features, : self.per_ct - 1, : self.classes] = 1.0
        return g.reshape(-1)

    def padding_mask(self, *, bias: bool) -> np.ndarray:
        """1 on the slots a model-layout ciphertext leaves zero: padded classes, and (weights only) padded features."""
        g = np.ones((self.fp, self.per_ct, self.cp))
        g[: self.fp if bias else self.features, :, : self.classes] = 0.0
        return g.reshape(-1)

    def block_chain_mask(self) -> np.ndarray:
        """1 on (f < Fp - 1, j = 0, c < C): bias cells whose value must equal the next feature block's."""
        g = self._grid()
        g[: self.fp - 1, 0, : self.classes] = 1.0
        return g.reshape(-1)

    def gradient_mask(self) -> np.ndarray:
        """1 on (f < F, j = 0, c < C): the slots that hold the recomputed weight gradient."""
        g = self._grid()
        g[: self.features, 0, : self.classes] = 1.0
        return g.reshape(-1)

    def bias_mask(self) -> np.ndarray:
        """1 on (f = 0, j = 0, c < C): the slots that hold the recomputed bias gradient."""
        g = self._grid()
        g[0, 0, : self.classes] = 1.0
        return g.reshape(-1)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
