"""Horizontal model parallelism: the weight matrices of an MLP's linear layers sharded across ranks (Megatron-LM).

Shoeybi et al. 2019 (Megatron-LM, sec. 3) pair consecutive linear layers: the first is split by output features
(column-wise: each rank computes its slice of the hidden units, the element-wise activation needs no communication),
the second by input features (row-wise: each rank's partial product is summed by one all-reduce). One all-reduce per
pair in the forward pass and one in the backward pass (the gradient w.r.t. the pair's input), instead of all-gathering
every activation.

This uses DTensor's ``parallelize_module`` with ``ColwiseParallel`` / ``RowwiseParallel`` (they run on gloo in torch
2.13). Layers outside a pair (a model's odd last linear layer, convolutions) stay whole on every rank: their inputs are
replicated, so every rank computes the same gradient for them and they stay in sync without communication.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from ..errors import ConfigError

__all__ = ["shard_plan", "tensor_parallel", "full_state", "unsharded_copy"]

#: children that act element-wise, so a column-sharded activation may pass through them unchanged
_ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.Identity, nn.Dropout)


def _elementwise(module: nn.Module) -> bool:
    # the model zoo's HE-friendly activations (Square, PolySigmoid) are element-wise too, and parameterless
    return isinstance(module, _ELEMENTWISE) or type(module).__name__ in ("Square", "PolySigmoid")


def shard_plan(model: nn.Sequential, ranks: int) -> dict[str, ParallelStyle]:
    """``{child name: Colwise/RowwiseParallel}`` for each pair of linear layers joined only by element-wise children."""
    plan: dict[str, ParallelStyle] = {}
    names = list(model._modules)
    i = 0
    while i < len(names):
        first = model[i]
        j = i + 1
        while j < len(names) and _elementwise(model[j]):
            j += 1
        if isinstance(first, nn.Linear) and j < len(names) and isinstance(model[j], nn.Linear):
            if first.out_features % ranks:
                raise ConfigError(
                    f"tensor parallelism splits the {first.out_features} hidden units of layer {names[i]} over "
                    f"{ranks} ranks; use a --hidden divisible by --workers {ranks}"
                )
            plan[names[i]], plan[names[j]] = ColwiseParallel(), RowwiseParallel()
            i = j + 1
        else:
            i += 1
    if not plan:
        raise ConfigError(
            "model has no shardable layers for tensor parallelism (it needs two linear layers joined by an "
            "element-wise activation, e.g. --model mlp)"
        )
    return plan


def tensor_parallel(model: nn.Sequential, ranks: int, device: str = "cpu") -> tuple[nn.Sequential, DeviceMesh]:
    """Shard ``model`` in place over a 1-D mesh of all ranks; returns it and the mesh."""
    plan = shard_plan(model, ranks)
    mesh = init_device_mesh(device, (ranks,))
    return parallelize_module(model, mesh, plan), mesh


def unsharded_copy(model: nn.Module) -> nn.Module:
    """A plain copy to load gathered states into (taken before sharding)."""
    return copy.deepcopy(model)


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole tensors of a sharded model. Collective: every rank calls it in the same order (all-gathers)."""
    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in model.state_dict().items()
    }
