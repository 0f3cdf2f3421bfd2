"""Victim models for gradient-leakage experiments.

- :func:`lenet_sigmoid`: the network of DLG (Zhu et al. 2019, "Deep Leakage from Gradients", NeurIPS; reference code
  ``models/vision.py``): three 5x5 convolutions with 12 channels, strides 2, 2, 1 and padding 2, sigmoid after each,
  then one Linear head; every weight and bias drawn from Uniform(-0.5, 0.5). Its smooth, twice-differentiable
  activations are what make L2 gradient matching with L-BFGS work.
- :func:`lenet_relu`: the same with ReLU, as trustgrad trains ReLU networks (ReLU's second derivative is zero almost
  everywhere, which is why DLG's objective struggles on it; Geiping et al. 2020).
- :func:`mlp_relu`: a small fully connected ReLU network (flatten, hidden layers, Linear head).

Constructors are deterministic in ``seed`` and leave the global RNG untouched.

>>> lenet_sigmoid(3, 10)(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["LeNet", "lenet_sigmoid", "lenet_relu", "mlp_relu"]

_ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}


def _out_size(n: int, stride: int) -> int:
    # kernel 5, padding 2
    return (n + 4 - 5) // stride + 1


class LeNet(nn.Module):
    """DLG's LeNet: conv(5, 12, s2) -> act -> conv(5, 12, s2) -> act -> conv(5, 12, s1) -> act -> Linear."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int = 32, activation: str = "sigmoid"):
        super().__init__()
        act = _ACTIVATIONS[activation]
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 12, kernel_size=5, padding=2, stride=2),
            act(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2),
            act(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1),
            act(),
        )
        side = _out_size(_out_size(_out_size(image_size, 2), 2), 1)
        self.fc = nn.Linear(12 * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def _uniform_init(model: nn.Module, seed: int, bound: float = 0.5) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) * (2 * bound) - bound)
    return model


def lenet_sigmoid(in_channels: int, num_classes: int, image_size: int = 32, *, seed: int = 0) -> LeNet:
    """DLG's sigmoid LeNet for ``image_size`` square inputs, weights Uniform(-0.5, 0.5) drawn from ``seed``."""
    return _uniform_init(LeNet(in_channels, num_classes, image_size, "sigmoid"), seed)


def lenet_relu(in_channels: int, num_classes: int, image_size: int = 32, *, seed: int = 0) -> LeNet:
    """DLG's LeNet with ReLU activations, weights Uniform(-0.5, 0.5) drawn from ``seed``."""
    return _uniform_init(LeNet(in_channels, num_classes, image_size, "relu"), seed)


def mlp_relu(
    in_channels: int,
    num_classes: int,
    image_size: int = 32,
    hidden: Sequence[int] = (256,),
    *,
    seed: int = 0,
) -> nn.Sequential:
    """Flatten -> (Linear -> ReLU) per ``hidden`` width -> Linear head, with PyTorch's default init under ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_channels * image_size * image_size
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        return nn.Sequential(*layers)
