"""``tensor``: horizontal model parallelism, each linear layer pair's weights sharded over all ranks.

Job shape: ``--workers W`` tensor-parallel ranks holding one model between them; there is one data shard, and every
rank computes on the same mini-batch (``worker_index`` 0 everywhere). Column-then-row sharding (Shoeybi et al. 2019)
costs one all-reduce per pair forward and one backward, through DTensor (``trustgrad.parallel.tensor``).

Evaluation: at each epoch end every rank all-gathers the sharded weights (``DTensor.full_tensor``) into a plain copy of
the model; the coordinator (rank 0) evaluates and saves it like any other pattern's model.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import RunConfig
from ..data import load_dataset
from ..models import build_model
from ..parallel import account, reject_protections
from ..parallel.tensor import full_state, shard_plan, tensor_parallel, unsharded_copy
from ..replica import Replica
from .base import PATTERNS, Pattern
from .pipeline import refuse_unsplittable


@PATTERNS.register("tensor")
class TensorParallel(Pattern):
    name = "tensor"
    splits_sequential = True

    @classmethod
    def validate(cls, cfg: RunConfig) -> None:
        reject_protections(cfg, cls.name)
        ds = load_dataset(cfg.dataset, cfg.data_dir)
        model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, cfg.seed, cfg.model)
        refuse_unsplittable(cfg, model, cls.name)
        shard_plan(model, cfg.workers)

    @property
    def worker_index(self) -> int:
        return 0  # one data shard: every rank holds a slice of the same model and sees the same batch

    @classmethod
    def data_shards(cls, cfg: RunConfig) -> int:
        return 1  # every rank holds a slice of the model and sees the same batch

    def local_model(self, model: nn.Sequential) -> nn.Module:
        self.plain = unsharded_copy(model)
        self.pairs = [
            (model[int(name)], style)
            for name, style in shard_plan(model, self.comm.world_size).items()
            if type(style).__name__ == "RowwiseParallel"
        ]
        self.row_outputs = sum(layer.out_features for layer, _ in self.pairs)
        device = next(model.parameters()).device.type
        return tensor_parallel(model, self.comm.world_size, device)[0]

    def attach(self, replica: Replica) -> None:
        """Nothing to send: W0 comes from the committed seed and ``parallelize_module`` kept each rank's shard."""

    def step(self, replica: Replica, x: torch.Tensor, y: torch.Tensor) -> float:
        loss = replica.compute_gradients(x, y)
        replica.step()
        # DTensor's collectives bypass Comm; count the forward all-reduce of each row-parallel output (the pairs'
        # backward all-reduces of input gradients are of the same order and are not counted)
        w = self.comm.world_size
        account(self.comm, 2 * (w - 1) / w * len(x) * self.row_outputs * 4, messages=len(self.pairs))
        return loss

    def full_model(self, replica: Replica) -> nn.Module:
        self.plain.load_state_dict(full_state(replica.model))
        return self.plain

    def stats(self) -> dict:
        return {"tensor_parallel_ranks": self.comm.world_size, "sharded_pairs": len(getattr(self, "pairs", ()))}
