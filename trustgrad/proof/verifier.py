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
reference thresholds), kept as a baseline: the Fang and Zhang spoofs pass it. The steps both run (opening a proof,
reading its checkpoints, the update bound, re-executing a segment) are in ``checks.py``.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import BatchPlan
from ..errors import ProofError
from ..optim import Hyper, loss_name
from .checks import (
    Audit,
    Invalid,
    Proof,
    SegmentCheck,
    VerifyOptions,
    build_declared_model,
    check_checkpoints_and_bound,
    data_root,
    load_indices,
    one_line,
    open_proof,
    read_manifest,
    reexecute,
    report_replay,
    state_at,
    top_q,
)
from .claims import claims_of
from .commit import challenge_seed
from .replay import COUNT_PREFIXES, distances
from .soundness import Soundness, miss_probability, plan, random_draws, wrong_at_least

__all__ = ["Verdict", "SegmentCheck", "VerifyOptions", "verify", "trust_named_factories"]

log = logging.getLogger(__name__)


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


# ====================================================================================================================
# public entry points


def verify(path: str | Path, options: VerifyOptions | None = None) -> Verdict:
    """Check the proof folder at ``path`` (hardened protocol, see the module docstring).

    Raises :class:`ProofError` only when the input is not a proof at all (no folder, no readable JSON manifest) or
    does not fit the memory budget; every other problem — tampering, truncation, wrong shapes, out-of-range values,
    failed replay — is an invalid verdict with its reason.
    """
    options = options or VerifyOptions()
    started, audit = time.perf_counter(), Audit()
    manifest = read_manifest(path)
    trust_named_factories(manifest, options)
    nonce = options.nonce if options.nonce is not None else secrets.token_hex(16)
    verdict = Verdict(False, audit.reasons, thresholds=options.thresholds.as_dict(), checks=audit.checks, nonce=nonce)
    verdict.claims = claims_of(manifest)
    with _threads(options.threads):
        try:
            proof = open_proof(Path(path), manifest, audit, options)
            verdict.root, verdict.steps = proof.root, proof.steps
            _check_identity(proof, audit, options)
            _check_data(proof, audit)
            build_declared_model(proof, audit)
            _check_w0(proof, audit)
            _check_hyperparameters(proof, audit)
            verdict.min_update_ratio = check_checkpoints_and_bound(proof, audit, options.thresholds)
            verdict.bound_steps = len(proof.segments)
            verdict.segments, soundness = _check_replay(proof, audit, options, nonce)
            verdict.soundness = soundness.as_dict()
            verdict.replayed_steps = soundness.replayed_steps
        except Invalid:
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
            shown = one_line(str(declared))[:120]
            raise ProofError(
                f"the proof's {kind} is user code {shown!r}: verify imports only code you name; if you trust it, "
                f"pass --{kind} {shown}" + (f" (you named {given!r})" if given else "")
            )
        if given is not None and not is_factory(declared):
            raise ProofError(f"--{kind} {given!r} was given, but the proof's {kind} is {str(declared)[:60]!r}")
    allow(options.model_factory, options.loss_factory, options.dataset_factory)


# ====================================================================================================================
# 1, 2 (manifest, commitment, sizes, budget): checks.open_proof; 3-6: identity, data and indices, W0, hyperparameters


def _check_identity(proof: Proof, audit: Audit, options: VerifyOptions) -> None:
    if options.expected_seed is not None and proof.cfg.seed != options.expected_seed:
        audit.fail(
            "identity",
            f"the proof is bound to seed {proof.cfg.seed}, not to this prover's seed {options.expected_seed} "
            "(a proof copied from another run)",
        )
    if options.expected_root is not None and proof.root != options.expected_root:
        audit.fail("identity", "the commitment root is not the one the prover published when it trained")
    audit.ok("identity")


def _check_data(proof: Proof, audit: Audit) -> None:
    ds, cfg, m = proof.dataset, proof.cfg, proof.manifest
    declared = m.get("data", {}).get("merkle_root") if isinstance(m.get("data"), dict) else None
    if declared != data_root(cfg.dataset, proof.data_dir):
        audit.fail("data", "the verifier's training set does not have the committed Merkle root")
    plan = BatchPlan(len(ds.x_train), proof.workers, cfg.seed, cfg.batch_size)
    spe, total = plan.steps_per_epoch, plan.total_steps(cfg.epochs, cfg.max_steps)
    if proof.steps_per_epoch != spe or proof.steps != total:
        audit.stop("data", f"the run has {total} steps of {spe} per epoch, the proof claims {proof.steps}")
    audit.ok("data")
    load_indices(proof, audit)
    wrong = np.argwhere((proof.indices != plan.all_indices(proof.steps)).any(axis=2))
    if len(wrong):  # in range, so the later checks can still run and add their own reasons (w0 of a relabel)
        t, w = (int(v) for v in wrong[0])
        audit.fail("indices", f"worker {w}'s batch at step {t} is not the one the PRF of the seed gives")
    audit.ok("indices")


def _check_w0(proof: Proof, audit: Audit) -> None:
    claimed = state_at(proof, audit, 0)
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


def _check_hyperparameters(proof: Proof, audit: Audit) -> None:
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


# ====================================================================================================================
# 7 (every checkpoint, update lower bound): checks.check_checkpoints_and_bound; 8: replay


def _choose(proof: Proof, options: VerifyOptions, nonce: str) -> tuple[list[tuple[int, str]], Soundness]:
    n_seg, delta = len(proof.segments), options.max_forgery_acceptance
    top = top_q(proof, options.q)
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


def _check_replay(proof: Proof, audit: Audit, options: VerifyOptions, nonce: str) -> tuple[list, Soundness]:
    chosen, soundness = _choose(proof, options, nonce)
    checks = []
    for i, why in chosen:
        a, b = proof.segments[i]
        try:
            replayed, claimed = reexecute(proof, a, b), state_at(proof, audit, b)
            d = distances(state_at(proof, audit, a), replayed, claimed)
            bad = tuple(options.thresholds.violations(d)) + _generator_follows(replayed, claimed)
            bad += _counts_follow(replayed, claimed)
        except (RuntimeError, ValueError, ArithmeticError) as exc:  # e.g. a declared lr that overflows float32
            d, bad = None, (f"re-execution failed ({type(exc).__name__}: {one_line(str(exc))[:120]})",)
        checks.append(SegmentCheck(a, b, proof.epoch(i), why, not bad, d, bad))
    report_replay(audit, checks)
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


# ====================================================================================================================
# helpers


class _threads:
    def __init__(self, n: int | None):
        self.n, self.before = n, torch.get_num_threads()

    def __enter__(self) -> None:
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.before)
