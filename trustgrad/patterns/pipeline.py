"""``pipeline``: vertical model parallelism, the model's layers cut into stages on consecutive ranks.

Job shape: ``--workers W`` ranks, ``--stages S`` (S divides W). With W = S there is one pipeline and one data shard:
every stage sees the same mini-batch, cut into ``--microbatches M`` and run by ``--pipeline-schedule gpipe|1f1b``.
With W = R*S the job is data x pipeline: R replicas of the S-stage pipeline on ranks r*S .. r*S+S-1, each on its own
data shard, whose stage-s ranks average gradients with one all-reduce per step (Narayanan et al. 2021, PTD-P, sec. 2).

Evaluation: at each epoch end every stage of replica 0 sends its weights to rank 0 (the coordinator), which holds the
whole model (its own stage shares modules with it) and evaluates and saves it like any other pattern's model.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ..config import RunConfig
from ..data import load_dataset
from ..errors import ConfigError
from ..models import build_model, splittable
from ..parallel import account, reject_protections
from ..parallel.pipeline import SCHEDULES, Pipeline
from ..parallel.split import balanced_split, check_split_points, split_model
from ..replica import Replica
from .base import PATTERNS, Pattern


def refuse_unsplittable(cfg: RunConfig, model: nn.Module, pattern: str) -> None:
    """One line, before launch, for a model a split cannot take (``models.splittable``)."""
    why = splittable(model)
    if why is not None:
        raise ConfigError(
            f"pattern {pattern!r} cannot split model {cfg.model.name!r}: {why}; train it with a data-parallel "
            "pattern (allreduce, ring, ps, gossip, local-sgd)"
        )


def num_stages(cfg: RunConfig) -> int:
    """``--stages``, or one stage per rank when it is left at 0."""
    return cfg.pattern.stages or cfg.workers


def stage_cuts(cfg: RunConfig, model: nn.Sequential) -> tuple[int, ...]:
    p = cfg.pattern
    if p.split_points:
        return check_split_points(model, p.split_points, num_stages(cfg))
    return balanced_split(model, num_stages(cfg))


@PATTERNS.register("pipeline")
class PipelineParallel(Pattern):
    name = "pipeline"
    splits_sequential = True

    @classmethod
    def validate(cls, cfg: RunConfig) -> None:
        reject_protections(cfg, cls.name)
        p, stages = cfg.pattern, num_stages(cfg)
        if stages < 2:
            raise ConfigError(f"a pipeline needs --stages >= 2, got {stages}")
        if cfg.workers % stages:
            raise ConfigError(
                f"--workers {cfg.workers} must be a multiple of --stages {stages} "
                "(workers = stages x data-parallel replicas)"
            )
        if p.microbatches < 1 or cfg.batch_size % p.microbatches:
            raise ConfigError(f"--microbatches {p.microbatches} must divide --batch-size {cfg.batch_size}")
        SCHEDULES.get(p.pipeline_schedule)
        ds = load_dataset(cfg.dataset, cfg.data_dir)
        model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, cfg.seed, cfg.model)
        refuse_unsplittable(cfg, model, cls.name)
        stage_cuts(cfg, model)

    @property
    def stages(self) -> int:
        return num_stages(self.cfg)

    @property
    def worker_index(self) -> int:
        return self.comm.rank // self.stages  # the replica: its S stages share one data shard

    @classmethod
    def data_shards(cls, cfg: RunConfig) -> int:
        return cfg.workers // num_stages(cfg)  # each pipeline replica has one shard

    def local_model(self, model: nn.Sequential) -> nn.Module:
        self.full, self.stage_index = model, self.comm.rank % self.stages
        self.cuts = stage_cuts(self.cfg, model)
        self.stage_modules = split_model(model, self.cuts)
        pipes, self.dp_group = self._groups()
        self.pipeline = Pipeline(
            self.stage_modules[self.stage_index],
            self.stage_index,
            self.stages,
            self.cfg.pattern.microbatches,
            self.cfg.pattern.pipeline_schedule,
            group=pipes,
            device=next(model.parameters()).device,
        )
        return self.stage_modules[self.stage_index]

    def _groups(self) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
        """This rank's pipeline group and data-parallel group (every rank creates every group, in one order)."""
        replicas = self.num_workers
        if replicas == 1:
            return None, None
        timeout = timedelta(seconds=self.cfg.timeout)
        pipes = [
            dist.new_group(list(range(r * self.stages, (r + 1) * self.stages)), timeout=timeout)
            for r in range(replicas)
        ]
        dps = [
            dist.new_group(list(range(s, self.cfg.workers, self.stages)), timeout=timeout) for s in range(self.stages)
        ]
        return pipes[self.worker_index], dps[self.stage_index]

    def attach(self, replica: Replica) -> None:
        """Nothing to send: every rank built W0 from the committed seed, so its stage already holds its slice."""

    def step(self, replica: Replica, x: torch.Tensor, y: torch.Tensor) -> float:
        replica.model.train()
        replica.optimizer.zero_grad(set_to_none=False)
        before = self.pipeline.bytes_sent
        loss = self.pipeline.step(x, y)
        account(self.comm, self.pipeline.bytes_sent - before, messages=2 * self.cfg.pattern.microbatches)
        if self.dp_group is not None:  # data x pipeline: average this stage's gradient over the replicas
            flat = replica.flat_grad()
            dist.all_reduce(flat, group=self.dp_group)
            replica.set_flat_grad(flat.div_(self.num_workers))
            account(self.comm, 2 * (self.num_workers - 1) / self.num_workers * flat.numel() * flat.element_size())
        replica.step()
        # every stage reports the batch loss (hooks and logs see it); the last stage computed it
        value = torch.tensor([loss if loss is not None else 0.0])
        last = self.worker_index * self.stages + self.stages - 1
        dist.broadcast(value, src=last, group=self.pipeline.group)
        if self.comm.rank == last:
            account(self.comm, value.element_size())
        return float(value)

    def full_model(self, replica: Replica) -> nn.Module:
        """Replica 0's stages send their weights to rank 0, which loads them into its whole model."""
        if self.worker_index != 0:
            return replica.model
        if self.stage_index != 0:
            self.comm.send(parameters_to_vector(replica.model.parameters()).detach(), dst=0)
            return replica.model
        for s in range(1, self.stages):
            params = list(self.stage_modules[s].parameters())
            flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype)
            self.comm.recv(flat, src=s)
            with torch.no_grad():
                vector_to_parameters(flat, params)
        return self.full

    def stats(self) -> dict:
        p = self.cfg.pattern
        return {
            "stages": self.stages,
            "microbatches": p.microbatches,
            "pipeline_schedule": p.pipeline_schedule,
            "split_points": list(getattr(self, "cuts", ())),
            "data_parallel_replicas": self.num_workers,
        }
