"""Proof-of-Learning spoofing attacks: forged proofs for a model the attacker did not train (or did not train fully).

Each attack writes a proof folder in exactly the honest format (``trustgrad.proof.writer``), commitment included —
the attacker controls its own files, so a commitment alone proves nothing about honesty. The hardened verifier must
reject each with its own reason; the reference design's naive verifier accepts the Fang and Zhang spoofs.

- :func:`infinitesimal_spoof` (Fang et al., EuroS&P 2023, "infinitesimal update"): a straight line from the genuine W0
  to the stolen weights in so many steps that each segment moves next to nothing; no gradient is ever computed.
- :func:`blindfold_topq_spoof` (Fang et al., "blindfold top-Q"): per epoch Q segments are trained honestly, the rest
  interpolated toward the stolen weights in steps kept smaller, so the honest ones are the top-Q a verifier re-executes.
- :func:`zhang_spoof` (Zhang et al., S&P 2022): W0 is genuine init values sorted into the rank order of the stolen
  weights (its per-tensor distribution is exactly an honest one, so it passes the KS test), then a straight line to the
  stolen weights; data crafting is simplified to choosing, for each segment, the lowest-loss samples at its start
  (small gradients keep the replay near the line).
Adaptive forgers, written against the verifier by someone who read it (docs/proof.md measures each exactly):

- :func:`recommitted_checkpoint` perturbs one checkpoint's weights by a fraction of ``|W|`` and re-commits: only the
  two segments around it are wrong.
- :func:`momentum_decoy_spoof` trains the first ``honest_steps`` honestly, interpolates the rest to the stolen model,
  and inflates the momentum buffers at one honest segment per epoch so that segment is its epoch's largest update
  (the top-Q the verifier replays).
- :func:`partial_interpolation_spoof` trains the first ``1 - f`` of the segments honestly and interpolates the last
  ``f`` to the stolen model.
- :func:`honest_proof` is the honest trajectory computed in one process (what every forger builds on; the fuzz
  target mutates it).
- :func:`copy_proof` (a proof copied from another run, optionally re-labelled with the attacker's seed),
  :func:`tamper_checkpoint` and :func:`tamper_indices` (edits, with or without recomputing the commitment).

>>> sorted(SPOOFS)  # doctest: +NORMALIZE_WHITESPACE
['blindfold-top-q', 'copy', 'infinitesimal', 'momentum-decoy', 'partial-interpolation', 'recommitted-checkpoint',
 'tamper-checkpoint', 'tamper-indices', 'zhang']
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F

from ..config import RunConfig
from ..data import BatchPlan, load_dataset
from ..models import build_model
from ..optim import Hyper, loss_name
from ..proof.format import INDICES, MANIFEST, checkpoint_name
from ..proof.prover import build_manifest
from ..proof.replay import replay_segment, update_norm
from ..proof.writer import ProofWriter, recommit

__all__ = [
    "SPOOFS",
    "infinitesimal_spoof",
    "blindfold_topq_spoof",
    "zhang_spoof",
    "copy_proof",
    "tamper_checkpoint",
    "tamper_indices",
    "target_from_state",
    "honest_proof",
    "recommitted_checkpoint",
    "momentum_decoy_spoof",
    "partial_interpolation_spoof",
]

State = dict[str, torch.Tensor]
log = logging.getLogger(__name__)


def target_from_state(state_dict: dict[str, torch.Tensor]) -> State:
    """The stolen model, in proof naming (``model/<key>``), from a plain state_dict (e.g. a run's model.safetensors)."""
    return {k if k.startswith("model/") else f"model/{k}": v.detach().clone().float() for k, v in state_dict.items()}


class SpoofPlan:
    """What an attacker can compute from its own config: dataset, PRF batches, W0, step counts."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.ds = load_dataset(cfg.dataset, cfg.data_dir)
        plan = BatchPlan(len(self.ds.x_train), cfg.workers, cfg.seed, cfg.batch_size)
        self.spe, self.steps = plan.steps_per_epoch, plan.total_steps(cfg.epochs, cfg.max_steps)
        self.indices = plan.all_indices(self.steps)
        self.model = build_model(cfg.model.name, self.ds.input_shape, self.ds.num_classes, cfg.seed, cfg.model)
        self.w0 = {f"model/{k}": v.detach().clone() for k, v in self.model.state_dict().items()}
        self.checkpoints = sorted({*range(0, self.steps, cfg.proof.k), self.steps})
        self.rng = torch.get_rng_state()
        self.hyper = Hyper.from_config(cfg, loss_name(self.model))
        self.names = [f"model/{n}" for n, _ in self.model.named_parameters()]

    def start(self) -> State:
        """Checkpoint 0: the genuine W0, no momentum buffers yet, the RNG state."""
        return {**self.w0, "rng/torch": self.rng}

    def train(self, state: State, a: int, b: int) -> State:
        """Steps a..b trained honestly from ``state`` (what the verifier's replay reproduces bit for bit)."""
        return replay_segment(self.model, state, self.batches(a, b), self.ds.x_train, self.ds.y_train, self.hyper)

    def batches(self, a: int, b: int) -> list[torch.Tensor]:
        return [torch.from_numpy(self.indices[t].reshape(-1).copy()) for t in range(a, b)]

    def with_momentum(self, params: State, buf_scale: State | None = None) -> State:
        """A checkpoint state: parameters, momentum buffers (given or zero, when the config uses momentum), RNG."""
        state = dict(params)
        if self.cfg.momentum > 0:
            for name, p in self.model.named_parameters():
                key = f"model/{name}"
                state[f"momentum/{name}"] = buf_scale[key] if buf_scale is not None else torch.zeros_like(p)
        state["rng/torch"] = self.rng
        return state

    def write(self, out: str | Path, states: dict[int, State]) -> Path:
        writer = ProofWriter(out)
        for step in self.checkpoints:
            state = states[step] if step > 0 else {k: v for k, v in states[0].items() if not k.startswith("momentum/")}
            writer.add_checkpoint(step, state)
        manifest = build_manifest(self.cfg, self.ds, self.model, self.cfg.workers, self.steps, self.spe)
        writer.finish(manifest, self.indices)
        return Path(out)


def _lerp(a: State, b: State, t: float) -> State:
    return {k: a[k] + t * (b[k] - a[k]) for k in a}


def _line_momentum(plan: SpoofPlan, a: State, b: State, steps: int) -> State:
    """Momentum buffers that look consistent with moving from a to b in ``steps`` plain steps: -(b - a) / (steps lr)."""
    return {k: -(b[k] - a[k]) / (steps * plan.cfg.lr) for k in a if k.startswith("model/")}


def infinitesimal_spoof(cfg: RunConfig, target: State, out: str | Path) -> Path:
    """Fang et al.'s infinitesimal-update spoof: W_t = W0 + (t / T) (W_target - W0), nothing trained."""
    plan = SpoofPlan(cfg)
    w0, cps = plan.w0, plan.checkpoints
    states = {}
    for i, step in enumerate(cps):
        params = _lerp(w0, target, step / plan.steps)
        nxt = _lerp(w0, target, cps[min(i + 1, len(cps) - 1)] / plan.steps)
        states[step] = plan.with_momentum(params, _line_momentum(plan, params, nxt, cfg.proof.k))
    return plan.write(out, states)


def blindfold_topq_spoof(cfg: RunConfig, target: State, out: str | Path, q: int = 1, margin: float = 0.9) -> Path:
    """Fang et al.'s blindfold top-Q spoof: Q honest segments per epoch, the rest interpolated toward the target.

    The first Q segments of every epoch are trained honestly; every other segment moves an equal share of the
    remaining way to the target, shortened where needed to ``margin`` times the smallest honest update of its epoch,
    so that the honest segments are exactly the top-Q a verifier picks by update size. Where the cap binds, the proof
    ends short of the target (logged): that is the price of hiding from top-Q with this step budget.
    """
    plan = SpoofPlan(cfg)
    cps = plan.checkpoints
    segs = list(zip(cps, cps[1:]))
    names = [f"model/{n}" for n, _ in plan.model.named_parameters()]
    by_epoch: dict[int, list[int]] = {}
    for i, (a, _) in enumerate(segs):
        by_epoch.setdefault(a // plan.spe, []).append(i)
    honest = {i for in_epoch in by_epoch.values() for i in in_epoch[:q]}
    states, cap = {0: plan.with_momentum(plan.w0)}, {}
    for i, (a, b) in enumerate(segs):
        start, epoch = states[a], a // plan.spe
        if i in honest:  # epochs are in step order, so an epoch's honest segments come before its interpolated ones
            states[b] = plan.train(start, a, b)
            cap[epoch] = min(cap.get(epoch, math.inf), margin * update_norm(start, states[b], names))
            continue
        left = sum(1 for j in range(i, len(segs)) if j not in honest)
        params = {k: v for k, v in start.items() if k.startswith("model/")}
        nxt = _lerp(params, target, 1.0 / left)
        size = update_norm(params, nxt, names)
        if size > cap.get(epoch, math.inf):
            nxt = _lerp(params, nxt, cap[epoch] / size)
        states[b] = plan.with_momentum(nxt, _line_momentum(plan, params, nxt, b - a))
    short = update_norm(states[cps[-1]], target, names) / max(update_norm(plan.w0, target, names), 1e-30)
    log.info("blindfold top-Q spoof: ends %.2g x |target - W0| away from the target", short)
    return plan.write(out, states)


def zhang_spoof(cfg: RunConfig, target: State, out: str | Path) -> Path:
    """Zhang et al.'s spoof: KS-passing permuted W0, a straight line to the target, low-loss (crafted) batches."""
    plan = SpoofPlan(cfg)
    w0 = {}
    for k, genuine in plan.w0.items():  # genuine init values placed in the rank order of the target's values
        flat, order = genuine.reshape(-1).sort().values, target[k].reshape(-1).argsort()
        permuted = torch.empty_like(flat)
        permuted[order] = flat
        w0[k] = permuted.reshape(genuine.shape)
    cps = plan.checkpoints
    states = {step: plan.with_momentum(_lerp(w0, target, step / plan.steps)) for step in cps}
    per_step = cfg.workers * cfg.batch_size
    for a, b in zip(cps, cps[1:]):  # data crafting (simplified): the samples the model already fits best
        plan.model.load_state_dict({k[6:]: v for k, v in states[a].items() if k.startswith("model/")})
        with torch.no_grad():
            losses = F.cross_entropy(plan.model(plan.ds.x_train), plan.ds.y_train, reduction="none")
        chosen = losses.argsort()[:per_step].numpy().reshape(cfg.workers, cfg.batch_size)
        plan.indices[a:b] = chosen
    return plan.write(out, states)


def copy_proof(src: str | Path, out: str | Path, claim_seed: int | None = None) -> Path:
    """Copy another run's proof; with ``claim_seed``, relabel it as the attacker's (seed rewritten, recommitted)."""
    src, out = Path(src), Path(out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out)
    if claim_seed is not None:
        manifest = json.loads((out / MANIFEST).read_text())
        manifest["seed"] = claim_seed
        manifest["config"]["seed"] = claim_seed
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        recommit(out)
    return out


def tamper_checkpoint(src: str | Path, out: str | Path, step: int, delta: float = 0.5, commit: bool = False) -> Path:
    """Add ``delta`` to the first weight tensor of checkpoint ``step``; ``commit``: recompute the commitment."""
    from safetensors.torch import load_file, save_file

    out = copy_proof(src, out)
    path = out / checkpoint_name(step)
    state = load_file(str(path))  # the attacker's own file
    key = sorted(k for k in state if k.startswith("model/"))[0]
    state[key] = state[key] + delta
    save_file(state, str(path))
    if commit:
        recommit(out)
    return out


def tamper_indices(src: str | Path, out: str | Path, step: int = 1, commit: bool = False) -> Path:
    """Replace worker 0's first sample at ``step`` by another training sample; ``commit``: recompute the commitment."""
    from safetensors.torch import load_file, save_file

    out = copy_proof(src, out)
    indices = load_file(str(out / INDICES))["indices"].clone()
    indices[step, 0, 0] = (indices[step, 0, 0] + 1) % (int(indices.max()) + 1)
    save_file({"indices": indices}, str(out / INDICES))
    if commit:
        recommit(out)
    return out


def honest_proof(cfg: RunConfig, out: str | Path) -> Path:
    """An honest proof of ``cfg``'s run, trained in this process (the data-parallel mean as one concatenated batch)."""
    plan = SpoofPlan(cfg)
    cps = plan.checkpoints
    states = {0: plan.start()}
    for a, b in zip(cps, cps[1:]):
        states[b] = plan.train(states[a], a, b)
    return plan.write(out, states)


def recommitted_checkpoint(src: str | Path, out: str | Path, step: int, rel: float = 1e-3, seed: int = 0) -> Path:
    """Move checkpoint ``step``'s weights by ``rel * |W|`` in a random direction and re-commit (digests, root).

    A forger who wants one checkpoint of its choosing (a backdoored snapshot, a shortcut) pays with exactly the two
    segments that meet there: the one ending at it and the one starting from it.
    """
    from safetensors.torch import load_file, save_file

    out = copy_proof(src, out)
    path = out / checkpoint_name(step)
    state = load_file(str(path))
    keys = sorted(k for k in state if k.startswith("model/"))
    gen = torch.Generator().manual_seed(seed)
    noise = {k: torch.randn(state[k].shape, generator=gen) for k in keys}
    scale = (
        rel
        * update_norm({k: torch.zeros_like(state[k]) for k in keys}, state, keys)
        / update_norm({k: torch.zeros_like(v) for k, v in noise.items()}, noise, keys)
    )
    for k in keys:
        state[k] = state[k] + scale * noise[k]
    save_file(state, str(path))
    recommit(out)
    return out


def momentum_decoy_spoof(
    cfg: RunConfig,
    target: State,
    out: str | Path,
    honest_steps: int,
    decoy: float = 3.0,
    q: int = 1,
    margin: float = 0.9,
) -> Path:
    """The issue-15 forger: ``honest_steps`` trained, the rest interpolated, top-Q steered by inflated momentum.

    In every epoch, the ``q`` segments after the first one start from a checkpoint whose momentum buffers are
    ``decoy`` times what they were; the forger then trains those segments honestly from the inflated state, so they
    reproduce on replay and are the epoch's largest updates. Segments after ``honest_steps`` are interpolated toward the
    stolen ``target`` (with momentum buffers that look like a straight line), each capped at ``margin`` times the
    latest decoy's update, except the decoys, which are trained.
    Wrong segments: every interpolated one and every segment ending at a decoy checkpoint.
    """
    plan = SpoofPlan(cfg)
    cps = plan.checkpoints
    segs = list(zip(cps, cps[1:]))
    by_epoch: dict[int, list[int]] = {}
    for i, (a, _) in enumerate(segs):
        by_epoch.setdefault(a // plan.spe, []).append(i)
    decoys = {i for in_epoch in by_epoch.values() for i in in_epoch[1 : 1 + q]}
    states, cap = {0: plan.start()}, math.inf
    for i, (a, b) in enumerate(segs):
        start = states[a]
        if i in decoys and cfg.momentum > 0:
            start = {k: decoy * v if k.startswith("momentum/") else v for k, v in start.items()}
            states[a] = start  # the checkpoint the prover commits: inflated, so its predecessor no longer reproduces
        if b <= honest_steps or i in decoys:
            states[b] = plan.train(start, a, b)
            if i in decoys:  # interpolated segments stay below the latest decoy, so the decoys are the top-Q
                cap = margin * update_norm(start, states[b], plan.names)
            continue
        left = sum(1 for j in range(i, len(segs)) if j not in decoys)
        params = {k: v for k, v in start.items() if k.startswith("model/")}
        nxt = _lerp(params, target, 1.0 / left)
        size = update_norm(params, nxt, plan.names)
        if size > cap:
            nxt = _lerp(params, nxt, cap / size)
        states[b] = plan.with_momentum(nxt, _line_momentum(plan, params, nxt, b - a))
    return plan.write(out, states)


def partial_interpolation_spoof(
    cfg: RunConfig, target: State, out: str | Path, fraction: float, hide: float | None = 0.9
) -> Path:
    """A fraction ``fraction`` of the segments interpolated toward ``target``, the rest trained honestly.

    ``hide`` (the adaptive forger): the forged segments avoid everything the verifier replays for certain -- the
    first segment of every epoch is trained and every forged update is capped at ``hide`` times it, so the top-Q is
    honest; the last segment of every epoch but the final one is trained too, so the top-Q's predecessor is honest --
    and are taken as contiguous blocks from the last epoch backward (a block of b forged segments is caught by b + 1
    of the random picks, the fewest possible). The forgery then rests on the random draw alone, which is what the
    soundness bound is about; the cap may leave the proof short of the target (its price). ``None``: the last
    ``fraction`` of the segments, uncapped.
    """
    plan = SpoofPlan(cfg)
    cps = plan.checkpoints
    segs = list(zip(cps, cps[1:]))
    forged_count = max(1, math.ceil(fraction * len(segs) - 1e-9))  # at least the fraction asked for
    forged = _hidden_segments(plan, segs, forged_count) if hide is not None else set(range(len(segs))[-forged_count:])
    states, cap = {0: plan.start()}, {}
    for i, (a, b) in enumerate(segs):
        epoch = a // plan.spe
        if i not in forged:
            states[b] = plan.train(states[a], a, b)
            cap.setdefault(epoch, (hide or math.inf) * update_norm(states[a], states[b], plan.names))
            continue
        params = {k: v for k, v in states[a].items() if k.startswith("model/")}
        nxt = _lerp(params, target, 1.0 / sum(1 for j in forged if j >= i))
        size = update_norm(params, nxt, plan.names)
        if size > cap.get(epoch, math.inf):
            nxt = _lerp(params, nxt, cap[epoch] / size)
        states[b] = plan.with_momentum(nxt, _line_momentum(plan, params, nxt, b - a))
    log.info("partial interpolation: %d of %d segments forged", len(forged), len(segs))
    return plan.write(out, states)


def _hidden_segments(plan: SpoofPlan, segs: list[tuple[int, int]], count: int) -> set[int]:
    """Up to ``count`` segments, latest first, neither an epoch's first nor (but in the last epoch) its last."""
    by_epoch: dict[int, list[int]] = {}
    for i, (a, _) in enumerate(segs):
        by_epoch.setdefault(a // plan.spe, []).append(i)
    last_epoch = max(by_epoch)
    chosen: set[int] = set()
    for epoch in sorted(by_epoch, reverse=True):
        inner = by_epoch[epoch][1:] if epoch == last_epoch else by_epoch[epoch][1:-1]
        for i in reversed(inner):
            if len(chosen) < count:
                chosen.add(i)
    return chosen


#: name -> attack, for ``trustgrad attack`` (spoofs that forge from a config and a stolen model take (cfg, target, out))
SPOOFS: dict[str, Callable[..., Path]] = {
    "infinitesimal": infinitesimal_spoof,
    "blindfold-top-q": blindfold_topq_spoof,
    "zhang": zhang_spoof,
    "copy": copy_proof,
    "tamper-checkpoint": tamper_checkpoint,
    "tamper-indices": tamper_indices,
    "recommitted-checkpoint": recommitted_checkpoint,
    "momentum-decoy": momentum_decoy_spoof,
    "partial-interpolation": partial_interpolation_spoof,
}
