"""A user's own code, importable by name (``tests.userzoo:...``): what ``--model package.module:factory`` names.

A small residual CNN (not an ``nn.Sequential``) for 1x8x8 digits, a dataset factory and a loss, as a researcher
would write them in a module of their own.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualCNN(nn.Module):
    """conv -> (conv, conv) + skip -> pool -> linear: a residual block, so any architecture, not only a Sequential."""

    def __init__(self, channels: int, classes: int, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.a = nn.Conv2d(width, width, 3, padding=1)
        self.b = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.b(torch.relu(self.a(h))))  # the residual connection
        return self.head(nn.functional.adaptive_avg_pool2d(h, 4).flatten(1))


def residual_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return ResidualCNN(input_shape[0], num_classes)


def digits_tensors():  # noqa: ANN201
    """The embedded digits as (train, test) pairs of tensors: a user's dataset factory."""
    from trustgrad.data import load_dataset

    ds = load_dataset("digits")
    return (ds.x_train, ds.y_train), (ds.x_test, ds.y_test)


def smooth_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, y, label_smoothing=0.1)


def raises(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    raise RuntimeError("this factory is broken on purpose")


def not_a_module(input_shape: tuple[int, ...], num_classes: int) -> object:
    return "a string"
