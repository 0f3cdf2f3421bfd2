"""What verifying a proof will cost in memory, known before anything the proof declares is built.

A manifest declares the model (name, widths, depth), the batch size and the number of steps; believed blindly, a
manifest declaring ``mlp`` with hidden 65536 makes a verifier allocate 17 GB per layer. So the verifier first builds
the declared model on PyTorch's ``meta`` device (shapes only, no storage), runs one meta forward pass to size the
activations, and compares the estimate with a budget derived from this machine: half of what is available now (the
smaller of ``MemAvailable`` and the address-space limit left to this process), unless the caller sets one.

>>> shapes = meta_shapes("mlp", (1, 8, 8), 10, ModelConfig(hidden=16, depth=1))
>>> shapes.parameters
1210
"""

from __future__ import annotations

import logging
import math
import resource
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ProofError
from ..models import build_model

__all__ = ["MetaShapes", "meta_shapes", "machine_budget", "estimate", "check_budget"]

log = logging.getLogger(__name__)

#: fraction of the available memory one verification may plan to use (the rest: the OS, other jobs, slack)
BUDGET_FRACTION = 0.5
#: how many full copies of the model state a replay keeps alive at once: model, gradients, momentum, the restored
#: optimizer's buffers, the captured start and end states, the claimed state, and the float64 flattening of three of
#: them for the distances (x2 for float64) -- counted generously, so the estimate errs toward refusing
STATE_COPIES = 16


@dataclass(frozen=True)
class MetaShapes:
    """The declared model's state, sized without allocating it."""

    spec: dict[str, tuple[tuple[int, ...], torch.dtype]]  # model/<name> -> (shape, dtype)
    momentum: dict[str, tuple[tuple[int, ...], torch.dtype]]  # momentum/<param> -> (shape, dtype)
    parameters: int  # trainable elements
    state_bytes: int  # bytes of the model's state_dict
    activation_elements: int  # elements of every module output on one sample (forward), a proxy for activations


def meta_shapes(name: str, input_shape: tuple[int, ...], classes: int, cfg: ModelConfig) -> MetaShapes:
    """Names, shapes and sizes of the declared model, built on the meta device (costs no memory whatever it claims)."""
    with torch.device("meta"):
        model = build_model(name, input_shape, classes, 0, cfg)
    spec = {f"model/{k}": (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    momentum = {f"momentum/{n}": (tuple(p.shape), p.dtype) for n, p in model.named_parameters()}
    state_bytes = sum(math.prod(s) * _itemsize(d) for s, d in spec.values())
    return MetaShapes(
        spec, momentum, sum(p.numel() for p in model.parameters()), state_bytes, _activations(model, input_shape)
    )


def _activations(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    total = 0

    def count(_m: nn.Module, _i: object, out: object) -> None:
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel()

    handles = [m.register_forward_hook(count) for m in model.modules() if m is not model]
    try:
        # evaluation mode: the same outputs, and BatchNorm does not refuse the one sample of a 1x1 feature map
        model.eval()(torch.empty((1, *input_shape), device="meta"))
    finally:
        for h in handles:
            h.remove()
    return total


def machine_budget() -> int:
    """Bytes one verification may plan to use: ``BUDGET_FRACTION`` of what this process can still get."""
    available = _mem_available()
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        available = min(available, max(0, soft - _vm_size()))
    return int(BUDGET_FRACTION * available)


def estimate(shapes: MetaShapes, batch_total: int, indices_bytes: int, cached_states: int) -> int:
    """Peak bytes of a verification: replay working set, activations, indices, and the checkpoints held at once."""
    return (
        STATE_COPIES * shapes.state_bytes
        + 3 * 4 * batch_total * shapes.activation_elements  # forward outputs, their gradients, slack; float32
        + 2 * indices_bytes  # the parsed indices and the PRF's recomputation compared with them
        + cached_states * 2 * shapes.state_bytes  # model and momentum per cached checkpoint
    )


def check_budget(need: int, budget: int, what: str) -> None:
    """``ProofError`` (one line, exit 2) naming both figures when ``need`` exceeds ``budget``."""
    if need > budget:
        raise ProofError(
            f"verifying this proof needs about {_gb(need)} ({what}), more than the memory budget of {_gb(budget)} "
            f"({BUDGET_FRACTION:.0%} of the memory available here; --memory-budget sets another)"
        )
    log.debug("proof verification budget: %s of %s", _gb(need), _gb(budget))


def _gb(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    pages, size = _sysconf("SC_AVPHYS_PAGES"), _sysconf("SC_PAGE_SIZE")
    return pages * size if pages and size else 1 << 30  # unknown: plan for 1 GiB, the conservative choice


def _vm_size() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _sysconf(name: str) -> int:
    import os

    try:
        return int(os.sysconf(name))
    except (ValueError, OSError):
        return 0


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
