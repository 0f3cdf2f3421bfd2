"""The Python API: put trustgrad's patterns and protections around a user's own model, data, loss and optimizer.

``fit(model, dataset, ...)`` builds a validated :class:`~trustgrad.config.RunConfig` and runs it exactly as
``trustgrad train`` does (the CLI is a client of :func:`run_job`), returning a :class:`TrainResult` value.

What must be importable: every rank is a fresh process and the verifier another one, so a user's model, dataset and
loss travel by name. Give them as ``"package.module:name"`` strings or as top-level callables of an importable module
(a script's own functions count: ``python job.py`` makes them ``job:name``, since spawned ranks inherit ``sys.path``).
The module must not start training when imported: guard the script's work with ``if __name__ == "__main__":``.

- model: ``factory(input_shape, num_classes) -> nn.Module``, any architecture; called under the run's seeded
  generator, so W0 is a function of the seed (the verifier regenerates it).
- dataset: a zoo name (``"digits"``), or ``factory() -> (train, test)`` where each is a torch ``Dataset`` of
  ``(x, y)`` items or a pair of tensors ``(x, y)`` (or a :class:`~trustgrad.data.Dataset`), or that data itself
  (saved once as safetensors under ``OUT/data`` for the ranks to read). Batches come from the PRF plan of the seed,
  over the same IID shards as the zoo's datasets.
- loss: None (the model's own: cross-entropy), a registered name, or ``fn(logits, y) -> scalar``.
- optimizer: ``"sgd"`` (``momentum``) or ``"adam"`` (``betas``, ``eps``); proofs, audits and audit repairs replay
  the optimizer the run used.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig, config_from_dict
from .errors import ConfigError
from .factories import allow, name_of

__all__ = ["fit", "run_job", "job_config", "TrainResult", "EpochMetrics"]

Factory = str | Callable[..., Any]


@dataclass(frozen=True)
class EpochMetrics:
    """One line of ``metrics.jsonl``: the coordinator's view at the end of an epoch."""

    epoch: int
    steps: int
    loss: float
    test_loss: float
    test_accuracy: float
    elapsed: float
    bytes_sent: int
    extra: Mapping[str, Any]  # what the pattern added (ps: model versions; gossip: consensus distance; ...)

    @classmethod
    def from_record(cls, line: Mapping[str, Any]) -> EpochMetrics:
        known = ("epoch", "steps", "loss", "test_loss", "test_accuracy", "elapsed", "bytes_sent")
        return cls(*(line.get(k) for k in known), extra={k: v for k, v in line.items() if k not in known})  # type: ignore[arg-type]


@dataclass(frozen=True)
class TrainResult:
    """What a run returns: the final model's figures, per-epoch metrics, the summary's fields and where records are.

    ``summary`` holds everything ``summary.json`` holds (protections' statistics included: audited and rejected
    claims, CKKS seconds and bytes, staleness, ...). Paths are None when the run wrote no such record.
    """

    test_accuracy: float
    test_loss: float
    final_loss: float  # mean loss of the final model over the training set
    steps: int
    metrics: tuple[EpochMetrics, ...]
    summary: Mapping[str, Any]
    state: Mapping[str, torch.Tensor]  # the final model's state_dict
    config: RunConfig
    out: Path | None = None
    proof: Path | None = None  # OUT/proof of a --proof record run (verify with trustgrad.proof.verify)
    tensorboard: Path | None = None


def fit(
    model: Factory,
    dataset: Factory = "digits",
    *,
    loss: Factory | None = None,
    optimizer: str = "sgd",
    lr: float = 0.1,
    momentum: float | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    pattern: str = "allreduce",
    workers: int = 4,
    epochs: int = 10,
    batch_size: int = 32,
    max_steps: int | None = None,
    seed: int = 0,
    encrypt: str = "none",
    keys: str = "shared",
    proof: str = "none",
    out: str | Path | None = None,
    tensorboard: str | Path | None = None,
    progress: bool = False,
    **options: Any,
) -> TrainResult:
    """Train ``model`` on ``dataset`` with trustgrad's patterns and protections; returns a :class:`TrainResult`.

    ``momentum`` defaults to the CLI's 0.9 for SGD (Adam takes ``betas``). ``encrypt="ckks"``, ``keys``, and
    ``proof="record" | "audit" | "blind"`` are ``--encrypt``, ``--keys`` and ``--proof``. Any other ``trustgrad
    train`` setting goes in ``options`` under its config key, nested ones as a mapping or a dotted-free shortcut:
    ``schedule="sync"`` (pattern), ``audit_rate=0.5`` (proof), ``ring_dim=8192`` (crypto), ``malicious=("rank=2,
    attack=noise",)``, ``timeout=60``. Bad values raise a one-line :class:`~trustgrad.errors.ConfigError`.
    """
    cfg = job_config(
        model, dataset, loss=loss, optimizer=optimizer, lr=lr, momentum=momentum, betas=betas, eps=eps,
        weight_decay=weight_decay, pattern=pattern, workers=workers, epochs=epochs, batch_size=batch_size,
        max_steps=max_steps, seed=seed, encrypt=encrypt, keys=keys, proof=proof, out=out, tensorboard=tensorboard,
        progress=progress, **options,
    )  # fmt: skip
    return run_job(cfg)


#: option names that belong to a nested config table (the rest are top-level ``RunConfig`` keys)
_NESTED = {
    "pattern": ("schedule", "staleness", "servers", "straggler", "worker_timeout", "checkpoint_every", "segment_kb",
                "topology", "local_steps", "merge", "alpha", "peer_timeout", "min_replicas", "stages", "microbatches",
                "pipeline_schedule", "split_points"),
    "crypto": ("ring_dim", "scale_bits", "security", "ring_ciphertexts"),
    "proof": ("k", "audit_rate", "audit_threshold"),
    "model": ("hidden", "depth"),
}  # fmt: skip


def job_config(
    model: Factory,
    dataset: Factory = "digits",
    *,
    loss: Factory | None = None,
    optimizer: str = "sgd",
    momentum: float | None = None,
    pattern: str = "allreduce",
    encrypt: str = "none",
    keys: str = "shared",
    proof: str = "none",
    out: str | Path | None = None,
    tensorboard: str | Path | None = None,
    **options: Any,
) -> RunConfig:
    """The validated ``RunConfig`` :func:`fit` runs (the same one ``trustgrad train`` builds from flags)."""
    dataset_name, data_dir = _dataset(dataset, out)
    if data_dir is not None:
        options["data_dir"] = data_dir
    data: dict[str, Any] = {
        "model": {"name": _model_name(model)},
        "dataset": dataset_name,
        "optimizer": optimizer,
        "momentum": (0.9 if optimizer == "sgd" else 0.0) if momentum is None else momentum,
        "pattern": {"name": pattern},
        "crypto": {"encrypt": encrypt, "keys": keys},
        "proof": {"mode": proof},
        "out": None if out is None else str(out),
        "tensorboard": None if tensorboard is None else str(tensorboard),
    }
    if loss is not None:
        data["model"]["loss"] = loss if isinstance(loss, str) else name_of(loss, "loss")
    for key, value in options.items():
        table = next((t for t, keys_ in _NESTED.items() if key in keys_), None)
        target = data.setdefault(table, {}) if table else data
        target[key] = list(value) if isinstance(value, tuple) else value
    cfg = config_from_dict(data)
    allow(cfg.model.name, cfg.model.loss, cfg.dataset)  # this caller named them: its own code, trusted
    return cfg


def _dataset(dataset: Any, out: str | Path | None) -> tuple[str, str | None]:
    """(name, data_dir): a zoo name or a factory by name; in-memory data (a ``(train, test)`` pair of torch Datasets
    or ``(x, y)`` tensors, or a trustgrad ``Dataset``) is saved once as dataset ``tensors``, which every rank reads
    back (``OUT/data``, or a fresh temporary folder without ``out``; ``trustgrad verify --data-dir`` it)."""
    if isinstance(dataset, str):
        return dataset, None
    if callable(dataset):
        return name_of(dataset, "dataset factory"), None
    from .data import Dataset, as_dataset, save_tensors

    ds = dataset if isinstance(dataset, Dataset) else as_dataset("tensors", *_pair(dataset))
    folder = Path(out) / "data" if out is not None else Path(tempfile.mkdtemp(prefix="trustgrad-data-"))
    return "tensors", str(save_tensors(ds, folder))


def _pair(dataset: Any) -> tuple[Any, Any]:
    if not (isinstance(dataset, (tuple, list)) and len(dataset) == 2):
        raise ConfigError(
            f"dataset must be a name, a factory, a trustgrad Dataset or (train, test); got {type(dataset).__name__}"
        )
    return dataset[0], dataset[1]


def _model_name(model: Factory) -> str:
    """A zoo name stays a name; anything else is a user's factory (a ``module:name`` string or a callable)."""
    if isinstance(model, str):
        return model
    return name_of(model, "model factory")


def run_job(cfg: RunConfig) -> TrainResult:
    """Run a validated config (spawned locally, or as this process's rank under torchrun) and return its result.

    A non-coordinating torchrun rank gets a result without figures (NaN) and an empty summary: the coordinator
    holds the run's result and writes its records.
    """
    from .run import run

    result = run(cfg)
    s = result.summary
    nan = float("nan")
    out = Path(cfg.out) if cfg.out else None
    proof_dir = s.get("proof_dir")
    return TrainResult(
        test_accuracy=s.get("test_accuracy", nan),
        test_loss=s.get("test_loss", nan),
        final_loss=s.get("final_loss", nan),
        steps=s.get("steps", 0),
        metrics=tuple(EpochMetrics.from_record(m) for m in result.metrics),
        summary=json.loads(json.dumps(s)),  # a plain copy: what summary.json holds
        state=dict(result.state),
        config=cfg,
        out=out,
        proof=Path(proof_dir) if proof_dir else None,
        tensorboard=Path(cfg.tensorboard) if cfg.tensorboard and s else None,
    )
