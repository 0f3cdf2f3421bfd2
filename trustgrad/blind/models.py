"""The HE-friendly models blind verification checks, and their plaintext reference gradients.

``logreg-poly`` is one-vs-rest multinomial logistic regression with the degree-3 least-squares sigmoid
``s(z) = 0.5 + 0.197 z - 0.004 z^3`` (:class:`trustgrad.models.PolySigmoid`; Kim et al. 2018 use the same kind of
approximation for HE logistic regression). The loss is chosen so that its derivative with respect to the logits is
exactly ``(s(Z) - Y) / B`` — the quantity the server recomputes on ciphertexts — so plaintext training and the blind
check compare like with like::

    L(Z, Y) = sum(0.5 z + 0.0985 z^2 - 0.001 z^4 - y z) / B,    dL/dz = (s(z) - y) / B
    dW = (s(Z) - Y)^T X / B,    db = sum_rows(s(Z) - Y) / B

``linear`` is the cheaper check (MSE on the raw logits): ``P = Z``, ``L = sum((z - y)^2) / (2 B)``, same gradient
formula with ``P = Z`` (two multiplicative levels fewer under CKKS).

>>> import numpy as np
>>> x, y = np.ones((2, 3)), np.eye(2)
>>> dw, db = reference_gradient("linear", x, y, np.zeros((2, 3)), np.zeros(2))
>>> db.tolist()
[-0.5, -0.5]
"""

from __future__ import annotations

import numpy as np
import torch

from trustgrad.errors import ConfigError
from trustgrad.models import POLY_SIGMOID, poly_bce

__all__ = ["SIGMOID", "KINDS", "poly_sigmoid", "poly_bce", "linear_mse", "reference_gradient", "squared_distance"]

SIGMOID = POLY_SIGMOID  # s(z) = c0 + c1 z + c3 z^3, the coefficients of trustgrad.models.PolySigmoid
KINDS = ("poly", "linear")


def poly_sigmoid(z: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    c0, c1, c3 = SIGMOID
    return c0 + c1 * z + c3 * z * z * z


def linear_mse(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Loss whose gradient w.r.t. ``logits`` is ``(logits - onehot(y)) / B``."""
    onehot = _onehot(y, logits.shape[-1], logits.dtype)
    return 0.5 * ((logits - onehot) ** 2).sum() / logits.shape[0]


def reference_gradient(
    kind: str, x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Plaintext ``(dW, db)`` in float64 for ``x`` (B x F), one-hot ``y`` (B x C), ``w`` (C x F), ``b`` (C)."""
    if kind not in KINDS:
        raise ConfigError(f"blind check kind must be one of {list(KINDS)}, got {kind!r}")
    x, y, w, b = (np.asarray(a, dtype=np.float64) for a in (x, y, w, b))
    z = x @ w.T + b
    r = (poly_sigmoid(z) if kind == "poly" else z) - y
    return r.T @ x / len(x), r.sum(axis=0) / len(x)


def squared_distance(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    """``||dW_a - dW_b||^2 + ||db_a - db_b||^2`` in float64: what the blind check decrypts."""
    return float(sum(np.sum((np.asarray(u, np.float64) - np.asarray(v, np.float64)) ** 2) for u, v in zip(a, b)))


def _onehot(y: torch.Tensor, classes: int, dtype: torch.dtype) -> torch.Tensor:
    if y.dim() == 1:
        return torch.nn.functional.one_hot(y.long(), classes).to(dtype)
    return y.to(dtype)
