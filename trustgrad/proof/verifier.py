"""The verifier: checks a proof folder and returns a typed :class:`Verdict` (it never prints, and never raises on a
proof's content).

Hardened protocol (Jia et al. 2021, Alg. 2, with the root-cause defences against Zhang et al. S&P 2022 and Fang et al.
EuroS&P 2023, and bounded against adaptive forgers); each check adds its own reason when it fails:

1. ``manifest``: schema, types, ranges and internal consistency (config, seed, k, checkpoint steps, hyper-parameters).
2. ``commitment``: the committed file list is the manifest's; every file's *size* is what the declared model, batch
   size and step count imply (stat only); then the memory budget (``budget.py``); then every digest and the Merkle
   root recompute. Nothing the manifest declares is built or allocated before this point, except on the meta device.
3. ``identity``: the committed seed (and root) are the ones the verifier expects for this prover, if it was told.
4. ``data`` / ``indices``: the verifier's training set has the committed Merkle root; every worker's batch of every
   step is in range and is the PRF's (so also a member of the committed set and of that worker's shard).
5. ``checkpoints``: each holds exactly the model's tensors (and momentum buffers) with the right shapes and dtypes,
   finite, and a valid generator state; ``w0``: checkpoint 0 equals ``build_model(seed)`` bit for bit.
6. ``hyperparameters``: the declared optimizer, loss and schedule are what the config and the model imply; replay
   uses them (:meth:`Hyper.from_manifest`).
7. ``update-bound``: every segment's parameter update is at least ``min_update_ratio`` times one plain SGD step at its
   start (one gradient per segment, over all segments).
8. ``replay``: the top-Q largest updates of every epoch (Jia et al.) and R further segments drawn from
   ``H(root || nonce)``, each *with the segment before it*, are re-executed; distances over weights and momentum must
   be within the calibrated thresholds. R is chosen for a stated soundness (``soundness.py``): a proof with at least a
   fraction f of wrong segments is accepted with probability at most ``max_forgery_acceptance``.

Input that is not a proof at all (no folder, no readable JSON manifest), or a proof too large for the memory budget,
raises :class:`ProofError` (exit 2); everything else is a verdict (exit 0 or 1).

``naive.verify_naive`` is the reference design's verifier (a per-tensor KS test on W0 plus top-Q replay at the
reference thresholds), kept as a baseline: the Fang and Zhang spoofs pass it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import secrets
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..augment import Augment
from ..config import RunConfig, config_from_dict
from ..data import BatchPlan, Dataset, load_dataset
from ..errors import ConfigError, ProofError, TrustgradError
from ..models import build_model
from .budget import MetaShapes, check_budget, estimate, machine_budget, meta_shapes
from .claims import claims_of
from .commit import challenge_seed, dataset_root, digest, leaf, merkle_root
from .format import (
    _HEADER_SLACK,
    COMMITMENT,
    INDICES,
    MANIFEST,
    SCHEMA,
    checkpoint_name,
    parse_safetensors,
    proof_files,
    read_bounded,
    read_json,
)
from .replay import (
    COUNT_PREFIXES,
    UPDATE_RATIO_SHARE,
    Distances,
    Hyper,
    Thresholds,
    distances,
    gradient_step_norm,
    loss_name,
    optimizer_state_spec,
    replay_segment,
    update_norm,
)
from .soundness import Soundness, miss_probability, plan, random_draws, wrong_at_least

__all__ = ["Verdict", "SegmentCheck", "VerifyOptions", "verify", "trust_named_factories"]

log = logging.getLogger(__name__)

_MAX_STEPS = 10_000_000
_MAX_CHECKPOINTS = 100_000
_MAX_SEED = 1 << 127  # seeding.derive_seed keys BLAKE2b with the seed as 16 signed bytes
_RNG_SPEC = {"rng/torch": (tuple(torch.get_rng_state().shape), torch.uint8)}
_RNG_BYTES = int(torch.get_rng_state().numel())
_HASH_CHUNK = 1 << 22
_MANIFEST_KEYS = frozenset(
    [
        "schema",
        "seed",
        "k",
        "config",
        "pattern",
        "semantics",
        "workers",
        "steps",
        "steps_per_epoch",
        "model",
        "training",
        "data",
        "randomness",
        "environment",
        "checkpoints",
    ]
)


@dataclass(frozen=True)
class VerifyOptions:
    q: int = 1  #: top-Q largest updates re-executed per epoch (Jia et al.; not counted in the soundness bound)
    #: random segments re-executed besides; None: the fewest giving ``max_forgery_acceptance`` at ``forged_fraction``
    r: int | None = None
    max_forgery_acceptance: float = 0.01  #: delta: acceptance probability allowed for a proof with >= f wrong segments
    forged_fraction: float = 0.1  #: f: the fraction of wrong segments the guarantee is stated for
    check_all: bool = False  #: re-execute every segment (acceptance of any wrong segment: 0)
    nonce: str | None = None  #: None: a fresh random nonce (reported in the verdict, reproducible with --nonce)
    threads: int | None = None  #: torch threads for replay (None: leave as is)
    expected_seed: int | None = None  #: the seed this prover committed to / was assigned (binds the proof to it)
    expected_root: str | None = None  #: the commitment root the prover published at training time
    data_dir: str | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    memory_budget: int | None = None  #: bytes; None: half of the memory available to this process (budget.py)
    #: user code the verifying user trusts, by kind: a proof that names a model, loss or dataset factory is verified
    #: only if the same ``module:name`` is given here (``trustgrad verify --model``); a proof never chooses an import
    model_factory: str | None = None
    loss_factory: str | None = None
    dataset_factory: str | None = None

    def __post_init__(self) -> None:
        from ..factories import check

        for name in (self.model_factory, self.loss_factory, self.dataset_factory):
            if name is not None:
                check(name)
        if self.q < 0 or (self.r is not None and self.r < 0):
            raise ConfigError("q and r must be >= 0")
        if not 0.0 < self.max_forgery_acceptance <= 1.0:
            raise ConfigError(f"max_forgery_acceptance must be in (0, 1], got {self.max_forgery_acceptance}")
        if not 0.0 < self.forged_fraction <= 1.0:
            raise ConfigError(f"forged_fraction must be in (0, 1], got {self.forged_fraction}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads must be >= 1")
        if self.memory_budget is not None and self.memory_budget < 1:
            raise ConfigError("memory_budget must be a positive number of bytes")


@dataclass(frozen=True)
class SegmentCheck:
    start: int
    end: int
    epoch: int
    chosen_by: str  # "top-q" | "random" | "predecessor" | "all"
    passed: bool
    distances: Distances | None
    violations: tuple[str, ...] = ()


@dataclass
class Verdict:
    """The outcome: ``valid`` iff no check failed; ``reasons`` are ``"<check>: <detail>"`` lines.

    ``soundness`` states what the replay guarantees (and costs), ``claims`` which manifest fields were checked and
    which were taken on trust.
    """

    valid: bool
    reasons: list[str]
    mode: str = "hardened"
    segments: list[SegmentCheck] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    root: str | None = None
    nonce: str | None = None
    steps: int = 0
    replayed_steps: int = 0
    bound_steps: int = 0
    seconds: float = 0.0
    soundness: dict[str, Any] = field(default_factory=dict)
    claims: dict[str, dict[str, str]] = field(default_factory=dict)
    min_update_ratio: float | None = None  #: smallest segment update / one SGD step at its start (calibration)

    def failed(self, check: str) -> bool:
        return any(r.startswith(check + ":") for r in self.reasons)

    @property
    def reexecuted_fraction(self) -> float:
        """Steps re-executed (replayed segments, plus one gradient per segment for the bound) per training step."""
        return (self.replayed_steps + self.bound_steps) / self.steps if self.steps else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["reexecuted_fraction"] = self.reexecuted_fraction
        return out


class _Invalid(Exception):
    """A failed check after which nothing further can be trusted."""


class _Audit:
    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.checks: dict[str, bool] = {}

    def ok(self, check: str) -> None:
        self.checks.setdefault(check, True)

    def fail(self, check: str, detail: str) -> None:
        self.checks[check] = False
        self.reasons.append(f"{check}: {_one_line(detail)}")

    def stop(self, check: str, detail: str) -> None:
        self.fail(check, detail)
        raise _Invalid


@dataclass
class _Proof:
    """A proof as the checks see it: parsed manifest and config, committed sizes and digests, lazily read states."""

    root_dir: Path
    manifest: dict[str, Any]
    cfg: RunConfig
    hyper: Hyper
    steps: int
    k: int
    steps_per_epoch: int
    workers: int
    checkpoints: list[int]
    dataset: Dataset
    shapes: MetaShapes
    data_dir: str | None = None
    sizes: dict[str, int] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)  # empty: not committed (naive verifier)
    root: str | None = None
    model: torch.nn.Module | None = None
    indices: np.ndarray | None = None
    store: _States | None = None
    norms: list[float] = field(default_factory=list)  # parameter update of every segment

    @property
    def segments(self) -> list[tuple[int, int]]:
        return list(zip(self.checkpoints, self.checkpoints[1:]))

    def epoch(self, seg: int) -> int:
        return self.checkpoints[seg] // self.steps_per_epoch

    def spec(self, step: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if step == 0:  # a fresh optimizer holds no state
            return dict(self.shapes.spec)
        params = {k.removeprefix("momentum/"): v for k, v in self.shapes.momentum.items()}
        return {**self.shapes.spec, **optimizer_state_spec(self.hyper, params)}


class _States:
    """Checkpoints read on demand (re-hashed against the commitment on every read) and kept while the budget allows."""

    def __init__(self, proof: _Proof, capacity: int):
        self.proof, self.capacity = proof, max(2, capacity)
        self._cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()

    def get(self, step: int) -> dict[str, torch.Tensor]:
        if step in self._cache:
            self._cache.move_to_end(step)
            return self._cache[step]
        p, name = self.proof, checkpoint_name(step)
        raw = read_bounded(p.root_dir / name, p.sizes[name], "checkpoints")
        if p.digests and digest(raw).hex() != p.digests[name]:
            raise ProofError(f"checkpoints: {name} changed after its commitment was checked")
        # the generator state is required: the format records it, and an absent one could not be checked
        state = parse_safetensors(raw, name, "checkpoints", {**p.spec(step), **_RNG_SPEC})
        _check_generator(state, name)
        self._cache[step] = state
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return state


# ====================================================================================================================
# public entry points


def verify(path: str | Path, options: VerifyOptions | None = None) -> Verdict:
    """Check the proof folder at ``path`` (hardened protocol, see the module docstring).

    Raises :class:`ProofError` only when the input is not a proof at all (no folder, no readable JSON manifest) or
    does not fit the memory budget; every other problem — tampering, truncation, wrong shapes, out-of-range values,
    failed replay — is an invalid verdict with its reason.
    """
    options = options or VerifyOptions()
    started, audit = time.perf_counter(), _Audit()
    manifest = _read_manifest(path)
    trust_named_factories(manifest, options)
    nonce = options.nonce if options.nonce is not None else secrets.token_hex(16)
    verdict = Verdict(False, audit.reasons, thresholds=options.thresholds.as_dict(), checks=audit.checks, nonce=nonce)
    verdict.claims = claims_of(manifest)
    with _threads(options.threads):
        try:
            proof = _open(Path(path), manifest, audit, options)
            verdict.root, verdict.steps = proof.root, proof.steps
            _check_identity(proof, audit, options)
            _check_data(proof, audit)
            _build_model(proof, audit)
            _check_w0(proof, audit)
            _check_hyperparameters(proof, audit)
            verdict.min_update_ratio = _check_checkpoints_and_bound(proof, audit, options.thresholds)
            verdict.bound_steps = len(proof.segments)
            verdict.segments, soundness = _check_replay(proof, audit, options, nonce)
            verdict.soundness = soundness.as_dict()
            verdict.replayed_steps = soundness.replayed_steps
        except _Invalid:
            pass
        except (RuntimeError, ValueError, ArithmeticError, IndexError, KeyError, TypeError) as exc:
            # fail closed: whatever the content did, it is not accepted; the reason names a verifier bug to report
            log.exception("unexpected error while verifying %s", path)
            audit.fail("verifier", f"unexpected {type(exc).__name__} while checking this proof ({exc}); not accepted")
    verdict.valid = not audit.reasons
    verdict.seconds = time.perf_counter() - started
    log.info("proof %s: %s (%d reasons)", path, "valid" if verdict.valid else "INVALID", len(audit.reasons))
    return verdict


# ====================================================================================================================
# 0: user code the proof names (before anything is built)

#: where a manifest names user code, and the flag its verifying user names it with
_FACTORY_FIELDS = (
    ("model", ("config", "model", "name"), "model_factory"),
    ("loss", ("config", "model", "loss"), "loss_factory"),
    ("loss", ("training", "loss"), "loss_factory"),
    ("dataset", ("config", "dataset"), "dataset_factory"),
)


def trust_named_factories(manifest: dict[str, Any], options: VerifyOptions) -> None:
    """The import rule: a factory the proof names is imported only if the verifying user named the same one.

    The proof is untrusted: importing a module it names would run code the prover chose. So each ``module:name`` in
    the manifest's config must equal the one in ``options`` (``--model``, ``--loss``, ``--dataset``), and a factory
    given for a proof that names none is refused too (the user expects to verify something else); either is a
    ``ProofError`` (exit 2), raised before anything is imported or built. Then the named ones are allowed.
    """
    from ..factories import allow, is_factory

    for kind, path, option in _FACTORY_FIELDS:
        declared: Any = manifest
        for key in path:
            declared = declared.get(key) if isinstance(declared, dict) else None
        given = getattr(options, option)
        if is_factory(declared) and declared != given:
            shown = _one_line(str(declared))[:120]
            raise ProofError(
                f"the proof's {kind} is user code {shown!r}: verify imports only code you name; if you trust it, "
                f"pass --{kind} {shown}" + (f" (you named {given!r})" if given else "")
            )
        if given is not None and not is_factory(declared):
            raise ProofError(f"--{kind} {given!r} was given, but the proof's {kind} is {str(declared)[:60]!r}")
    allow(options.model_factory, options.loss_factory, options.dataset_factory)


# ====================================================================================================================
# 1, 2: manifest, commitment, sizes, budget


def _read_manifest(path: str | Path) -> dict[str, Any]:
    root = Path(path)
    if not root.is_dir():
        raise ProofError(f"proof folder {str(root)!r} does not exist (expected OUT/proof of a --proof record run)")
    return read_json(root / MANIFEST, "manifest")


def _field(m: dict[str, Any], key: str, kind: type, audit: _Audit, lo: int | None = None, hi: int | None = None) -> Any:
    value = m.get(key)
    if (
        not isinstance(value, kind)
        or isinstance(value, bool)
        or (lo is not None and value < lo)
        or (hi is not None and value > hi)
    ):
        bounds = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
        audit.stop("manifest", f"field {key!r} must be {kind.__name__}{bounds}")
    return value


def _open(path: Path, m: dict[str, Any], audit: _Audit, options: VerifyOptions, commit: bool = True) -> _Proof:
    """Manifest, then commitment list, file sizes, budget and digests: nothing declared is built before they pass."""
    if m.get("schema") != SCHEMA:
        audit.stop("manifest", f"unknown schema {str(m.get('schema'))[:40]!r} (this verifier reads {SCHEMA})")
    unknown = sorted(str(k)[:40] for k in set(m) - _MANIFEST_KEYS)
    if unknown:  # a field this verifier does not know could be a claim a reader thinks was checked
        audit.stop("manifest", f"unknown fields {unknown[:3]} (schema {SCHEMA} has {len(_MANIFEST_KEYS)} fields)")
    seed = _field(m, "seed", int, audit, -_MAX_SEED, _MAX_SEED - 1)
    k = _field(m, "k", int, audit, 1, _MAX_STEPS)
    steps = _field(m, "steps", int, audit, 1, _MAX_STEPS)
    spe = _field(m, "steps_per_epoch", int, audit, 1, _MAX_STEPS)
    workers = _field(m, "workers", int, audit, 1, 1 << 20)
    checkpoints = m.get("checkpoints")
    if (
        not isinstance(checkpoints, list)
        or len(checkpoints) > _MAX_CHECKPOINTS
        or not all(type(c) is int for c in checkpoints)  # 2.0 == 2 would pass the comparison below
    ):
        audit.stop("manifest", f"no list of integer checkpoint steps, or more than {_MAX_CHECKPOINTS} of them")
    try:
        cfg = config_from_dict(_field(m, "config", dict, audit))
    except TrustgradError as exc:
        audit.stop("manifest", f"config is invalid ({exc})")
    except RecursionError:
        audit.stop("manifest", "config is nested too deeply")
    if cfg.seed != seed or cfg.proof.k != k or cfg.workers != workers:
        audit.stop("manifest", "seed, k or workers disagree with the manifest's own config")
    if m.get("semantics") != "sync-mean-gradient":
        audit.stop("manifest", f"pattern {cfg.pattern.name!r}: only synchronous gradient averaging can be replayed")
    if checkpoints != sorted({*range(0, steps, k), steps}):
        audit.stop("manifest", f"checkpoint steps must be every {k} steps from 0 to {steps} (and {steps})")
    try:
        hyper = Hyper.from_manifest(m.get("training"))
    except ProofError as exc:
        audit.stop("hyperparameters", str(exc).removeprefix("training: "))
    audit.ok("manifest")
    data_dir = options.data_dir or cfg.data_dir
    try:
        ds = _dataset(cfg.dataset, data_dir)
    except TrustgradError as exc:
        audit.stop("data", f"cannot load the training set {cfg.dataset!r} ({exc})")
    if workers * cfg.batch_size > len(ds.x_train):
        audit.stop("data", f"{workers} workers x batch {cfg.batch_size} exceed the {len(ds.x_train)} training samples")
    try:
        shapes = meta_shapes(cfg.model.name, ds.input_shape, ds.num_classes, cfg.model)
    except (TrustgradError, RuntimeError, ValueError) as exc:
        audit.stop("manifest", f"the declared model cannot be built ({_one_line(str(exc))})")
    proof = _Proof(path, m, cfg, hyper, steps, k, spe, workers, checkpoints, ds, shapes, data_dir)
    if commit:
        proof.digests, declared_root = _read_commitment(proof, audit)
    _check_sizes(proof, audit)
    _check_memory(proof, options)
    if commit:
        _check_digests(proof, audit, declared_root)
    return proof


def _read_commitment(proof: _Proof, audit: _Audit) -> tuple[dict[str, str], str]:
    try:
        c = read_json(proof.root_dir / COMMITMENT, "commitment")
    except ProofError as exc:
        audit.stop("commitment", str(exc).removeprefix("commitment: "))
    files, root = c.get("files"), c.get("root")
    names = proof_files(proof.checkpoints)
    if (
        not isinstance(files, list)
        or [f[0] if isinstance(f, list) and len(f) == 2 else None for f in files] != names
        or not all(isinstance(f[1], str) and len(f[1]) == 64 for f in files)
        or not isinstance(root, str)
    ):
        audit.stop("commitment", "the committed file list is not the manifest's (files added, removed or renamed)")
    return {name: d for name, d in files}, root


def _expected_bytes(proof: _Proof, name: str) -> tuple[int, int]:
    """(least, most) bytes the committed file ``name`` can have, given the declared model, batch size and steps."""
    if name == INDICES:
        data = proof.steps * proof.workers * proof.cfg.batch_size * 8
        return 8 + data, 8 + data + _HEADER_SLACK
    step = int(name.removeprefix("checkpoints/step_").removesuffix(".safetensors"))
    data = sum(math.prod(s) * _itemsize(d) for s, d in proof.spec(step).values())
    return 8 + data, 8 + data + _RNG_BYTES + _HEADER_SLACK


def _check_sizes(proof: _Proof, audit: _Audit) -> None:
    """Stat every file: its size must be what the manifest's declarations imply (nothing is read yet)."""
    for name in proof_files(proof.checkpoints)[1:]:
        try:
            st = (proof.root_dir / name).stat()
        except OSError:
            audit.stop("commitment", f"file {name!r} is missing")
        least, most = _expected_bytes(proof, name)
        if not least <= st.st_size <= most:
            audit.stop(
                "indices" if name == INDICES else "checkpoints",
                f"{name} has {st.st_size} bytes where the manifest's model, batch size and steps imply "
                f"{least}-{most} (truncated, padded, or declarations that do not match the files)",
            )
        proof.sizes[name] = st.st_size


def _check_memory(proof: _Proof, options: VerifyOptions) -> None:
    budget = options.memory_budget if options.memory_budget is not None else machine_budget()
    s = proof.shapes
    indices_bytes = proof.sizes[INDICES]
    base = estimate(s, proof.workers * proof.cfg.batch_size, indices_bytes, 2)
    what = (
        f"model {s.parameters} parameters, {s.state_bytes / 2**20:.3g} MiB per state, "
        f"batch {proof.workers}x{proof.cfg.batch_size}, indices {indices_bytes / 2**20:.3g} MiB"
    )
    check_budget(base, budget, what)
    spare = budget - base
    proof.store = _States(proof, min(len(proof.checkpoints), spare // max(1, 2 * s.state_bytes)))


def _check_digests(proof: _Proof, audit: _Audit, declared_root: str) -> None:
    leaves = []
    for name in proof_files(proof.checkpoints):
        try:
            file_digest = _hash_file(proof.root_dir / name, proof.sizes.get(name))
        except ProofError as exc:
            audit.stop("commitment", str(exc))
        if file_digest.hex() != proof.digests[name]:
            audit.stop("commitment", f"{name} does not match its committed digest (changed after commitment)")
        leaves.append(leaf(name, file_digest))
    root = merkle_root(leaves).hex()
    if root != declared_root:
        audit.stop("commitment", "the Merkle root does not recompute from the file digests")
    proof.root = root
    audit.ok("commitment")


def _hash_file(path: Path, size: int | None) -> bytes:
    """BLAKE2b-256 of a file, streamed; ``size``: the size stat saw (a file that changes meanwhile is refused)."""
    if size is None:  # the manifest, already read under its own bound; hash the same bytes the verifier parsed
        return digest(read_bounded(path, 8 << 20, "commitment"))
    h, seen = hashlib.blake2b(digest_size=32), 0
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(min(_HASH_CHUNK, size + 1 - seen)):
                seen += len(chunk)
                if seen > size:
                    break
                h.update(chunk)
    except OSError as exc:
        raise ProofError(f"cannot read {path.name!r} ({exc.strerror})") from None
    if seen != size:
        raise ProofError(f"{path.name!r} changed size while it was hashed")
    return h.digest()


# ====================================================================================================================
# 3-6: identity, data and indices, model, checkpoints, W0, hyperparameters


def _check_identity(proof: _Proof, audit: _Audit, options: VerifyOptions) -> None:
    if options.expected_seed is not None and proof.cfg.seed != options.expected_seed:
        audit.fail(
            "identity",
            f"the proof is bound to seed {proof.cfg.seed}, not to this prover's seed {options.expected_seed} "
            "(a proof copied from another run)",
        )
    if options.expected_root is not None and proof.root != options.expected_root:
        audit.fail("identity", "the commitment root is not the one the prover published when it trained")
    audit.ok("identity")


def _check_data(proof: _Proof, audit: _Audit) -> None:
    ds, cfg, m = proof.dataset, proof.cfg, proof.manifest
    declared = m.get("data", {}).get("merkle_root") if isinstance(m.get("data"), dict) else None
    if declared != _root_of(cfg.dataset, proof.data_dir):
        audit.fail("data", "the verifier's training set does not have the committed Merkle root")
    plan = BatchPlan(len(ds.x_train), proof.workers, cfg.seed, cfg.batch_size)
    spe, total = plan.steps_per_epoch, plan.total_steps(cfg.epochs, cfg.max_steps)
    if proof.steps_per_epoch != spe or proof.steps != total:
        audit.stop("data", f"the run has {total} steps of {spe} per epoch, the proof claims {proof.steps}")
    audit.ok("data")
    _load_indices(proof, audit)
    wrong = np.argwhere((proof.indices != plan.all_indices(proof.steps)).any(axis=2))
    if len(wrong):  # in range, so the later checks can still run and add their own reasons (w0 of a relabel)
        t, w = (int(v) for v in wrong[0])
        audit.fail("indices", f"worker {w}'s batch at step {t} is not the one the PRF of the seed gives")
    audit.ok("indices")


def _load_indices(proof: _Proof, audit: _Audit) -> None:
    try:
        raw = read_bounded(proof.root_dir / INDICES, proof.sizes[INDICES], "indices")
        if proof.digests and digest(raw).hex() != proof.digests[INDICES]:
            raise ProofError(f"{INDICES} changed after its commitment was checked")
        spec = {"indices": ((proof.steps, proof.workers, proof.cfg.batch_size), torch.int64)}
        indices = parse_safetensors(raw, INDICES, "indices", spec)["indices"].numpy()
    except ProofError as exc:
        audit.stop("indices", str(exc).removeprefix("indices: "))
    n = len(proof.dataset.x_train)
    outside = np.argwhere((indices < 0) | (indices >= n))
    if len(outside):  # stop here: nothing may index the training set with these
        t, w, i = (int(v) for v in outside[0])
        audit.stop("indices", f"worker {w}'s batch at step {t} holds {int(indices[t, w, i])}, outside 0..{n - 1}")
    proof.indices = indices


def _build_model(proof: _Proof, audit: _Audit) -> None:
    ds, cfg = proof.dataset, proof.cfg
    try:  # within the budget now: the declared sizes matched the committed files and the estimate fit
        proof.model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, cfg.seed, cfg.model)
    except TrustgradError as exc:
        audit.stop("manifest", f"the declared model cannot be built ({exc})")


def _check_w0(proof: _Proof, audit: _Audit) -> None:
    claimed = _state(proof, audit, 0)
    w0 = {f"model/{k}": v for k, v in proof.model.state_dict().items()}
    worst = max((float((claimed[k].double() - v.double()).abs().max()) for k, v in w0.items() if v.numel()), default=0)
    if worst != 0.0:
        audit.fail(
            "w0",
            f"checkpoint 0 is not the initialization seed {proof.cfg.seed} generates (max |diff| {worst:.3g}): "
            "initial weights are not the prover's to choose",
        )
    audit.ok("w0")


#: Adam's betas and eps as a config without Adam holds them (``RunConfig``'s defaults)
_ADAM_DEFAULTS = ((0.9, 0.999), 1e-8)


def _check_hyperparameters(proof: _Proof, audit: _Audit) -> None:
    cfg, declared = proof.cfg, proof.manifest.get("training")
    implied = Hyper.from_config(cfg, loss_name(proof.model))
    if proof.hyper != implied:
        audit.fail(
            "hyperparameters",
            f"the declared training ({_describe(proof.hyper)}) is not what the config and the model imply "
            f"({_describe(implied)})",
        )
    elif declared.get("schedule") != {"name": "constant", "lr": cfg.lr} or declared.get("batch_size") != cfg.batch_size:
        audit.fail("hyperparameters", "the declared schedule or batch size is not the one the proof's config implies")
    elif cfg.optimizer == "sgd" and (tuple(cfg.betas) != _ADAM_DEFAULTS[0] or cfg.eps != _ADAM_DEFAULTS[1]):
        # SGD never reads Adam's fields: a proof that sets them would carry a config its replay never checked
        audit.fail("hyperparameters", "the config sets Adam's betas or eps, but the run's optimizer is sgd")
    audit.ok("hyperparameters")


def _describe(h: Hyper) -> str:
    if h.optimizer == "adam":
        b1, b2 = h.betas
        return f"adam lr {h.lr:g} betas {b1:g},{b2:g} eps {h.eps:g} wd {h.weight_decay:g}, loss {h.loss}"
    return f"{h.optimizer} lr {h.lr:g} momentum {h.momentum:g} wd {h.weight_decay:g}, loss {h.loss}"


def _state(proof: _Proof, audit: _Audit, step: int) -> dict[str, torch.Tensor]:
    try:
        return proof.store.get(step)
    except ProofError as exc:
        audit.stop("checkpoints", str(exc).removeprefix("checkpoints: "))


def _check_generator(state: dict[str, torch.Tensor], name: str) -> None:
    """A recorded RNG state must be one torch can load (a zeroed mt19937 state makes ``set_rng_state`` throw), in its
    canonical form: bytes torch ignores on loading (padding, a cached normal sample marked invalid) must be as torch
    writes them, so that no two different files claim the same generator."""
    g = torch.Generator()
    try:
        g.set_state(state["rng/torch"].clone())
    except (RuntimeError, ValueError):
        raise ProofError(f"checkpoints: rng/torch in {name} is not a valid generator state") from None
    if not torch.equal(g.get_state(), state["rng/torch"]):
        raise ProofError(f"checkpoints: rng/torch in {name} is not in the form torch records (altered bytes)")


# ====================================================================================================================
# 7, 8: every checkpoint, update lower bound, replay


def _check_checkpoints_and_bound(proof: _Proof, audit: _Audit, th: Thresholds | None) -> float:
    """One pass over all segments: each checkpoint parsed and checked, each update measured and (hardened) bounded.

    Returns the smallest ratio of a segment's update to one plain SGD step at its start.
    """
    params = [f"model/{n}" for n, _ in proof.model.named_parameters()]
    failures, smallest, ds = [], math.inf, proof.dataset
    proof.norms = []
    for a, b in proof.segments:
        start, end = _state(proof, audit, a), _state(proof, audit, b)
        moved = update_norm(start, end, params)
        proof.norms.append(moved)
        if th is None:
            continue
        idx = torch.from_numpy(proof.indices[a].reshape(-1).copy())
        step = gradient_step_norm(
            proof.model, start, idx, ds.x_train, ds.y_train, proof.hyper, **_semantics(proof), step=a
        )
        # short segments get a proportionally lower bar: over one step, momentum may legitimately oppose the gradient
        ratio = th.min_update_ratio * UPDATE_RATIO_SHARE[proof.hyper.optimizer] * min(1.0, (b - a) / 10)
        if not math.isfinite(step) or not math.isfinite(moved):
            failures.append(f"{a}-{b} is not finite (one SGD step {step:.3g}, update {moved:.3g})")
        elif moved < ratio * step:
            failures.append(f"{a}-{b} moved {moved:.3g} < {ratio:.2g} x {step:.3g}")
        smallest = min(smallest, moved / step if step > 0 else math.inf)
    audit.ok("checkpoints")
    if failures:
        more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
        audit.fail(
            "update-bound",
            f"{len(failures)} segment(s) moved less than the claimed lr implies — interpolated/infinitesimal updates: "
            + "; ".join(failures[:3])
            + more,
        )
    elif th is not None:
        audit.ok("update-bound")
    return smallest


def _top_q(proof: _Proof, q: int) -> list[int]:
    """Indices of the ``q`` largest claimed parameter updates of every epoch (Jia et al.'s heuristic).

    The prover decides these sizes, so the soundness bound never counts on them; the predecessor replays make a
    decoy (momentum inflated to win the top-Q) fail at the checkpoint it was planted in.
    """
    by_epoch: dict[int, list[int]] = {}
    for i in range(len(proof.segments)):
        by_epoch.setdefault(proof.epoch(i), []).append(i)
    return sorted(i for segs in by_epoch.values() for i in sorted(segs, key=lambda i: -proof.norms[i])[:q])


def _replay(proof: _Proof, start: int, end: int) -> dict[str, torch.Tensor]:
    ds = proof.dataset
    batches = [torch.from_numpy(proof.indices[t].reshape(-1).copy()) for t in range(start, end)]
    state = proof.store.get(start)
    return replay_segment(
        proof.model, state, batches, ds.x_train, ds.y_train, proof.hyper, **_semantics(proof), first_step=start
    )


def _semantics(proof: _Proof) -> dict[str, Any]:
    """How the workers' batches combine into a step: their number (BatchNorm normalises each worker's batch alone)
    and the run's seeded augmentation, both from the committed manifest (docs/models.md)."""
    return {"workers": proof.workers, "augment": Augment(proof.cfg.augment, proof.cfg.seed)}


def _choose(proof: _Proof, options: VerifyOptions, nonce: str) -> tuple[list[tuple[int, str]], Soundness]:
    n_seg, delta = len(proof.segments), options.max_forgery_acceptance
    top = _top_q(proof, options.q)
    pool = [i for i in range(n_seg) if i not in set(top)]
    m = wrong_at_least(n_seg, options.forged_fraction)
    r = options.r if options.r is not None else random_draws(n_seg, len(pool), options.forged_fraction, delta)
    r = min(r, len(pool))
    if options.check_all:  # r stays what a sampled verification would draw: measure_acceptance needs it
        chosen, bound = [(i, "all") for i in range(n_seg)], 0.0
    else:
        rng = challenge_seed(proof.root or "", nonce)
        picks = rng.choice(len(pool), size=r, replace=False) if r else []
        chosen = plan(top, pool, (int(i) for i in picks))
        bound = miss_probability(len(pool), m, r) if m <= len(pool) else 0.0
    steps = sum(proof.segments[i][1] - proof.segments[i][0] for i, _ in chosen)
    soundness = Soundness(
        n_seg, options.forged_fraction, m, delta, len(pool), r, bound, len(chosen), steps, options.check_all, tuple(top)
    )
    return chosen, soundness


def _check_replay(proof: _Proof, audit: _Audit, options: VerifyOptions, nonce: str) -> tuple[list, Soundness]:
    chosen, soundness = _choose(proof, options, nonce)
    checks = []
    for i, why in chosen:
        a, b = proof.segments[i]
        try:
            replayed, claimed = _replay(proof, a, b), _state(proof, audit, b)
            d = distances(_state(proof, audit, a), replayed, claimed)
            bad = tuple(options.thresholds.violations(d)) + _generator_follows(replayed, claimed)
            bad += _counts_follow(replayed, claimed)
        except (RuntimeError, ValueError, ArithmeticError) as exc:  # e.g. a declared lr that overflows float32
            d, bad = None, (f"re-execution failed ({type(exc).__name__}: {_one_line(str(exc))[:120]})",)
        checks.append(SegmentCheck(a, b, proof.epoch(i), why, not bad, d, bad))
    _report_replay(audit, checks)
    return checks, soundness


def _generator_follows(replayed: dict[str, torch.Tensor], claimed: dict[str, torch.Tensor]) -> tuple[str, ...]:
    """The recorded RNG state must be the one the replay leaves (the zoo's models draw nothing: it stays as it was)."""
    if not torch.equal(replayed["rng/torch"], claimed["rng/torch"]):
        return ("rng/torch is not the generator state the replay leaves",)
    return ()


def _counts_follow(replayed: dict[str, torch.Tensor], claimed: dict[str, torch.Tensor]) -> tuple[str, ...]:
    """Optimizer step counts (Adam's bias correction) must be exactly the replay's: a count is not a distance."""
    keys = sorted(k for k in claimed if k.startswith(tuple(f"{p}/" for p in COUNT_PREFIXES)))
    wrong = [k for k in keys if k not in replayed or not torch.equal(replayed[k], claimed[k])]
    return (f"{wrong[0]} is not the step count the replay leaves",) if wrong else ()


def _report_replay(audit: _Audit, checks: list[SegmentCheck]) -> None:
    """One reason per selection rule, naming the first failing segment and how far off it was."""
    for why in ("top-q", "random", "predecessor", "all"):
        chosen = [c for c in checks if c.chosen_by == why]
        failed = [c for c in chosen if not c.passed]
        if failed:
            first = failed[0]
            audit.fail(
                "replay",
                f"{len(failed)} of {len(chosen)} {why} segments do not reproduce "
                f"(first: {why} segment {first.start}-{first.end}: {'; '.join(first.violations)})",
            )
    audit.ok("replay")


# ====================================================================================================================
# helpers


@functools.lru_cache(maxsize=4)
def _dataset(name: str, data_dir: str | None) -> Dataset:
    return load_dataset(name, data_dir)


@functools.lru_cache(maxsize=4)
def _root_of(name: str, data_dir: str | None) -> str:
    ds = _dataset(name, data_dir)
    return dataset_root(ds.x_train, ds.y_train)


class _threads:
    def __init__(self, n: int | None):
        self.n, self.before = n, torch.get_num_threads()

    def __enter__(self) -> None:
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.before)


def _one_line(text: str) -> str:
    """Reasons are one line: a library message may carry newlines (a C++ stack, a JSON excerpt)."""
    return " ".join(text.split())


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
