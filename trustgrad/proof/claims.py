"""Which manifest claims a verification checks, and which it takes on trust (``verdict.claims``).

A prover writes its whole config into the manifest and may re-commit any change to it. Fields that shape the
trajectory are re-derived or replayed; the others (which pattern carried the gradients, on which device, with how many
threads, encrypted or not, with which malicious workers) leave no trace in a synchronous trajectory that a replay could
test, so a proof says nothing about them. The verdict lists both, so no one reads a passed proof as evidence of a
field it never looked at.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CHECKED", "NOT_CHECKED", "claims_of"]

MAX_CLAIMS = 400  # a crafted manifest may hold many keys; the verdict lists this many at most

#: manifest key (dotted) -> how it is checked
CHECKED: dict[str, str] = {
    "schema": "must be this verifier's schema",
    "seed": "W0 regenerated from it; every batch recomputed from its PRF",
    "k": "checkpoint steps must be every k steps",
    "workers": "every worker's batch recomputed from the PRF; replay averages that many batches",
    "steps": "recomputed from the dataset size, workers, batch size, epochs and max_steps",
    "steps_per_epoch": "recomputed from the dataset size, workers and batch size",
    "checkpoints": "must be every k steps from 0 to the last step",
    "semantics": "must be sync-mean-gradient (the only trajectory a replay reproduces)",
    "config.seed": "must equal the manifest's seed",
    "config.workers": "must equal the manifest's workers",
    "config.proof.k": "must equal the manifest's k",
    "config.dataset": "the verifier's copy must have the committed Merkle root",
    "config.batch_size": "indices shape; replay batches",
    "config.epochs": "as far as it sets the step count, which is recomputed",
    "config.max_steps": "as far as it sets the step count, which is recomputed",
    "config.lr": "replayed; update lower bound",
    "config.momentum": "replayed; momentum buffers checked against the predecessor's replay",
    "config.weight_decay": "replayed",
    "config.optimizer": "replayed with it; its state (momentum, Adam's moments and count) checked against the "
    "predecessor's replay",
    "config.betas": "replayed (adam); must hold Adam's defaults under sgd",
    "config.eps": "replayed (adam); must hold Adam's defaults under sgd",
    "config.model.name": "W0 regenerated; shapes checked; replayed (a user's factory only if the verifier named it)",
    "config.model.loss": "replayed with it (a user's loss only if the verifier named it)",
    "config.augment": "replayed: every worker's crops and flips recomputed from the seed's PRF",
    "config.model.hidden": "W0 regenerated; shapes checked",
    "config.model.depth": "W0 regenerated; shapes checked",
    "training.optimizer": "must be what the config implies; replayed with it",
    "training.loss": "must be the model's own loss; replayed with it",
    "training.schedule": "must be constant at the config's lr",
    "training.batch_size": "must equal the config's",
    "data.merkle_root": "must be the verifier's training set's root",
}

#: manifest key (dotted) -> why it is not checked; any key not listed in either table is reported as not checked
NOT_CHECKED: dict[str, str] = {
    "pattern": "allreduce and ring give the same trajectory: which one carried the gradients is not evidenced",
    "config.pattern": "communication settings leave no trace in a synchronous trajectory",
    "config.device": "replay runs on the verifier's device; where the prover trained is not evidenced",
    "environment.device": "replay runs on the verifier's device; where the prover trained is not evidenced",
    "config.threads": "thread counts change float rounding only (within the thresholds): not evidenced",
    "config.server_threads": "thread counts change float rounding only: not evidenced",
    "environment.threads": "thread counts change float rounding only (within the thresholds): not evidenced",
    "config.crypto": "encryption changes what crossed the wire, not the averaged trajectory: not evidenced",
    "config.malicious": "the replay assumes every worker computed its true gradient; this field is never read",
    "config.proof": "recording settings (besides k) are not part of the trajectory",
    "config.timeout": "not part of the trajectory",
    "config.record_server_view": "not part of the trajectory",
    "config.out": "not part of the trajectory",
    "config.tensorboard": "not part of the trajectory",
    "config.resume": "a resumed run's trajectory is replayed like any other; the flag itself is not read",
    "config.progress": "not part of the trajectory",
    "config.data_dir": "the verifier reads its own copy of the data (--data-dir); only the root is compared",
    "environment": "library versions and platform are informational",
    "randomness": "a description; W0 and batches are recomputed instead",
    "training.aggregation": "a description; replay averages per-worker gradients itself",
    "training.epochs": "the config's epochs are used",
    "training.max_steps": "the config's max_steps are used",
    "data.dataset": "the config's dataset is used",
    "data.n_train": "the verifier's dataset is used",
    "data.x": "the verifier's dataset is used",
    "data.sample_hash": "a description",
    "data.indices": "a description",
    "model.hidden": "the config's model is used",
    "model.depth": "the config's model is used",
    "model.name": "the config's model is used",
    "model.num_classes": "implied by the dataset",
    "model.input_shape": "implied by the dataset",
    "model.num_params": "implied by the model",
    "model.state": "the model's own state spec is used",
}


def claims_of(manifest: dict[str, Any]) -> dict[str, dict[str, str]]:
    """``{"checked": {key: how}, "not_checked": {key: why}}`` over every leaf key the manifest holds."""
    checked: dict[str, str] = {}
    unchecked: dict[str, str] = {}
    for key in _leaves(manifest)[:MAX_CLAIMS]:
        how = _lookup(CHECKED, key)
        if how is not None:
            checked[key] = how
        else:
            unchecked[key] = _lookup(NOT_CHECKED, key) or "not read by the verifier"
    return {"checked": checked, "not_checked": unchecked}


def _leaves(value: Any, prefix: str = "", depth: int = 0) -> list[str]:
    # the manifest was parsed by json with a bounded size; the depth cap keeps a crafted one from recursing far
    if isinstance(value, dict) and value and depth < 4:
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{prefix}{k}.", depth + 1)]
    return [prefix.rstrip(".")] if prefix else []


def _lookup(table: dict[str, str], key: str) -> str | None:
    """The entry of ``key`` or of its nearest listed ancestor (``config.pattern.name`` -> ``config.pattern``)."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        hit = table.get(".".join(parts[:n]))
        if hit is not None:
            return hit
    return None
