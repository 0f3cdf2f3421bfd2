"""The verifier: checks a proof folder and returns a typed :class:`Verdict` (it never prints).

Hardened protocol (Jia et al. 2021, Alg. 2, with the root-cause defences against Zhang et al. S&P 2022 and Fang et al.
EuroS&P 2023); each numbered check adds its own reason to the verdict when it fails:

1. ``manifest``: schema, types and internal consistency (config, seed, k, checkpoint steps).
2. ``identity``: the committed seed (and root) are the ones the verifier expects for this prover, if it was told —
   a proof copied from another run is bound to that run's seed.
3. ``commitment``: every file's digest and the Merkle root recompute (checked before anything else is trusted).
4. ``checkpoints``: each holds exactly the model's tensors (and momentum buffers) with the right shapes and dtypes.
5. ``w0``: checkpoint 0 equals the weights ``build_model(seed)`` regenerates, bit for bit (no KS test to game).
6. ``data``: the verifier's training set has the committed Merkle root; ``indices``: every worker's batch of every
   step is the PRF's (so also members of the committed set and of that worker's shard).
7. ``hyperparameters``: the declared optimizer is the one the config implies (replay uses the verifier's own).
8. ``update-bound``: every segment's parameter update is at least ``min_update_ratio`` times one plain SGD step at its
   start (lr x gradient norm on its first committed batch; scaled down for segments shorter than 10 steps):
   interpolated "infinitesimal" updates fail it. It costs one gradient per segment and covers every segment.
9. ``replay``: the top-Q largest updates of every epoch (as Jia et al.) and R further segments drawn from
   ``H(root || nonce)`` are re-executed; l1/l2/linf/cosine distances must be within the calibrated thresholds.

``verify_naive`` is the reference design's verifier (a per-tensor KS test on W0 plus top-Q replay at the reference
thresholds), kept as a baseline: the Fang and Zhang spoofs pass it.
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import RunConfig, config_from_dict
from ..data import BatchPlan, Dataset, load_dataset
from ..errors import ProofError, TrustgradError
from ..models import build_model
from .commit import challenge_seed, dataset_root, digest, leaf, merkle_root
from .format import (
    COMMITMENT,
    INDICES,
    MANIFEST,
    SCHEMA,
    checkpoint_name,
    parse_safetensors,
    proof_files,
    read_bounded,
    read_json,
    safetensors_limit,
    state_spec,
)
from .replay import Distances, Hyper, Thresholds, distances, gradient_step_norm, replay_segment, update_norm

__all__ = ["Verdict", "SegmentCheck", "VerifyOptions", "verify", "verify_naive", "NAIVE_THRESHOLDS"]

log = logging.getLogger(__name__)

#: the reference implementation's defaults (l1, l2, linf, cos on the weights); kept only for the naive baseline
NAIVE_THRESHOLDS = {"l1": 1000.0, "l2": 10.0, "linf": 0.1, "cos": 0.01}
_MAX_STEPS = 10_000_000
_MAX_CHECKPOINTS = 100_000


@dataclass(frozen=True)
class VerifyOptions:
    q: int = 1  #: top-Q largest updates re-executed per epoch
    r: int = 2  #: further segments drawn at random from H(root || nonce)
    nonce: str | None = None  #: None: a fresh random nonce (reported in the verdict, reproducible with --nonce)
    threads: int | None = None  #: torch threads for replay (None: leave as is)
    expected_seed: int | None = None  #: the seed this prover committed to / was assigned (binds the proof to it)
    expected_root: str | None = None  #: the commitment root the prover published at training time
    data_dir: str | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)


@dataclass(frozen=True)
class SegmentCheck:
    start: int
    end: int
    epoch: int
    chosen_by: str  # "top-q" | "random"
    passed: bool
    distances: Distances | None
    violations: tuple[str, ...] = ()


@dataclass
class Verdict:
    """The outcome: ``valid`` iff no check failed; ``reasons`` are ``"<check>: <detail>"`` lines."""

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
        self.reasons.append(f"{check}: {detail}")

    def stop(self, check: str, detail: str) -> None:
        self.fail(check, detail)
        raise _Invalid


@dataclass
class _Proof:
    """A proof after the structural checks: parsed manifest, config, data, model, checkpoints, indices."""

    root_dir: Path
    manifest: dict[str, Any]
    cfg: RunConfig
    steps: int
    k: int
    steps_per_epoch: int
    workers: int
    checkpoints: list[int]
    raw: dict[str, bytes] = field(default_factory=dict)
    states: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    indices: np.ndarray | None = None
    dataset: Dataset | None = None
    model: torch.nn.Module | None = None
    root: str | None = None
    data_dir: str | None = None


# ====================================================================================================================
# public entry points


def verify(path: str | Path, options: VerifyOptions | None = None) -> Verdict:
    """Check the proof folder at ``path`` (hardened protocol, see the module docstring).

    Raises :class:`ProofError` only when the input is not a proof at all (no folder, no readable JSON manifest);
    every other problem — tampering, truncation, wrong shapes, failed replay — is an invalid verdict with its reason.
    """
    options = options or VerifyOptions()
    started, audit = time.perf_counter(), _Audit()
    manifest = _read_manifest(path)
    nonce = options.nonce if options.nonce is not None else secrets.token_hex(16)
    verdict = Verdict(False, audit.reasons, thresholds=options.thresholds.as_dict(), checks=audit.checks, nonce=nonce)
    with _threads(options.threads):
        try:
            proof = _structure(Path(path), manifest, audit, options)
            verdict.root, verdict.steps = proof.root, proof.steps
            _check_identity(proof, audit, options)
            _check_w0(proof, audit)
            _check_data(proof, audit)
            _check_hyperparameters(proof, audit)
            verdict.bound_steps = _check_update_bound(proof, audit, options.thresholds)
            verdict.segments = _check_replay(proof, audit, options, nonce)
            verdict.replayed_steps = sum(s.end - s.start for s in verdict.segments)
        except _Invalid:
            pass
    verdict.valid = not audit.reasons
    verdict.seconds = time.perf_counter() - started
    log.info("proof %s: %s (%d reasons)", path, "valid" if verdict.valid else "INVALID", len(audit.reasons))
    return verdict


def verify_naive(path: str | Path, q: int = 1, alpha: float = 0.01, data_dir: str | None = None) -> Verdict:
    """The reference design's verifier, as a baseline: KS test of W0 per tensor + top-Q replay, loose thresholds.

    It checks neither the commitment, nor W0 against a seed, nor the data order, nor any segment but the top-Q, and
    compares weights (not updates) at the reference thresholds — the gaps the published spoofs go through.
    """
    started, audit = time.perf_counter(), _Audit()
    manifest = _read_manifest(path)
    verdict = Verdict(False, audit.reasons, mode="naive", thresholds=dict(NAIVE_THRESHOLDS), checks=audit.checks)
    try:
        proof = _structure(Path(path), manifest, audit, VerifyOptions(data_dir=data_dir), commit=False)
        verdict.steps = proof.steps
        _naive_ks(proof, audit, alpha)
        segments = []
        for start, end, epoch, _ in _top_q(proof, q):
            replayed = _replay(proof, start, end)
            d = _weight_distances(replayed, proof.states[end], proof)
            bad = tuple(f"{m} {d[m]:.3g} > {t:.3g}" for m, t in NAIVE_THRESHOLDS.items() if d[m] > t)
            segments.append(SegmentCheck(start, end, epoch, "top-q", not bad, None, bad))
        _report_replay(audit, segments)
        verdict.segments = segments
        verdict.replayed_steps = sum(s.end - s.start for s in segments)
    except _Invalid:
        pass
    verdict.valid = not audit.reasons
    verdict.seconds = time.perf_counter() - started
    return verdict


# ====================================================================================================================
# 1, 3, 4: manifest, commitment, structure


def _read_manifest(path: str | Path) -> dict[str, Any]:
    root = Path(path)
    if not root.is_dir():
        raise ProofError(f"proof folder {str(root)!r} does not exist (expected OUT/proof of a --proof record run)")
    return read_json(root / MANIFEST, "manifest")


def _field(m: dict[str, Any], key: str, kind: type, audit: _Audit, lo: int | None = None) -> Any:
    value = m.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) or (lo is not None and value < lo):
        audit.stop("manifest", f"field {key!r} must be {kind.__name__}{f' >= {lo}' if lo is not None else ''}")
    return value


def _structure(path: Path, m: dict[str, Any], audit: _Audit, options: VerifyOptions, commit: bool = True) -> _Proof:
    if m.get("schema") != SCHEMA:
        audit.stop("manifest", f"unknown schema {str(m.get('schema'))[:40]!r} (this verifier reads {SCHEMA})")
    seed, k = _field(m, "seed", int, audit), _field(m, "k", int, audit, 1)
    steps, spe = _field(m, "steps", int, audit, 1), _field(m, "steps_per_epoch", int, audit, 1)
    workers = _field(m, "workers", int, audit, 1)
    checkpoints = m.get("checkpoints")
    if steps > _MAX_STEPS or not isinstance(checkpoints, list) or len(checkpoints) > _MAX_CHECKPOINTS:
        audit.stop("manifest", "too many steps or checkpoints, or no checkpoint list")
    try:
        cfg = config_from_dict(_field(m, "config", dict, audit))
    except TrustgradError as exc:
        audit.stop("manifest", f"config is invalid ({exc})")
    if cfg.seed != seed or cfg.proof.k != k or cfg.workers != workers:
        audit.stop("manifest", "seed, k or workers disagree with the manifest's own config")
    if m.get("semantics") != "sync-mean-gradient":
        audit.stop("manifest", f"pattern {cfg.pattern.name!r}: only synchronous gradient averaging can be replayed")
    expected = sorted({*range(0, steps, k), steps})
    if checkpoints != expected:
        audit.stop("manifest", f"checkpoint steps must be every {k} steps from 0 to {steps} (and {steps})")
    audit.ok("manifest")
    proof = _Proof(path, m, cfg, steps, k, spe, workers, checkpoints)
    proof.data_dir = options.data_dir or cfg.data_dir
    try:
        proof.dataset = _dataset(cfg.dataset, proof.data_dir)
    except TrustgradError as exc:
        audit.stop("data", f"cannot load the training set {cfg.dataset!r} ({exc})")
    ds = proof.dataset
    try:
        proof.model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, seed, cfg.model)
    except TrustgradError as exc:
        audit.stop("manifest", f"the declared model cannot be built ({exc})")
    if commit:
        _check_commitment(proof, audit)
    _load_files(proof, audit)
    return proof


def _specs(proof: _Proof) -> tuple[dict, dict, dict]:
    model_spec = state_spec(proof.model, with_momentum=False)
    momentum = {k: v for k, v in state_spec(proof.model, with_momentum=True).items() if k.startswith("momentum/")}
    rng = {"rng/torch": (tuple(torch.get_rng_state().shape), torch.uint8)}
    return model_spec, momentum, rng


def _limits(proof: _Proof) -> dict[str, int]:
    model_spec, momentum, rng = _specs(proof)
    ckpt = safetensors_limit(model_spec, momentum, rng)
    idx = safetensors_limit({"indices": ((proof.steps, proof.workers, proof.cfg.batch_size), torch.int64)})
    limits = {checkpoint_name(s): ckpt for s in proof.checkpoints}
    limits[INDICES] = idx
    return limits


def _check_commitment(proof: _Proof, audit: _Audit) -> None:
    try:
        c = read_json(proof.root_dir / COMMITMENT, "commitment")
    except ProofError as exc:
        audit.stop("commitment", str(exc))
    names = proof_files(proof.checkpoints)
    files = c.get("files")
    if (
        not isinstance(files, list)
        or [f[0] if isinstance(f, list) and len(f) == 2 else None for f in files] != names
        or not isinstance(c.get("root"), str)
    ):
        audit.stop("commitment", "the committed file list is not the manifest's (files added, removed or renamed)")
    limits = _limits(proof)
    leaves = []
    for name, declared in files:
        try:
            raw = read_bounded(proof.root_dir / name, limits.get(name, 8 << 20), "commitment")
        except ProofError as exc:
            audit.stop("commitment", str(exc))
        if digest(raw).hex() != declared:
            audit.stop("commitment", f"{name} does not match its committed digest (changed after commitment)")
        proof.raw[name] = raw
        leaves.append(leaf(name, digest(raw)))
    root = merkle_root(leaves).hex()
    if root != c["root"]:
        audit.stop("commitment", "the Merkle root does not recompute from the file digests")
    proof.root = root
    audit.ok("commitment")


def _load_files(proof: _Proof, audit: _Audit) -> None:
    model_spec, momentum, rng = _specs(proof)
    limits = _limits(proof)
    with_momentum = proof.cfg.momentum > 0

    def raw(name: str, what: str) -> bytes:
        if name in proof.raw:
            return proof.raw.pop(name)
        return read_bounded(proof.root_dir / name, limits[name], what)

    try:
        for step in proof.checkpoints:
            name = checkpoint_name(step)
            spec = {**model_spec, **(momentum if with_momentum and step > 0 else {})}
            proof.states[step] = parse_safetensors(raw(name, "checkpoints"), name, "checkpoints", spec, rng)
    except ProofError as exc:
        audit.stop("checkpoints", str(exc).removeprefix("checkpoints: "))
    audit.ok("checkpoints")
    try:
        spec = {"indices": ((proof.steps, proof.workers, proof.cfg.batch_size), torch.int64)}
        proof.indices = parse_safetensors(raw(INDICES, "indices"), INDICES, "indices", spec)["indices"].numpy()
    except ProofError as exc:
        audit.stop("indices", str(exc).removeprefix("indices: "))


# ====================================================================================================================
# 2, 5, 6, 7: identity, W0, data, hyperparameters


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


def _check_w0(proof: _Proof, audit: _Audit) -> None:
    w0 = {f"model/{k}": v for k, v in proof.model.state_dict().items()}
    claimed = proof.states[0]
    worst = max(float((claimed[k].double() - v.double()).abs().max()) for k, v in w0.items())
    if worst != 0.0 or any(k.startswith("momentum/") for k in claimed):
        audit.fail(
            "w0",
            f"checkpoint 0 is not the initialization seed {proof.cfg.seed} generates (max |diff| {worst:.3g}): "
            "initial weights are not the prover's to choose",
        )
    audit.ok("w0")


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
    wrong = np.argwhere((proof.indices != plan.all_indices(proof.steps)).any(axis=2))
    if len(wrong):
        t, w = (int(v) for v in wrong[0])
        audit.fail("indices", f"worker {w}'s batch at step {t} is not the one the PRF of the seed gives")
        return
    audit.ok("indices")


def _check_hyperparameters(proof: _Proof, audit: _Audit) -> None:
    cfg = proof.cfg
    declared = proof.manifest.get("training")
    implied = {"name": "sgd", "lr": cfg.lr, "momentum": cfg.momentum, "dampening": 0.0, "nesterov": False}
    implied["weight_decay"] = cfg.weight_decay
    if (
        not isinstance(declared, dict)
        or declared.get("optimizer") != implied
        or declared.get("schedule") != {"name": "constant", "lr": cfg.lr}
        or declared.get("batch_size") != cfg.batch_size
    ):
        audit.fail("hyperparameters", "the declared optimizer/schedule is not the one the proof's config implies")
    audit.ok("hyperparameters")


# ====================================================================================================================
# 8, 9: update lower bound, replay


def _segments(proof: _Proof) -> list[tuple[int, int, int, float]]:
    """(start, end, epoch, parameter-update l2) for every segment between consecutive checkpoints."""
    params = [f"model/{n}" for n, _ in proof.model.named_parameters()]
    cps = proof.checkpoints
    return [
        (a, b, a // proof.steps_per_epoch, update_norm(proof.states[a], proof.states[b], params))
        for a, b in zip(cps, cps[1:])
    ]


def _batches(proof: _Proof, start: int, end: int) -> list[torch.Tensor]:
    return [torch.from_numpy(proof.indices[t].reshape(-1).copy()) for t in range(start, end)]


def _check_update_bound(proof: _Proof, audit: _Audit, th: Thresholds) -> int:
    hyper = Hyper.from_config(proof.cfg)
    ds, failures = proof.dataset, []
    for a, b, _, moved in _segments(proof):
        step = gradient_step_norm(
            proof.model, proof.states[a], _batches(proof, a, a + 1)[0], ds.x_train, ds.y_train, hyper
        )
        # short segments get a proportionally lower bar: over one step, momentum may legitimately oppose the gradient
        ratio = th.min_update_ratio * min(1.0, (b - a) / 10)
        if moved < ratio * step:
            failures.append(f"{a}-{b} moved {moved:.3g} < {ratio:.2g} x {step:.3g}")
    if failures:
        more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
        audit.fail(
            "update-bound",
            f"{len(failures)} segment(s) moved less than the claimed lr implies — interpolated/infinitesimal updates: "
            + "; ".join(failures[:3])
            + more,
        )
    audit.ok("update-bound")
    return len(proof.checkpoints) - 1


def _top_q(proof: _Proof, q: int) -> list[tuple[int, int, int, float]]:
    by_epoch: dict[int, list[tuple[int, int, int, float]]] = {}
    for seg in _segments(proof):
        by_epoch.setdefault(seg[2], []).append(seg)
    return sorted(s for segs in by_epoch.values() for s in sorted(segs, key=lambda s: -s[3])[:q])


def _replay(proof: _Proof, start: int, end: int) -> dict[str, torch.Tensor]:
    ds = proof.dataset
    return replay_segment(
        proof.model,
        proof.states[start],
        _batches(proof, start, end),
        ds.x_train,
        ds.y_train,
        Hyper.from_config(proof.cfg),
    )


def _check_replay(proof: _Proof, audit: _Audit, options: VerifyOptions, nonce: str) -> list[SegmentCheck]:
    top = _top_q(proof, options.q)
    rest = [s for s in _segments(proof) if s not in top]
    rng = challenge_seed(proof.root or "", nonce)
    picks = rng.choice(len(rest), size=min(options.r, len(rest)), replace=False) if rest else []
    chosen = [(s, "top-q") for s in top] + [(rest[int(i)], "random") for i in sorted(picks)]
    checks = []
    for (a, b, epoch, _), why in chosen:
        d = distances(proof.states[a], _replay(proof, a, b), proof.states[b])
        bad = tuple(options.thresholds.violations(d))
        checks.append(SegmentCheck(a, b, epoch, why, not bad, d, bad))
    _report_replay(audit, checks)
    return checks


def _report_replay(audit: _Audit, checks: list[SegmentCheck]) -> None:
    """One reason per selection rule (top-q, random), naming the first failing segment and how far off it was."""
    for why in ("top-q", "random"):
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
# the naive baseline's pieces


def _naive_ks(proof: _Proof, audit: _Audit, alpha: float) -> None:
    """Per-tensor KS test of W0 against PyTorch's default init U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (reference)."""
    from scipy.stats import kstest

    w0 = proof.states[0]
    fan_in: dict[str, int] = {}
    for name, p in proof.model.named_parameters():
        if p.dim() >= 2:
            fan_in[name.rsplit(".", 1)[0]] = int(np.prod(p.shape[1:]))
    for name, _ in proof.model.named_parameters():
        fan = fan_in.get(name.rsplit(".", 1)[0])
        if fan is None:
            continue
        bound = 1.0 / math.sqrt(fan)
        values = w0[f"model/{name}"].double().reshape(-1).numpy()
        p_value = float(kstest(values, "uniform", args=(-bound, 2 * bound)).pvalue)
        if p_value < alpha:
            audit.fail("ks", f"W0 tensor {name} fails the KS test (p = {p_value:.3g} < {alpha})")
    audit.ok("ks")


def _weight_distances(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], proof: _Proof) -> dict[str, float]:
    keys = [f"model/{n}" for n, _ in proof.model.named_parameters()]
    x = torch.cat([a[k].double().reshape(-1) for k in keys])
    y = torch.cat([b[k].double().reshape(-1) for k in keys])
    d = x - y
    cos = 1.0 - float(torch.dot(x, y)) / max(float(x.norm()) * float(y.norm()), 1e-300)  # |x||y|, not |x||x|
    return {"l1": float(d.abs().sum()), "l2": float(d.norm()), "linf": float(d.abs().max()), "cos": cos}


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
