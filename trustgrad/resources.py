"""What a job may ask of the machine: checked before any process starts (docs/limits.md).

Two limits, both one-line ``ConfigError`` s (exit 2) naming the figures:

- **processes**: a local job starts at most ``max(8, 4 x cores)`` processes (8 on a 2-core machine, enough for the
  4-5 process demo and tests). ``--oversubscribe`` (or :func:`oversubscription`) lifts this cap; nothing lifts the
  config's absolute ceiling of 4096 workers.
- **memory**: the estimated peak of every process of the job plus the launching process must fit the *memory
  budget*, 80% of what the machine has available now (``MemAvailable``, the cgroup's limit or ``RLIMIT_AS``, whichever
  is least). The estimate counts, per process: the runtime (torch, trustgrad, gloo: 150 MB private memory measured per
  forked rank), the weights, their gradients, the optimizer's momentum, two flat copies the patterns communicate
  through, the activations of one batch (forward and backward), and the dataset each rank holds; a parameter server
  adds one parameter-sized vector per worker; encrypted jobs add what their protections declare (OpenFHE's keys and
  ciphertexts: ``protect/footprint.py``). Jobs side by side are admitted by ``trustgrad.admission``.

Parameters and activations are counted on torch's ``meta`` device: the model is built and run without allocating, so
a model of 17 GB per layer is refused in milliseconds.

>>> machine = Machine(cores=2, memory_available=8 << 30)
>>> process_cap(machine)
8
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .admission import reclaimable
from .config import ModelConfig, RunConfig
from .errors import ConfigError
from .machine import (
    BUDGET_FRACTION,
    Machine,
    budget_text,
    check_processes,
    human_bytes,
    memory_budget,
    oversubscription,
    process_cap,
)

__all__ = [
    "Machine",
    "JobEstimate",
    "process_cap",
    "memory_budget",
    "check_processes",
    "count_model",
    "estimate_job",
    "check_launch",
    "check_output_folder",
    "oversubscription",
    "human_bytes",
]

log = logging.getLogger(__name__)

RUNTIME_BYTES = 150 << 20  # private memory of a forked rank with torch + gloo up (measured: 120 MB)
FLOAT_BYTES = 4  # every model trains in float32


# --------------------------------------------------------------------------------------------------------------------
# the memory estimate


@dataclass(frozen=True)
class ModelCount:
    parameters: int
    activations_per_sample: int  # values every layer outputs for one sample


def count_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, config: ModelConfig, max_parameters: int | None = None
) -> ModelCount:
    """Parameters and per-sample activations of a registry model, counted on the ``meta`` device (no allocation).

    Above ``max_parameters`` the activations are not counted (0): the caller refuses the model on its parameters,
    and a meta forward pass of hundreds of wide layers still takes seconds. Any failure to build or run the model
    is a one-line ``ConfigError`` (a model the zoo cannot make for this shape).
    """
    import torch

    from .models import build_model

    outputs: list[int] = []

    def hook(module: Any, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            outputs.append(output.numel())

    try:
        with torch.device("meta"):
            model = build_model(name, input_shape, num_classes, seed=0, config=config)
            parameters = sum(p.numel() for p in model.parameters())
            if max_parameters is not None and parameters > max_parameters:
                return ModelCount(parameters, 0)
            for m in model.modules():
                if m is not model:
                    m.register_forward_hook(hook)
            # evaluation mode: the same outputs, and BatchNorm does not refuse the one sample of a 1x1 feature map
            model.eval()(torch.empty((1, *input_shape)))
    except ConfigError:
        raise
    except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"model {name!r} cannot be built for inputs {input_shape}: {first}") from None
    return ModelCount(parameters, sum(outputs))


@dataclass(frozen=True)
class JobEstimate:
    """Estimated peak memory of a job, in bytes, by what it counts."""

    processes: int
    parameters: int
    per_process: dict[str, int]
    server_extra: int = 0  # a parameter server's per-worker vectors
    parent: int = 0  # the launching process: runtime and the model it builds to check the config
    notes: tuple[str, ...] = field(default=())

    @property
    def process_bytes(self) -> int:
        return sum(self.per_process.values())

    @property
    def total(self) -> int:
        return self.processes * self.process_bytes + self.server_extra + self.parent

    def describe(self) -> str:
        parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in self.per_process.items() if v)
        extra = f" + server {human_bytes(self.server_extra)}" if self.server_extra else ""
        return (
            f"{self.processes} processes x {human_bytes(self.process_bytes)} ({parts}){extra} + launcher "
            f"{human_bytes(self.parent)} = {human_bytes(self.total)}"
        )


def estimate_job(cfg: RunConfig, world_size: int, machine: Machine | None = None) -> JobEstimate:
    """Peak memory of ``cfg`` on ``world_size`` processes (see the module doc for what is counted)."""
    from .data import load_dataset
    from .protect import build as build_protections

    ds = load_dataset(cfg.dataset, cfg.data_dir)
    # no process holds a model above the budget: counting its activations would only cost time
    most = memory_budget(machine) // FLOAT_BYTES if machine is not None else None
    count = count_model(cfg.model.name, ds.input_shape, ds.num_classes, cfg.model, most)
    weights = count.parameters * FLOAT_BYTES
    data = sum(t.numel() * t.element_size() for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test))
    per_process = {
        "runtime": RUNTIME_BYTES,
        "weights": weights,
        "gradients": weights,
        "momentum": _optimizer_state(cfg) * weights,
        "buffers": 2 * weights,
        "activations": 2 * cfg.batch_size * count.activations_per_sample * FLOAT_BYTES,
        "data": data,
    }
    protections = build_protections(cfg).memory(count.parameters)  # OpenFHE's keys and ciphertexts
    per_process["openfhe"] = protections.per_rank
    server_extra = (cfg.workers * weights if cfg.pattern.name == "ps" else 0) + protections.server
    return JobEstimate(world_size, count.parameters, per_process, server_extra, parent=RUNTIME_BYTES + weights + data)


def _optimizer_state(cfg: RunConfig) -> int:
    """Copies of the weights the optimizer keeps: SGD's momentum buffer (if any), Adam's two moments."""
    return 2 if cfg.optimizer == "adam" else int(cfg.momentum > 0)


# --------------------------------------------------------------------------------------------------------------------
# everything a job is checked for before launch


def check_device(cfg: RunConfig, machine: Machine, local_processes: int) -> None:
    if cfg.device != "cuda":
        return
    if machine.cuda_devices < 1:
        raise ConfigError("--device cuda: no CUDA device is visible on this machine; use --device cpu")
    if local_processes > machine.cuda_devices:
        raise ConfigError(
            f"--device cuda: the job starts {local_processes} processes here but {machine.cuda_devices} GPU(s) are "
            "visible (NCCL needs one GPU per rank); use fewer --workers or --device cpu"
        )


def check_output_folder(out: str | os.PathLike[str], flag: str = "--out") -> None:
    """The folder ``out`` exists as a writable folder or can be created: probed with a temporary file, not trusted
    to permission bits (root passes ``os.access`` on a read-only file system)."""
    path = Path(out)
    probe_in = path
    try:
        while not probe_in.exists():  # the nearest existing ancestor is where creating the folder starts
            if probe_in.parent == probe_in:
                break
            probe_in = probe_in.parent
        if not probe_in.is_dir():
            raise ConfigError(f"{flag} {str(out)!r}: {str(probe_in)!r} is not a folder, so the run cannot write there")
        with tempfile.NamedTemporaryFile(dir=probe_in, prefix=".trustgrad-probe-"):
            pass
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"{flag} {str(out)!r}: cannot write in {str(probe_in)!r} ({reason})") from None


def check_launch(cfg: RunConfig, machine: Machine | None = None, oversubscribe: bool = False) -> JobEstimate:
    """Every check of what ``cfg`` asks of this machine: device, processes, memory, the output folder.

    Runs before any process starts and before the launcher builds the model (so before anything large is
    allocated); returns the estimate it compared against the budget.
    """
    from .launch import under_torchrun
    from .patterns import PATTERNS

    given = machine is not None  # a given machine is all there is (tests, the fuzz target): no ledger is read
    machine = machine or Machine.detect()
    world = PATTERNS.get(cfg.pattern.name).world_size(cfg)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if under_torchrun() else world
    check_device(cfg, machine, local)
    if not under_torchrun():  # under torchrun the agent started the processes: its --nproc-per-node decides
        check_processes(world, machine, oversubscribe)
    estimate = estimate_job(cfg, local, machine)
    # memory the user's running trustgrad jobs give back when they end: the launch waits for it (trustgrad.admission)
    freed = 0 if given else reclaimable()
    if estimate.total > memory_budget(machine) + int(BUDGET_FRACTION * freed):
        waits = f", or the {human_bytes(freed)} running jobs will give back" if freed else ""
        raise ConfigError(
            f"the job needs an estimated {human_bytes(estimate.total)} ({estimate.describe()}), above "
            f"{budget_text(machine)}{waits}; use a smaller model, batch or fewer --workers"
        )
    for flag, folder in (("--out", cfg.out),):
        if folder:
            check_output_folder(folder, flag)
    log.info("resources: %s within %s", estimate.describe(), budget_text(machine))
    return estimate
