"""The model zoo (a registry). The small models are ``nn.Sequential`` so pipelines can cut them into stages; the
32x32 image models with BatchNorm (``cnn-bn``, and ``resnet18`` from torchvision) are for the data-parallel patterns
(``splittable`` says which a pipeline or tensor split accepts; docs/models.md says what every pattern does with the
BatchNorm buffers).

A user's own model (any ``nn.Module``) is named by its factory, ``"package.module:name"`` (``trustgrad.factories``),
called as ``factory(input_shape, num_classes)`` under the same seeded generator as the zoo's.

Initial weights derive from the run's committed seed (``seeding.derive_seed(seed, "init")``): a verifier regenerates
W0 exactly instead of testing its distribution (DESIGN: nothing the prover may choose).

>>> m = build_model("mlp", (1, 8, 8), 10, seed=0)
>>> sum(p.numel() for p in m.parameters())
8970
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from . import factories
from .config import ModelConfig
from .errors import ConfigError
from .registry import Registry
from .seeding import derive_seed

__all__ = [
    "MODELS",
    "LOSSES",
    "POLY_SIGMOID",
    "build_model",
    "loss_for",
    "loss_named",
    "poly_bce",
    "PolySigmoid",
    "Square",
    "has_batch_stats",
    "recalibrate_batch_stats",
    "splittable",
]

ModelFactory = Callable[[tuple[int, ...], int, ModelConfig], nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, seed: int, config: ModelConfig | None = None
) -> nn.Module:
    """Build model ``name`` (a zoo name or a user's factory) for inputs of ``input_shape`` with weights drawn from
    PRF(seed, "init")."""
    factory = _user_model if factories.is_factory(name) else MODELS.get(name)
    config = config or ModelConfig(name=name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "init"))
        model = factory(tuple(input_shape), num_classes, config)
    if config.loss:  # the run chose a loss other than the model's own: the replica, audits and proofs use it
        _check_loss(config.loss)
        model.trustgrad_loss = config.loss
    return model


def _user_model(shape: tuple[int, ...], classes: int, cfg: ModelConfig) -> nn.Module:
    model = factories.call(cfg.name, "model factory", shape, classes)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model factory {cfg.name!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"model factory {cfg.name!r} returned a model without trainable parameters")
    return model


def _check_loss(name: str) -> None:
    if not (factories.is_factory(name) or name in LOSSES or name == "cross-entropy"):
        known = ", ".join(["cross-entropy", *sorted(LOSSES)])
        raise ConfigError(f"unknown loss {name!r} (known: {known}, or a factory 'package.module:name')")


def _features(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


class Square(nn.Module):
    """x -> x^2: the CryptoNets activation, exactly computable under CKKS."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


# s(z) = c0 + c1 z + c3 z^3: the degree-3 least-squares sigmoid on [-8, 8] (Kim et al. 2018 use the same kind)
POLY_SIGMOID = (0.5, 0.197, -0.004)


class PolySigmoid(nn.Module):
    """Degree-3 least-squares sigmoid on [-8, 8]: 0.5 + 0.197 z - 0.004 z^3 (depth 2 under CKKS)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c0, c1, c3 = POLY_SIGMOID
        return c0 + c1 * x + c3 * x * x * x


def poly_bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss of ``logreg-poly``: its gradient w.r.t. ``logits`` is exactly ``(s(logits) - onehot(y)) / B`` with
    ``s`` the polynomial sigmoid (one-vs-rest logistic regression), the quantity blind verification recomputes on
    ciphertexts, so plaintext training and the check compare like with like (``y``: class indices or one-hot)."""
    onehot = nn.functional.one_hot(y.long(), logits.shape[-1]).to(logits.dtype) if y.dim() == 1 else y.to(logits.dtype)
    c0, c1, c3 = POLY_SIGMOID
    z = logits
    per = c0 * z + 0.5 * c1 * z * z + 0.25 * c3 * z**4 - onehot * z
    return per.sum() / logits.shape[0]


# training losses other than cross-entropy, by the name a model factory stores in ``model.trustgrad_loss``
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"poly-bce": poly_bce}


def loss_for(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss a model was built for (cross-entropy unless its factory or the run named another)."""
    return loss_named(getattr(model, "trustgrad_loss", None) or "cross-entropy")


def loss_named(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A loss by its name: cross-entropy, a zoo loss, or a user's ``module:name`` (resolved through the gate)."""
    if factories.is_factory(name):
        return factories.resolve(name, "loss")
    if name == "cross-entropy":
        return nn.functional.cross_entropy
    _check_loss(name)
    return LOSSES[name]


@MODELS.register("logreg")
def _logreg(shape: tuple[int, ...], classes: int, cfg: ModelConfig) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(_features(shape), classes))


@MODELS.register("logreg-poly")
def _logreg_poly(shape: tuple[int, ...], classes: int, cfg: ModelConfig) -> nn.Sequential:
    """``logreg`` trained with :func:`poly_bce` (polynomial-sigmoid one-vs-rest): the model ``--proof blind`` checks
    on ciphertexts. Predictions are the argmax of the logits (``s`` is increasing on [-4, 4])."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(_features(shape), classes))
    model.trustgrad_loss = "poly-bce"  # a plain attribute: not a submodule, not in the state dict
    return model


@MODELS.register("mlp")
def _mlp(shape: tuple[int, ...], classes: int, cfg: ModelConfig) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = _features(shape)
    for _ in range(cfg.depth):
        layers += [nn.Linear(width, cfg.hidden), nn.ReLU()]
        width = cfg.hidden
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


@MODELS.register("poly-mlp")
def _poly_mlp(shape: tuple[int, ...], classes: int, cfg: ModelConfig) -> nn.Sequential:
    """One hidden layer with a square activation (CryptoNets): HE-friendly, depth 2 per forward pass."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(_features(shape), cfg.hidden), Square(), nn.Linear(cfg.hidden, classes)
    )


def _dlg_lenet(shape: tuple[int, ...], classes: int, activation: type[nn.Module]) -> nn.Sequential:
    """DLG's LeNet (Zhu et al. 2019): 3 convs (kernel 5, 12 channels, strides 2, 2, 1), Linear head, U(-0.5, 0.5)."""
    if len(shape) != 3:
        raise ConfigError(f"DLG's LeNet needs image inputs (C, H, W), got shape {shape}")
    side = shape[1]
    for stride in (2, 2, 1):
        side = (side - 1) // stride + 1
    model = nn.Sequential(
        nn.Conv2d(shape[0], 12, 5, stride=2, padding=2),
        activation(),
        nn.Conv2d(12, 12, 5, stride=2, padding=2),
        activation(),
        nn.Conv2d(12, 12, 5, stride=1, padding=2),
        activation(),
        nn.Flatten(),
        nn.Linear(12 * side * side, classes),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 0.5)
    return model


@MODELS.register("lenet-sigmoid")
def _lenet_sigmoid(shape: tuple[int, ...], classes: int, cfg: ModelConfig) -> nn.Sequential:
    return _dlg_lenet(shape, classes, nn.Sigmoid)


@MODELS.register("lenet-relu")
def _lenet_relu(shape: tuple[int, ...], classes: int, cfg: ModelConfig) -> nn.Sequential:
    return _dlg_lenet(shape, classes, nn.ReLU)


@MODELS.register("lenet")
def _lenet(shape: tuple[int, ...], classes: int, cfg: ModelConfig) -> nn.Sequential:
    """A small LeNet-style CNN for (C, H, W) inputs of any size >= 4x4."""
    if len(shape) != 3:
        raise ConfigError(f"model 'lenet' needs image inputs (C, H, W), got shape {shape}")
    channels, height, width = shape
    if min(height, width) < 4:
        raise ConfigError(f"model 'lenet' needs images of at least 4x4, got {height}x{width}")
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(16 * 16, cfg.hidden),
        nn.ReLU(),
        nn.Linear(cfg.hidden, classes),
    )


# --------------------------------------------------------------------------------------------------------------------
# 32x32 image models with BatchNorm


def has_batch_stats(model: nn.Module) -> bool:
    """Whether ``model`` holds BatchNorm running statistics: state besides its parameters, and a forward pass in
    training mode that couples the samples of a batch (so a batch split over workers is not the combined batch)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


def recalibrate_batch_stats(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Recompute BatchNorm running statistics of ``model`` as the plain average of the batch statistics over
    ``batches`` ("precise BN", Wu & Johnson 2021): for a model whose parameters changed without any forward pass in
    training mode here (a parameter server's), so its stale statistics would make evaluation meaningless."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # None: a cumulative average over the batches, not an exponential one
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def splittable(model: nn.Module) -> str | None:
    """Why a pipeline or tensor split cannot take ``model`` (None: it can). Both cut an ``nn.Sequential`` layer by
    layer and move parameters only, so BatchNorm buffers would stay behind on the stage or shard that ran them."""
    if not isinstance(model, nn.Sequential):
        return f"it is a {type(model).__name__}, not an nn.Sequential"
    if has_batch_stats(model):
        return "it holds BatchNorm running statistics, which a split does not carry"
    return None


def _image_shape(name: str, shape: tuple[int, ...], smallest: int) -> tuple[int, int, int]:
    if len(shape) != 3 or min(shape[1:]) < smallest:
        raise ConfigError(f"model {name!r} needs image inputs (C, H, W) of at least {smallest}x{smallest}, got {shape}")
    return shape  # type: ignore[return-value]


@MODELS.register("cnn-bn")
def _cnn_bn(shape: tuple[int, ...], classes: int, cfg: ModelConfig) -> nn.Sequential:
    """A small CNN with BatchNorm for 32x32 inputs (three conv-BN-ReLU blocks, 16-32-64 channels; 24k parameters at
    3 channels): cheap enough for the tests, with the state (running statistics) real models carry."""
    channels = _image_shape("cnn-bn", shape, 8)[0]

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(channels, 16),
        nn.MaxPool2d(2),
        *block(16, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, classes),
    )


@MODELS.register("resnet18")
def _resnet18(shape: tuple[int, ...], classes: int, cfg: ModelConfig) -> nn.Module:
    """torchvision's ResNet-18 (11.2M parameters), CIFAR variant: a 3x3 stride-1 stem and no max-pool, so 32x32
    inputs keep their resolution into the first stage (He et al. 2016, sec. 4.2). Random seeded weights: nothing is
    downloaded."""
    from torchvision.models import resnet18

    channels = _image_shape("resnet18", shape, 8)[0]
    model = resnet18(num_classes=classes)
    model.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init of convs
    model.maxpool = nn.Identity()
    return model
