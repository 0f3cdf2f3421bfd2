"""The checks a verifier is built from: the proof as they see it, the audit that collects their reasons, and the
steps both verifiers run (:func:`.verifier.verify`, the hardened protocol; :func:`.naive.verify_naive`, the
reference baseline).

- :func:`read_manifest`, :func:`open_proof`: steps 1 and 2 of the protocol (manifest, commitment, sizes, memory
  budget, digests); nothing the manifest declares is built before they pass.
- :func:`load_indices`, :func:`build_declared_model`, :func:`state_at`: the committed batches, the declared model and
  the checkpoints, each read within the budget and re-hashed against the commitment.
- :func:`check_checkpoints_and_bound`: every checkpoint parsed and checked, every segment's update measured (and, in
  the hardened protocol, bounded below: step 7).
- :func:`top_q`, :func:`reexecute`, :func:`report_replay`: the replay of step 8.

A failed check records its reason in the :class:`Audit` (``fail``), or ends the verification (``stop`` raises
:class:`Invalid`) when nothing after it could be trusted.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..augment import Augment
from ..config import RunConfig, config_from_dict
from ..data import Dataset, load_dataset
from ..errors import ConfigError, ProofError, TrustgradError
from ..models import build_model
from ..optim import Hyper
from .budget import MetaShapes, check_budget, estimate, machine_budget, meta_shapes
from .commit import FILE_HASHES, SCHEME, dataset_root, file_digest, leaf, merkle_root
from .format import (
    COMMITMENT,
    HEADER_SLACK,
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
    UPDATE_RATIO_SHARE,
    Distances,
    Thresholds,
    gradient_step_norm,
    optimizer_state_spec,
    replay_segment,
    update_norm,
)

__all__ = [
    "VerifyOptions",
    "SegmentCheck",
    "Invalid",
    "Audit",
    "Proof",
    "read_manifest",
    "open_proof",
    "load_indices",
    "build_declared_model",
    "state_at",
    "check_checkpoints_and_bound",
    "top_q",
    "reexecute",
    "report_replay",
    "data_root",
    "one_line",
]

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
    """How :func:`.verifier.verify` samples and bounds a verification, and what it trusts (the naive baseline reads
    only ``data_dir`` and ``memory_budget``)."""

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


class Invalid(Exception):
    """A failed check after which nothing further can be trusted."""


class Audit:
    """What one verification found: ``reasons`` (``"<check>: <detail>"`` lines) and each check's outcome."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.checks: dict[str, bool] = {}

    def ok(self, check: str) -> None:
        self.checks.setdefault(check, True)

    def fail(self, check: str, detail: str) -> None:
        self.checks[check] = False
        self.reasons.append(f"{check}: {one_line(detail)}")

    def stop(self, check: str, detail: str) -> None:
        self.fail(check, detail)
        raise Invalid


@dataclass
class Proof:
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
    scheme: str = SCHEME  # the commitment's: which hash digests each file (commit.FILE_HASHES)
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

    def __init__(self, proof: Proof, capacity: int):
        self.proof, self.capacity = proof, max(2, capacity)
        self._cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()

    def get(self, step: int) -> dict[str, torch.Tensor]:
        if step in self._cache:
            self._cache.move_to_end(step)
            return self._cache[step]
        p, name = self.proof, checkpoint_name(step)
        raw = read_bounded(p.root_dir / name, p.sizes[name], "checkpoints")
        if p.digests and file_digest(raw, p.scheme).hex() != p.digests[name]:
            raise ProofError(f"checkpoints: {name} changed after its commitment was checked")
        # the generator state is required: the format records it, and an absent one could not be checked
        state = parse_safetensors(raw, name, "checkpoints", {**p.spec(step), **_RNG_SPEC})
        _check_generator(state, name)
        self._cache[step] = state
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return state


# ====================================================================================================================
# 1, 2: manifest, commitment, sizes, budget


def read_manifest(path: str | Path) -> dict[str, Any]:
    root = Path(path)
    if not root.is_dir():
        raise ProofError(f"proof folder {str(root)!r} does not exist (expected OUT/proof of a --proof record run)")
    return read_json(root / MANIFEST, "manifest")


def _field(m: dict[str, Any], key: str, kind: type, audit: Audit, lo: int | None = None, hi: int | None = None) -> Any:
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


def open_proof(path: Path, m: dict[str, Any], audit: Audit, options: VerifyOptions, commit: bool = True) -> Proof:
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
        audit.stop("manifest", f"the declared model cannot be built ({one_line(str(exc))})")
    proof = Proof(path, m, cfg, hyper, steps, k, spe, workers, checkpoints, ds, shapes, data_dir)
    if commit:
        proof.digests, declared_root, proof.scheme = _read_commitment(proof, audit)
    _check_sizes(proof, audit)
    _check_memory(proof, options)
    if commit:
        _check_digests(proof, audit, declared_root)
    return proof


def _read_commitment(proof: Proof, audit: Audit) -> tuple[dict[str, str], str, str]:
    try:
        c = read_json(proof.root_dir / COMMITMENT, "commitment")
    except ProofError as exc:
        audit.stop("commitment", str(exc).removeprefix("commitment: "))
    files, root, scheme = c.get("files"), c.get("root"), c.get("scheme")
    if not isinstance(scheme, str) or scheme not in FILE_HASHES:
        # the scheme picks the hash every digest is recomputed with: only collision-resistant ones are listed
        audit.stop("commitment", f"unknown commitment scheme {str(scheme)[:40]!r} (known: {', '.join(FILE_HASHES)})")
    names = proof_files(proof.checkpoints)
    if (
        not isinstance(files, list)
        or [f[0] if isinstance(f, list) and len(f) == 2 else None for f in files] != names
        or not all(isinstance(f[1], str) and len(f[1]) == 64 for f in files)
        or not isinstance(root, str)
    ):
        audit.stop("commitment", "the committed file list is not the manifest's (files added, removed or renamed)")
    return {name: d for name, d in files}, root, scheme


def _expected_bytes(proof: Proof, name: str) -> tuple[int, int]:
    """(least, most) bytes the committed file ``name`` can have, given the declared model, batch size and steps."""
    if name == INDICES:
        data = proof.steps * proof.workers * proof.cfg.batch_size * 8
        return 8 + data, 8 + data + HEADER_SLACK
    step = int(name.removeprefix("checkpoints/step_").removesuffix(".safetensors"))
    data = sum(math.prod(s) * _itemsize(d) for s, d in proof.spec(step).values())
    return 8 + data, 8 + data + _RNG_BYTES + HEADER_SLACK


def _check_sizes(proof: Proof, audit: Audit) -> None:
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


def _check_memory(proof: Proof, options: VerifyOptions) -> None:
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


def _check_digests(proof: Proof, audit: Audit, declared_root: str) -> None:
    leaves = []
    for name in proof_files(proof.checkpoints):
        try:
            got = _hash_file(proof.root_dir / name, proof.sizes.get(name), proof.scheme)
        except ProofError as exc:
            audit.stop("commitment", str(exc))
        if got.hex() != proof.digests[name]:
            audit.stop("commitment", f"{name} does not match its committed digest (changed after commitment)")
        leaves.append(leaf(name, got))
    root = merkle_root(leaves).hex()
    if root != declared_root:
        audit.stop("commitment", "the Merkle root does not recompute from the file digests")
    proof.root = root
    audit.ok("commitment")


def _hash_file(path: Path, size: int | None, scheme: str) -> bytes:
    """The digest of a file under ``scheme``, streamed; ``size``: the size stat saw (a file that changes meanwhile is
    refused)."""
    if size is None:  # the manifest, already read under its own bound; hash the same bytes the verifier parsed
        return file_digest(read_bounded(path, 8 << 20, "commitment"), scheme)
    h, seen = FILE_HASHES[scheme](), 0
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
# 4-7: indices, model, checkpoints, update lower bound


def load_indices(proof: Proof, audit: Audit) -> None:
    try:
        raw = read_bounded(proof.root_dir / INDICES, proof.sizes[INDICES], "indices")
        if proof.digests and file_digest(raw, proof.scheme).hex() != proof.digests[INDICES]:
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


def build_declared_model(proof: Proof, audit: Audit) -> None:
    ds, cfg = proof.dataset, proof.cfg
    try:  # within the budget now: the declared sizes matched the committed files and the estimate fit
        proof.model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, cfg.seed, cfg.model)
    except TrustgradError as exc:
        audit.stop("manifest", f"the declared model cannot be built ({exc})")


def state_at(proof: Proof, audit: Audit, step: int) -> dict[str, torch.Tensor]:
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


def check_checkpoints_and_bound(proof: Proof, audit: Audit, th: Thresholds | None) -> float:
    """One pass over all segments: each checkpoint parsed and checked, each update measured and (hardened) bounded.

    Returns the smallest ratio of a segment's update to one plain SGD step at its start.
    """
    params = [f"model/{n}" for n, _ in proof.model.named_parameters()]
    failures, smallest, ds = [], math.inf, proof.dataset
    proof.norms = []
    for a, b in proof.segments:
        start, end = state_at(proof, audit, a), state_at(proof, audit, b)
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


# ====================================================================================================================
# 8: replay


def top_q(proof: Proof, q: int) -> list[int]:
    """Indices of the ``q`` largest claimed parameter updates of every epoch (Jia et al.'s heuristic).

    The prover decides these sizes, so the soundness bound never counts on them; the predecessor replays make a
    decoy (momentum inflated to win the top-Q) fail at the checkpoint it was planted in.
    """
    by_epoch: dict[int, list[int]] = {}
    for i in range(len(proof.segments)):
        by_epoch.setdefault(proof.epoch(i), []).append(i)
    return sorted(i for segs in by_epoch.values() for i in sorted(segs, key=lambda i: -proof.norms[i])[:q])


def reexecute(proof: Proof, start: int, end: int) -> dict[str, torch.Tensor]:
    ds = proof.dataset
    batches = [torch.from_numpy(proof.indices[t].reshape(-1).copy()) for t in range(start, end)]
    state = proof.store.get(start)
    return replay_segment(
        proof.model, state, batches, ds.x_train, ds.y_train, proof.hyper, **_semantics(proof), first_step=start
    )


def _semantics(proof: Proof) -> dict[str, Any]:
    """How the workers' batches combine into a step: their number (BatchNorm normalises each worker's batch alone)
    and the run's seeded augmentation, both from the committed manifest (docs/models.md)."""
    return {"workers": proof.workers, "augment": Augment(proof.cfg.augment, proof.cfg.seed)}


def report_replay(audit: Audit, checks: list[SegmentCheck]) -> None:
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
def data_root(name: str, data_dir: str | None) -> str:
    ds = _dataset(name, data_dir)
    return dataset_root(ds.x_train, ds.y_train)


def one_line(text: str) -> str:
    """Reasons are one line: a library message may carry newlines (a C++ stack, a JSON excerpt)."""
    return " ".join(text.split())


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
