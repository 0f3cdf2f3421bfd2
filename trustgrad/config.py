"""Run configuration: one frozen dataclass per concern, validated, buildable from flags or a TOML file.

Layers (STYLE 13): the library takes these dataclasses; TOML files and CLI overrides are merged into a plain dict at
the CLI layer and turned into a ``RunConfig`` by :func:`config_from_dict`, which rejects unknown keys and wrong types
with a :class:`~trustgrad.errors.ConfigError` naming the key.

>>> cfg = config_from_dict({"workers": 2, "pattern": {"name": "ring"}})
>>> (cfg.workers, cfg.pattern.name, cfg.dataset)
(2, 'ring', 'digits')
>>> config_from_dict({"wrokers": 2})
Traceback (most recent call last):
...
trustgrad.errors.ConfigError: unknown config key 'wrokers' (known: ...)
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = [
    "RunConfig",
    "PatternConfig",
    "ModelConfig",
    "CryptoConfig",
    "ProofConfig",
    "config_from_dict",
    "config_to_dict",
    "load_toml",
]


@dataclass(frozen=True)
class PatternConfig:
    """How replicas communicate. Each pattern validates the fields it uses (see ``Pattern.validate``)."""

    name: str = "allreduce"
    # parameter server
    schedule: str = "sync"  # sync | async | ssp
    staleness: int | None = None  # SSP bound s
    servers: int = 1
    straggler: str | None = None  # "rank=1,prob=0.1,slowdown=6"
    worker_timeout: float = 30.0
    checkpoint_every: int = 0
    # ring all-reduce: segment size of one message
    segment_kb: int = 1024
    # decentralized
    topology: str = "ring"  # ring | exponential | random-pairs
    local_steps: int = 4
    merge: str = "average"  # average | elastic
    alpha: float = 0.5
    peer_timeout: float = 10.0
    # model parallel
    stages: int = 0  # 0: one stage per rank
    microbatches: int = 4
    pipeline_schedule: str = "gpipe"  # gpipe | 1f1b
    split_points: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    name: str = "mlp"
    hidden: int = 64
    depth: int = 2  # hidden layers of an mlp

    def __post_init__(self) -> None:
        _positive(self, "hidden", "depth")
        # configs also arrive inside proofs and views: bound what they can make us allocate
        if self.hidden > 1 << 16 or self.depth > 256:
            raise ConfigError(f"model too large: hidden {self.hidden} (max 65536), depth {self.depth} (max 256)")


@dataclass(frozen=True)
class CryptoConfig:
    """Homomorphic encryption of what workers send (CKKS through OpenFHE)."""

    encrypt: str = "none"  # none | ckks
    keys: str = "shared"  # shared | threshold
    ring_dim: int = 0  # 0: the smallest secure ring dimension for the depth
    scale_bits: int = 0  # 0: 40 (shared) or 50 (threshold, flooding noise)
    security: str = "128"  # 128 | 192 | 256 | none (insecure: tests and experiments only)

    def __post_init__(self) -> None:
        _one_of(self, "encrypt", ("none", "ckks"))
        _one_of(self, "keys", ("shared", "threshold"))
        _one_of(self, "security", ("128", "192", "256", "none"))


@dataclass(frozen=True)
class ProofConfig:
    """Proof-of-Learning: ``record`` writes a proof; ``audit`` / ``blind`` verify workers during training."""

    mode: str = "none"  # none | record | audit | blind
    k: int = 10  # steps between checkpoints
    audit_rate: float = 1.0
    # calibrated (a multiple of measured honest replay noise; exact where replay is bit-exact), cross-thread, or a
    # number (an explicit relative-l2 threshold); see trustgrad/audit/calibration.py
    audit_threshold: str = "calibrated"

    def __post_init__(self) -> None:
        from .audit.calibration import parse_policy

        _one_of(self, "mode", ("none", "record", "audit", "blind"))
        parse_policy(self.audit_threshold)
        _positive(self, "k")
        if not 0.0 < self.audit_rate <= 1.0:
            raise ConfigError(f"audit_rate must be in (0, 1], got {self.audit_rate}")


@dataclass(frozen=True)
class RunConfig:
    """One training job. Defaults train the embedded default (digits, mlp) with 4 workers."""

    pattern: PatternConfig = field(default_factory=PatternConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    crypto: CryptoConfig = field(default_factory=CryptoConfig)
    proof: ProofConfig = field(default_factory=ProofConfig)
    workers: int = 4
    dataset: str = "digits"
    data_dir: str | None = None
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    threads: int = 1
    server_threads: int | None = None  # server and auditor ranks; None: ``threads``
    device: str = "cpu"  # cpu (gloo) | cuda (nccl)
    timeout: float = 120.0  # seconds for any one collective / point-to-point operation
    malicious: tuple[str, ...] = ()
    record_server_view: bool = False
    out: str | None = None
    resume: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        _positive(self, "epochs", "batch_size", "threads")
        if self.server_threads is not None and self.server_threads < 1:
            raise ConfigError(f"server_threads must be >= 1, got {self.server_threads}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 < self.timeout < math.inf:
            raise ConfigError(f"timeout must be a finite number of seconds > 0, got {self.timeout}")
        if self.proof.mode == "record" and not self.out:
            raise ConfigError("--proof record writes OUT/proof: pass --out DIR")
        if self.record_server_view and not self.out:
            raise ConfigError("--record-server-view writes under the run's folder: give --out DIR")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device must be 'cpu' or 'cuda', got {self.device!r}")

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with top-level fields or nested ones (``pattern={"name": "ring"}``) changed."""
        merged = config_to_dict(self)
        for key, value in changes.items():
            if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        return config_from_dict(merged)


def _one_of(obj: object, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")


# --------------------------------------------------------------------------------------------------------------------
# dict / TOML <-> dataclasses, with type checks at the boundary


def config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Build a validated ``RunConfig``; unknown keys and wrong types raise ``ConfigError`` naming the key."""
    return _build(RunConfig, data, prefix="")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The plain-JSON form of a config (tuples become lists), as stored in run records and proofs."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = config_to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file (flat keys for ``RunConfig``; tables ``[pattern]``, ``[model]``, ``[crypto]``, ...)."""
    try:
        import tomllib  # type: ignore[import-not-found]
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"config key {prefix.rstrip('.') or 'root'!r} must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r} (known: {', '.join(sorted(known))})")
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - dataclass signature mismatch is a bug, report plainly
        raise ConfigError(f"invalid config for {cls.__name__}: {exc}") from None


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {type(value).__name__}")
        return tuple(_coerce(args[0], v, key) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"config key {key!r} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value
