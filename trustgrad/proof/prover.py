"""The prover: a training hook that records a Proof-of-Learning while any pattern trains (``--proof record``).

Protocol (Jia et al. 2021, Alg. 1, hardened):

1. At the start the coordinator (the rank whose replica is the job's model) snapshots W0 — which the verifier will
   regenerate from the committed seed, so it is not the prover's choice.
2. After every k-th step it snapshots the full state (model state_dict with buffers, momentum buffers, RNG state).
   Snapshots are cheap copies on the training thread, into the memory of a snapshot already written when there is
   one (no fresh pages to fault in); serialisation (safetensors, streamed tensor by tensor), hashing
   (SHA-256) and disk writes run on a background thread at a lower priority, fed through a queue of two snapshots
   (when it is full, and at the end, the training thread writes what is queued itself rather than wait for a thread
   the scheduler may starve), so recording costs the training loop little (the reference's synchronous torch.save
   cost 24-32% of training time).
3. It records its own batch indices as it trains and, at the end, every other worker's from the PRF
   (``seeding.batch_indices``: they are recomputable by construction; the verifier checks all of them against it).
4. At the end it writes the manifest (config with every hyperparameter, seed, k, data commitment, library versions,
   thread count) and the indices, and commits to all files with one Merkle root, before any verifier picks a segment.

Only the coordinator writes; the other ranks' hooks do nothing, so recording adds no communication.
"""

from __future__ import annotations

import logging
import os
import platform
import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__ as trustgrad_version
from ..config import RunConfig, config_to_dict
from ..data import BatchPlan, Dataset
from ..errors import ConfigError
from ..launch import RankContext
from ..optim import Hyper, loss_name
from ..train import HOOKS, StepEvent, WorkerState
from .commit import dataset_root
from .format import SCHEMA, capture_state
from .replay import optimizer_state_spec
from .writer import FileImage, ProofWriter

__all__ = ["ProofRecorder", "PROOF_DIR", "build_manifest"]

log = logging.getLogger(__name__)
PROOF_DIR = "proof"
_Snapshot = tuple[int, dict[str, torch.Tensor], FileImage | None]  # step, state, the file image it was taken into


class ProofRecorder:
    """Hook recording the coordinator's trajectory every ``cfg.proof.k`` steps into ``OUT/proof``."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.k = cfg.proof.k
        self.active = False
        # bounded: snapshots do not pile up behind a writer that falls behind (90 MB each at ResNet-18 size); the
        # training thread writes one itself when the queue is full
        self._queue: queue.Queue[_Snapshot | None] = queue.Queue(maxsize=2)
        # file images of snapshots already written, whose memory the next snapshot reuses: at most as many as were
        # ever in flight at once (the queue's two and the one being written), which the run held at its peak anyway
        self._spare: queue.SimpleQueue[FileImage] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._last = -1
        self.hook_seconds = 0.0  # time this hook takes on the training thread (snapshots, index copies, finalising)
        self.writer_cpu_seconds = 0.0  # CPU time of the writer thread
        self._data_root: str | None = None  # the manifest's dataset commitment, computed by the writer thread

    # ------------------------------------------------------------------ hook interface
    def on_start(self, state: WorkerState) -> None:
        self.active = state.ctx.rank == state.pattern.coordinator and state.worker is not None
        if not self.active:
            return
        self.writer = ProofWriter(Path(self.cfg.out) / PROOF_DIR)  # type: ignore[arg-type]
        self.own = np.zeros((state.total_steps, self.cfg.batch_size), dtype=np.int64)
        # the optimizer's state appears at its first step: the writer allocates its copy ahead (below, ``_write``)
        params = {n: (tuple(p.shape), p.dtype) for n, p in state.replica.model.named_parameters() if p.requires_grad}
        hyper = Hyper.from_config(self.cfg, loss_name(state.replica.model))
        self._optimizer_spec = optimizer_state_spec(hyper, params)
        self._thread = threading.Thread(target=self._drain, args=(state.dataset,), name="proof-writer", daemon=True)
        self._thread.start()
        self._snapshot(state, 0)

    def on_step(self, state: WorkerState, event: StepEvent) -> None:
        if not self.active:
            return
        started = time.perf_counter()
        self.own[event.step] = event.indices
        done = event.step + 1
        if done % self.k == 0 or done == state.total_steps:
            self._snapshot(state, done)
        self.hook_seconds += time.perf_counter() - started

    def on_end(self, state: WorkerState) -> dict[str, Any]:
        if not self.active:
            return {}
        started = time.perf_counter()
        steps = self._last
        # what the writer has not started is written here, at the training thread's priority (as in ``_snapshot``):
        # only the checkpoint it is writing now is waited for
        while (item := self._take()) is not None:
            self.writer.add_checkpoint(*item)  # the last ones: no later snapshot reuses their memory
        self._queue.put(None)
        self._thread.join()
        while not self._spare.empty():  # the run's state copies are not needed any more
            self._spare.get_nowait()
        if self._error is not None:
            raise self._error
        indices = self._all_indices(state, steps)
        semantics = "sync-mean-gradient" if _is_gradient_averaging(state) else self.cfg.pattern.name
        manifest = build_manifest(
            self.cfg,
            state.dataset,
            state.replica.model,
            state.pattern.num_workers,
            steps,
            state.steps_per_epoch,
            semantics,
            data_root=self._data_root,
        )
        root = self.writer.finish(manifest, indices)
        log.info("proof written to %s (root %s)", self.writer.root, root[:16])
        return {
            "proof_dir": str(self.writer.root),
            "proof_root": root,
            "proof_checkpoints": len(self.writer.digests),
            "proof_checkpoints_from_image": self.writer.from_image,
            "proof_finalize_seconds": time.perf_counter() - started,
            "proof_hook_seconds": self.hook_seconds + time.perf_counter() - started,
            "proof_writer_cpu_seconds": self.writer_cpu_seconds,
        }

    # ------------------------------------------------------------------ internals
    def _snapshot(self, state: WorkerState, step: int) -> None:
        if step == self._last:
            return
        if self._error is not None:
            raise self._error
        image = None if self._spare.empty() else self._spare.get_nowait()  # only this thread takes from it
        into = None if image is None else image.tensors
        item = (step, capture_state(state.replica.model, state.replica.optimizer, into=into), image)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            # the writer is behind (its low priority loses to whatever else runs on the machine): write here instead
            # of waiting for it, so training never waits on a thread the scheduler starves
            self._write(*item)
        self._last = step

    def _write(self, step: int, snapshot: dict[str, torch.Tensor], image: FileImage | None) -> None:
        self.writer.add_checkpoint(step, snapshot, image)
        if image is None or not image.holds(snapshot):
            # the first snapshot (checkpoint 0, no optimizer state yet) was a fresh copy: the next ones go into a
            # file image of the full state, allocated (its pages touched) here, off the training thread
            spec = {k: (tuple(v.shape), v.dtype) for k, v in snapshot.items()}
            image = FileImage({**spec, **{k: v for k, v in self._optimizer_spec.items() if k not in spec}})
        # written and hashed: nothing reads this copy any more, so the next snapshot may overwrite it (only now: a
        # copy overwritten while it is being written would put a state training never had into the proof)
        self._spare.put(image)

    def _take(self) -> _Snapshot | None:
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    def _drain(self, dataset: Dataset) -> None:
        _yield_to_training()
        cpu = time.thread_time()
        try:
            # the training set's Merkle root (a hash of every sample) is the same at the end as now: computed here,
            # while training runs, instead of on the training thread when it finalises the proof
            self._data_root = dataset_root(dataset.x_train.cpu(), dataset.y_train.cpu())
        except BaseException as exc:  # surfaced on the training thread at the next snapshot or at the end
            self._error = exc
        self.writer_cpu_seconds += time.thread_time() - cpu
        while (item := self._queue.get()) is not None:
            if self._error is None:
                cpu = time.thread_time()
                try:
                    self._write(*item)
                except BaseException as exc:  # surfaced on the training thread at the next snapshot or at the end
                    self._error = exc
                # CPU, not wall time: a starved thread's waiting costs nobody; bench scale reports this beside the
                # end-to-end overhead, which a shared machine's load blurs
                self.writer_cpu_seconds += time.thread_time() - cpu

    def _all_indices(self, state: WorkerState, steps: int) -> np.ndarray:
        """[steps, workers, batch]: this worker's as recorded, the others' recomputed from the PRF."""
        plan = BatchPlan(len(state.dataset.x_train), state.pattern.num_workers, self.cfg.seed, self.cfg.batch_size)
        out = plan.all_indices(steps)
        out[:, state.worker] = self.own[:steps]
        return out


def _yield_to_training() -> None:
    """Lower this (writer) thread's scheduling priority: on a machine whose cores the ranks keep busy, hashing and
    writing then fill the moments ranks wait on each other instead of delaying their steps (Linux: a thread's nice)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + 10)
    except (AttributeError, OSError):  # no per-thread priority here: the writer runs at the ranks' priority
        pass


def build_manifest(
    cfg: RunConfig,
    ds: Dataset,
    model: nn.Module,
    workers: int,
    steps: int,
    steps_per_epoch: int,
    semantics: str = "sync-mean-gradient",
    data_root: str | None = None,
) -> dict[str, Any]:
    """Everything the verifier needs besides the data: the proof carries its own hyperparameters, seeds and versions.

    ``data_root``: ``dataset_root`` of ``ds``'s training set when the caller computed it already."""
    return {
        "schema": SCHEMA,
        "seed": cfg.seed,
        "k": cfg.proof.k,
        "config": config_to_dict(cfg),
        "pattern": cfg.pattern.name,
        "semantics": semantics,
        "workers": workers,
        "steps": steps,
        "steps_per_epoch": steps_per_epoch,
        "model": {
            "name": cfg.model.name,
            "hidden": cfg.model.hidden,
            "depth": cfg.model.depth,
            "input_shape": list(ds.input_shape),
            "num_classes": ds.num_classes,
            "num_params": sum(p.numel() for p in model.parameters()),
            "state": {k: [list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()},
        },
        "training": {
            **Hyper.from_config(cfg, loss_name(model)).as_manifest(),
            "schedule": {"name": "constant", "lr": cfg.lr},
            "aggregation": "mean of per-worker gradients (equal batches)",
            "batch_size": cfg.batch_size,
            "epochs": cfg.epochs,
            "max_steps": cfg.max_steps,
        },
        "data": {
            "dataset": ds.name,
            "n_train": len(ds.x_train),
            "x": [str(ds.x_train.dtype), list(ds.x_train.shape)],
            "sample_hash": "blake2b-256(dtype|shape|label dtype + raw bytes + label bytes)",
            "merkle_root": data_root if data_root is not None else dataset_root(ds.x_train.cpu(), ds.y_train.cpu()),
            "indices": "int64 [steps, workers, batch]; coordinator's recorded, others' recomputed from the PRF",
        },
        "randomness": {
            "init": "build_model(seed): torch seeded with PRF(seed, 'init')",
            "order": "seeding.batch_indices: PRF(seed, 'order', worker, epoch)",
            "augment": f"{cfg.augment}: trustgrad.augment, PRF(seed, 'augment', worker, step) per sample position",
            "rng_state": "torch RNG state in every checkpoint (rng/torch)",
        },
        "environment": {
            "trustgrad": trustgrad_version,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "threads": cfg.threads,
            "device": cfg.device,
        },
    }


def _is_gradient_averaging(state: WorkerState) -> bool:
    from ..patterns.base import GradientAveraging

    return isinstance(state.pattern, GradientAveraging)


@HOOKS.register("proof")
def _factory(cfg: RunConfig, ctx: RankContext) -> ProofRecorder | None:
    if cfg.proof.mode != "record":
        return None
    if not cfg.out:
        raise ConfigError("--proof record writes OUT/proof: pass --out DIR")
    return ProofRecorder(cfg)
