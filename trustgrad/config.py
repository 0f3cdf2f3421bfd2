"""Run configuration: one frozen dataclass per concern, validated, buildable from flags or a TOML file.

Layers (docs/architecture.md §2): the library takes these dataclasses; TOML files and CLI overrides are merged into a
plain dict at the CLI layer and turned into a ``RunConfig`` by :func:`config_from_dict`, which rejects unknown keys and
wrong types with a :class:`~trustgrad.errors.ConfigError` naming the key.

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

from .attacks.specs import colluding_specs
from .errors import ConfigError
from .thresholds import parse_policy

__all__ = [
    "RunConfig",
    "PatternConfig",
    "ModelConfig",
    "CryptoConfig",
    "ProofConfig",
    "config_from_dict",
    "config_to_dict",
    "model_config_from_dict",
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
    min_replicas: int = 0  # gossip, encrypted ring: fewer replicas at the end fail the run; 0: a majority
    # model parallel
    stages: int = 0  # 0: one stage per rank
    microbatches: int = 4
    pipeline_schedule: str = "gpipe"  # gpipe | 1f1b
    split_points: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _in_ranges(self, _PATTERN_RANGES)
        if len(self.split_points) > MAX_SPLIT_POINTS or not all(1 <= p <= MAX_LAYERS for p in self.split_points):
            raise ConfigError(
                f"split_points must be at most {MAX_SPLIT_POINTS} layer indices in [1, {MAX_LAYERS}], "
                f"got {_short(self.split_points)}"
            )
        if self.straggler is not None:
            _spec_numbers("--straggler", self.straggler, _STRAGGLER_RANGES)
        if self.min_replicas < 0:
            raise ConfigError(f"min_replicas must be >= 0 (0: a majority of the workers), got {self.min_replicas}")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "mlp"  # a zoo name, or a user's factory "package.module:name" (trustgrad.factories)
    hidden: int = 64
    depth: int = 2  # hidden layers of an mlp
    loss: str = ""  # "": the model's own loss (cross-entropy unless the zoo names another); a name or a factory

    def __post_init__(self) -> None:
        _positive(self, "hidden", "depth")
        _factory_syntax(self, "name", "loss")
        # configs also arrive inside proofs and views: bound what they can make us allocate (the memory budget at
        # launch, trustgrad.resources, is the finer check: a width allowed here may still not fit the machine)
        if self.hidden > 1 << 16 or self.depth > 256:
            raise ConfigError(f"model too large: hidden {self.hidden} (max 65536), depth {self.depth} (max 256)")
        _text(self, "name")


@dataclass(frozen=True)
class CryptoConfig:
    """Homomorphic encryption of what workers send (CKKS through OpenFHE)."""

    encrypt: str = "none"  # none | ckks
    keys: str = "shared"  # shared | threshold
    ring_dim: int = 0  # 0: the smallest secure ring dimension for the depth
    scale_bits: int = 0  # 0: 40 (shared) or 50 (threshold, flooding noise)
    security: str = "128"  # 128 | 192 | 256 | none (insecure: tests and experiments only)
    # the encrypted ring: gather (every member sums every member's ciphertext itself) or reduce-scatter (cheaper,
    # private only against honest-but-curious members; docs/wire.md, "The encrypted ring's protocols")
    ring_ciphertexts: str = "gather"

    def __post_init__(self) -> None:
        _one_of(self, "encrypt", ("none", "ckks"))
        _one_of(self, "keys", ("shared", "threshold"))
        _one_of(self, "ring_ciphertexts", ("gather", "reduce-scatter"))
        _one_of(self, "security", ("128", "192", "256", "none"))
        _in_ranges(self, _CRYPTO_RANGES)
        if self.ring_dim and self.ring_dim & (self.ring_dim - 1):
            raise ConfigError(f"ring_dim must be 0 (automatic) or a power of two, got {self.ring_dim}")


@dataclass(frozen=True)
class ProofConfig:
    """Proof-of-Learning: ``record`` writes a proof; ``audit`` / ``blind`` verify workers during training."""

    mode: str = "none"  # none | record | audit | blind
    k: int = 10  # steps between checkpoints
    audit_rate: float = 1.0
    # calibrated (a multiple of measured honest replay noise; exact where replay is bit-exact), cross-thread, or a
    # number (an explicit relative-l2 threshold); see trustgrad/audit/calibration.py
    audit_threshold: str = "calibrated"
    # what becomes of an excluded worker's shard: drop (its data leaves the run) or auditor (the data owners'
    # verifier, which holds that data, computes the shard's honest gradient in its place; docs/audits.md)
    excluded_shard: str = "drop"

    def __post_init__(self) -> None:
        _one_of(self, "mode", ("none", "record", "audit", "blind"))
        _one_of(self, "excluded_shard", ("drop", "auditor"))
        if self.excluded_shard != "drop" and self.mode != "audit":
            raise ConfigError("--excluded-shard auditor needs --proof audit (the auditor holds the shard's data)")
        _in_ranges(self, _PROOF_RANGES)
        parse_policy(self.audit_threshold)


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
    augment: str = "none"  # none | crop-flip | flip: seeded per (seed, worker, step, sample) (trustgrad.augment)
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.9  # SGD's (Adam's first moment is betas[0])
    weight_decay: float = 0.0
    optimizer: str = "sgd"  # sgd | adam: what every replica, the server, audits, repairs and proofs step with
    betas: tuple[float, ...] = (0.9, 0.999)  # adam
    eps: float = 1e-8  # adam
    seed: int = 0
    threads: int = 1
    server_threads: int | None = None  # server and auditor ranks; None: ``threads``
    device: str = "cpu"  # cpu (gloo) | cuda (nccl)
    timeout: float = 120.0  # seconds for any one collective / point-to-point operation
    malicious: tuple[str, ...] = ()
    # Byzantine robustness (docs/robustness.md): the ps sync round's rule, and how training data is split
    aggregate: str = "mean"  # NAME[,key=value...]: mean | krum | multi-krum | median | trimmed-mean | bulyan | ...
    partition: str = "iid"  # iid | dirichlet (label skew)
    partition_alpha: float = 0.5  # Dirichlet concentration: small = each worker sees few classes
    record_server_view: bool = False
    out: str | None = None
    tensorboard: str | None = None  # a folder for TensorBoard event files (the coordinator writes them)
    resume: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        _in_ranges(self, _RUN_RANGES)
        if self.proof.mode == "record" and not self.out:
            raise ConfigError("--proof record writes OUT/proof: pass --out DIR")
        if self.record_server_view and not self.out:
            raise ConfigError("--record-server-view writes under the run's folder: give --out DIR")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device must be 'cpu' or 'cuda', got {_short(self.device)}")
        for name in ("dataset", "data_dir", "out", "resume", "tensorboard"):
            _text(self, name, path=name != "dataset")
        _factory_syntax(self, "dataset")
        self._check_optimizer()
        if len(self.malicious) > MAX_MALICIOUS:
            raise ConfigError(f"at most {MAX_MALICIOUS} --malicious specs, got {len(self.malicious)}")
        for spec in self.malicious:
            _spec_numbers("--malicious", spec, _MALICIOUS_RANGES)
        self._check_straggler_fits_timeout()
        self._check_robustness()
        self._check_ring_ciphertexts()
        _one_of(self, "augment", ("none", "crop-flip", "flip"))
        if self.augment != "none" and self.proof.mode == "blind":
            raise ConfigError(
                f"--augment {self.augment} with --proof blind: workers encrypt their samples once, before training, "
                "so the server's checks cannot follow per-step crops and flips; use --proof audit"
            )

    def _check_straggler_fits_timeout(self) -> None:
        """A straggling step must end inside one collective's deadline, or the job fails instead of straggling."""
        if self.pattern.straggler is None:
            return
        numbers = _spec_numbers("--straggler", self.pattern.straggler, _STRAGGLER_RANGES)
        longest = numbers.get("step-ms", 0.0) / 1000.0 * numbers.get("slowdown", 2.0)
        if longest >= self.timeout:
            raise ConfigError(
                f"--straggler {_short(self.pattern.straggler)}: a straggling step lasts {longest:g} s, not less than "
                f"--timeout {self.timeout:g} s; lower step-ms or slowdown, or raise --timeout"
            )

    def _check_ring_ciphertexts(self) -> None:
        """The opt-in weakens a guarantee: refused where it would not apply, so nobody believes it did something."""
        threshold = self.crypto.encrypt == "ckks" and self.crypto.keys == "threshold"
        if self.crypto.ring_ciphertexts != "gather" and (self.pattern.name != "ring" or not threshold):
            raise ConfigError(
                "--ring-ciphertexts reduce-scatter needs --pattern ring --encrypt ckks --keys threshold (it is how "
                "the encrypted ring sums ciphertexts)"
            )

    def _check_optimizer(self) -> None:
        _one_of(self, "optimizer", OPTIMIZER_NAMES)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {_short(self.betas)}")
        if not 0.0 < self.eps <= 1.0:
            raise ConfigError(f"eps must be in (0, 1], got {_short(self.eps)}")
        # DANA (ps async/ssp) keeps SGD momentum buffers per worker, and blind checks verify a plain SGD step
        sgd_only = self.pattern.name == "ps" and (self.pattern.schedule != "sync" or self.proof.mode == "blind")
        # audited ps: the auditor fuses each mean once and rounds its noise away (protect/codecs/audited.py)
        one_fusion = self.pattern.name == "ps" and self.proof.mode == "audit"
        threshold = self.crypto.encrypt != "none" and self.crypto.keys == "threshold"
        if self.optimizer != "sgd" and threshold and not one_fusion:
            raise ConfigError(
                f"--optimizer {self.optimizer} with --encrypt ckks --keys threshold needs --pattern ps --proof audit "
                "(or --keys shared): threshold decryptions carry flooding noise (~2e-4) that Adam turns into full "
                "steps where gradients are near zero, and each ps worker fuses its own copy, so replicas drift; "
                "under audit the auditor fuses each mean once and rounds the noise away on its grid"
            )
        if self.optimizer != "sgd" and sgd_only:
            raise ConfigError(
                f"--optimizer {self.optimizer} needs --pattern ps --schedule sync without --proof blind (async/ssp "
                "servers step DANA's per-worker SGD momentum; blind checks verify a plain SGD step)"
            )

    def _check_robustness(self) -> None:
        _one_of(self, "partition", ("iid", "dirichlet"))
        # below 0.01 numpy's Dirichlet draws underflow to all-zero rows; above 1000 it is IID in all but name
        if not 0.01 <= self.partition_alpha <= 1000:
            raise ConfigError(f"partition_alpha must be in [0.01, 1000], got {self.partition_alpha}")
        if self.partition != "iid" and (self.proof.mode in ("record", "blind") or self.record_server_view):
            raise ConfigError(
                f"--partition {self.partition} works with --proof none or audit and without --record-server-view: "
                "proofs, blind checks and recorded views name batches of the IID shards"
            )
        if self.malicious:
            colluding = colluding_specs(self.malicious)
            if colluding and (self.pattern.name != "ps" or self.pattern.schedule != "sync" or self.resume):
                raise ConfigError(
                    f"--malicious attack={colluding[0].attack} colludes in the rounds of --pattern ps --schedule sync "
                    "(without --resume): it recomputes the round's honest gradients"
                )
        if self.aggregate != "mean":
            from .robust import parse_aggregate

            parse_aggregate(self.aggregate)  # a one-line ConfigError naming what is wrong
            if self.pattern.name != "ps" or self.crypto.encrypt != "none":
                raise ConfigError(
                    "--aggregate is a parameter-server rule: it needs --pattern ps and plaintext updates (a robust "
                    "rule compares updates, which --encrypt ckks hides from the server)"
                )

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
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {_short(value)}")


# --------------------------------------------------------------------------------------------------------------------
# Ranges: every number a job is given, checked where it is given (docs/limits.md lists them). Each bound says why it
# is where it is; values outside them were seen to pass a looser check and then fail inside a rank (issue 14).

#: (low, high, low_inclusive, high_inclusive, unit) per field.
Range = tuple[float, float, bool, bool, str]

DAY = 86400.0  # seconds: a longer deadline is a hang by another name
MAX_COUNT = 1 << 31  # steps, epochs, versions: int32 is what torch and gloo count in
MAX_SPLIT_POINTS = 1024
MAX_LAYERS = 1 << 16
MAX_MALICIOUS = 1024
MAX_TEXT = 4096  # PATH_MAX on Linux
#: optimizers a run can use; optim.py registers how each is built and replayed
OPTIMIZER_NAMES = ("sgd", "adam")

_RUN_RANGES: dict[str, Range] = {
    # the process cap per machine is enforced at launch (trustgrad.resources); this is the absolute ceiling
    "workers": (1, 4096, True, True, ""),
    "epochs": (1, 1_000_000, True, True, ""),
    "max_steps": (1, MAX_COUNT, True, True, ""),
    "batch_size": (1, 1 << 24, True, True, ""),
    # float32 overflows at 3.4e38 (lr 1e308 was an exit 1 inside a rank); no SGD step is useful beyond 1e3
    "lr": (0.0, 1e3, False, True, ""),
    "momentum": (0.0, 1.0, True, False, ""),
    "weight_decay": (0.0, 1e3, True, True, ""),
    "seed": (0, (1 << 63) - 1, True, True, ""),  # torch.manual_seed and the PRF key take 64-bit seeds
    # torch.set_num_threads takes a C int; no machine here has more than 1024 cores
    "threads": (1, 1024, True, True, ""),
    "server_threads": (1, 1024, True, True, ""),
    # below 5 s the job's own set-up (every rank's rendezvous on a loaded 2-core machine) can miss the deadline
    "timeout": (5.0, DAY, True, True, " seconds"),
}
_PATTERN_RANGES: dict[str, Range] = {
    "staleness": (0, MAX_COUNT, True, True, ""),
    "servers": (0, 64, True, True, ""),  # ps explains why it needs exactly 1
    "min_replicas": (0, 4096, True, True, ""),  # 0: a majority of the workers
    # below a second a busy machine makes every peer look dead: ps async with 1e-9 dropped both workers and
    # "finished" with none (exit 0)
    "worker_timeout": (1.0, DAY, True, True, " seconds"),
    "checkpoint_every": (0, MAX_COUNT, True, True, ""),
    "segment_kb": (1, 1 << 20, True, True, " KiB"),  # 1 GiB: a segment larger than any model we can hold
    "local_steps": (1, MAX_COUNT, True, True, ""),
    "alpha": (0.0, 1.0, False, False, ""),
    "peer_timeout": (1.0, DAY, True, True, " seconds"),
    "stages": (0, MAX_LAYERS, True, True, ""),
    "microbatches": (1, 1 << 16, True, True, ""),
}
_CRYPTO_RANGES: dict[str, Range] = {
    "ring_dim": (0, 1 << 17, True, True, ""),  # OpenFHE's largest CKKS ring dimension
    "scale_bits": (0, 60, True, True, " bits"),  # 0: automatic; OpenFHE's native word is 64 bits
}
_PROOF_RANGES: dict[str, Range] = {
    "k": (1, MAX_COUNT, True, True, " steps"),
    "audit_rate": (0.0, 1.0, False, True, ""),
}
#: numeric fields of ``--straggler``: a straggling step must not outlast any sane deadline (slowdown 1e300 and
#: step-ms inf overflowed time.sleep inside a rank)
_STRAGGLER_RANGES: dict[str, Range] = {
    "prob": (0.0, 1.0, True, True, ""),
    "slowdown": (1.0, 1000.0, True, True, "x"),
    "step-ms": (0.0, 60_000.0, True, True, " ms"),
}
_MALICIOUS_RANGES: dict[str, Range] = {
    "rank": (0, 4096, True, True, ""),
    "from-step": (0, MAX_COUNT, True, True, ""),
    "strength": (-1e6, 1e6, True, True, ""),  # a finite poison: inf/nan are no attack a peer could not also send
}


def _in_ranges(obj: object, ranges: Mapping[str, Range]) -> None:
    for name, bounds in ranges.items():
        value = getattr(obj, name)
        if value is not None:
            _in_range(name, value, bounds)


#: names in messages where a flag reads better than the key (and other modules' messages already use it)
_LABELS = {"staleness": "--staleness", "local_steps": "local_steps (H)"}
_SAY_POSITIVE = {"worker_timeout", "peer_timeout"}


def _in_range(name: str, value: float, bounds: Range) -> None:
    low, high, low_in, high_in, unit = bounds
    above = value >= low if low_in else value > low  # NaN fails every comparison
    below = value <= high if high_in else value < high
    if above and below:
        return
    label = _LABELS.get(name, name)
    low, high = (f"{b:g}" if isinstance(b, float) else str(b) for b in (low, high))
    if name in _SAY_POSITIVE:  # they were "> 0" before they had a minimum; messages keep saying so
        span = f"> 0: at least {low} and at most {high}"
    elif bounds[1] <= 1:  # probabilities and rates read best as an interval
        span = f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"
    else:
        span = f"{'>=' if low_in else '>'} {low} and {'<=' if high_in else '<'} {high}"
    kind = "an integer" if isinstance(value, int) else "a finite number"
    raise ConfigError(f"{label} must be {span}{unit} ({kind}), got {_short(value)}")


def _spec_numbers(flag: str, spec: str, ranges: Mapping[str, Range]) -> dict[str, float]:
    """The numeric ``key=value`` fields of a spec string, range-checked (its owner parses the rest)."""
    if len(spec) > MAX_TEXT:
        raise ConfigError(f"{flag} spec is {len(spec)} characters long (max {MAX_TEXT})")
    numbers: dict[str, float] = {}
    for part in spec.split(","):
        key, _, value = (t.strip() for t in part.partition("="))
        if key not in ranges or value == "all":
            continue
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{flag} {_short(spec)}: {key} must be a number, got {_short(value)}") from None
        _in_range(f"{flag} {key}", number, ranges[key])
        numbers[key] = number
    return numbers


def _text(obj: object, name: str, path: bool = False) -> None:
    """Strings reach the file system and C libraries: bounded, and no NUL byte (``ValueError`` deep in ``os``)."""
    value = getattr(obj, name)
    if value is None:
        return
    if len(value) > MAX_TEXT or "\x00" in value or (path and not value):
        raise ConfigError(f"{name} must be a non-empty string of at most {MAX_TEXT} characters without NUL bytes")


def _short(value: Any, limit: int = 60) -> str:
    """A value for a one-line message: repr, cut to ``limit`` characters (an untrusted value may be megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _factory_syntax(obj: object, *names: str) -> None:
    """A user's ``module:name`` string is checked for syntax where it is given; nothing is imported here."""
    from .factories import check, is_factory

    for name in names:
        value = getattr(obj, name)
        if is_factory(value):
            check(value)


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {_short(value)}")


# --------------------------------------------------------------------------------------------------------------------
# dict / TOML <-> dataclasses, with type checks at the boundary


def config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Build a validated ``RunConfig``; unknown keys and wrong types raise ``ConfigError`` naming the key."""
    return _build(RunConfig, data, prefix="")


def model_config_from_dict(data: Mapping[str, Any]) -> ModelConfig:
    """A validated ``ModelConfig`` (proofs and server views carry one): unknown keys and wrong types refused."""
    return _build(ModelConfig, data, prefix="model.")


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


#: a config file is a few hundred bytes; a larger one is not a config (and the parser would hold all of it)
MAX_TOML_BYTES = 1 << 20


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file (flat keys for ``RunConfig``; tables ``[pattern]``, ``[model]``, ``[crypto]``, ...).

    Any failure to read or parse it is a one-line ``ConfigError``: tomli raises ``RecursionError`` (not
    ``TOMLDecodeError``) past ~400 nested levels, and a file may be large or not text at all.
    """
    try:
        import tomllib  # type: ignore[import-not-found]
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = Path(path)
    where = _short(str(path))
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_TOML_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file {where} does not exist") from None
    except (OSError, ValueError) as exc:  # a folder, no permission, a NUL in the name
        raise ConfigError(f"config file {where} cannot be read: {_one_line(exc)}") from None
    if len(raw) > MAX_TOML_BYTES:
        raise ConfigError(f"config file {where} is larger than {MAX_TOML_BYTES >> 10} KiB: not a trustgrad config")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {where} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {where} is not valid TOML: {_one_line(exc)}") from None
    except RecursionError:
        raise ConfigError(f"config file {where} is not valid TOML: nested too deeply") from None
    except (ValueError, OverflowError, MemoryError) as exc:  # parser corner cases: still the file's fault
        raise ConfigError(f"config file {where} is not valid TOML: {_one_line(exc)}") from None


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"config key {prefix.rstrip('.') or 'root'!r} must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key {_short(prefix + str(unknown[0]))} (known: {', '.join(sorted(known))})")
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
        return float(value) if abs(value) < 1 << 1000 else math.inf  # float() of a huge int raises OverflowError
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"config key {key!r} must be {hint.__name__}, got {type(value).__name__} {_short(value)}")
    return value
