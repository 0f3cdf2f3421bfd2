"""Server checkpoints: the model, its optimizer momentum and every worker's clock, in one safetensors file.

``--checkpoint-every N`` writes ``OUT/ps-checkpoint.safetensors`` every N model versions (atomically: a temporary
file, then a rename, so a crash never leaves half a checkpoint). ``--resume DIR`` reads it back; the file is untrusted
input: safetensors (no pickle), and every tensor's dtype and shape and the run it belongs to are checked before use.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import ConfigError

__all__ = ["ServerCheckpoint", "checkpoint_path", "FORMAT"]

FORMAT = "trustgrad-ps-checkpoint/1"
FILENAME = "ps-checkpoint.safetensors"


def checkpoint_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / FILENAME


@dataclass(frozen=True)
class ServerCheckpoint:
    params: torch.Tensor  # flat float32
    momentum: torch.Tensor | None  # sync: flat; async/ssp: one row per worker; None before the first update
    clocks: list[int]  # gradients each worker has pushed
    version: int  # model updates applied
    run: dict[str, object]  # what must match on resume: workers, seed, dataset, model, schedule

    def save(self, folder: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        path = checkpoint_path(folder)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"params": self.params.contiguous(), "clocks": torch.tensor(self.clocks, dtype=torch.int64)}
        if self.momentum is not None:
            tensors["momentum"] = self.momentum.contiguous()
        meta = {"format": FORMAT, "version": str(self.version), "run": json.dumps(self.run, sort_keys=True)}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, os.fspath(tmp), metadata=meta)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike, run: dict[str, object], num_params: int) -> ServerCheckpoint:
        """Read and check a checkpoint against the run that resumes it; any mismatch is a one-line ``ConfigError``."""
        from safetensors import SafetensorError, safe_open

        path = checkpoint_path(folder)
        if not path.is_file():
            where = os.fspath(folder)
            raise ConfigError(f"--resume {where!r}: no {FILENAME} there (write one with --checkpoint-every)")
        try:
            with safe_open(os.fspath(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
            version, saved_run = int(meta["version"]), json.loads(meta["run"])
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"--resume: {os.fspath(path)!r} is not a readable ps checkpoint ({exc})") from None
        if meta.get("format") != FORMAT:
            raise ConfigError(f"--resume: {os.fspath(path)!r} has format {meta.get('format')!r}, expected {FORMAT!r}")
        diff = sorted(k for k in run if saved_run.get(k) != run[k])
        if diff:
            shown = ", ".join(f"{k}={saved_run.get(k)!r} (now {run[k]!r})" for k in diff)
            raise ConfigError(f"--resume: the checkpoint belongs to another run: {shown}")
        params, clocks, momentum = tensors.get("params"), tensors.get("clocks"), tensors.get("momentum")
        workers = int(run["workers"])  # type: ignore[call-overload]
        ok = (
            params is not None
            and params.dtype == torch.float32
            and params.shape == (num_params,)
            and clocks is not None
            and clocks.dtype == torch.int64
            and clocks.shape == (workers,)
            and bool((clocks >= 0).all())
            and version >= 0
            and (
                momentum is None
                or (momentum.dtype == torch.float32 and momentum.shape in _state_shapes(num_params, workers))
            )
        )
        if not ok:
            raise ConfigError(f"--resume: {os.fspath(path)!r} holds tensors of the wrong dtype or shape for this model")
        return cls(params, momentum, [int(c) for c in clocks], version, saved_run)


def _state_shapes(num_params: int, workers: int) -> tuple[tuple[int, ...], ...]:
    """Optimizer state shapes a checkpoint may hold: SGD's flat buffer, DANA's per-worker rows, Adam's two moments
    and its step count (``Replica.flat_momentum``)."""
    return ((num_params,), (workers, num_params), (2 * num_params + 1,))
