"""Run a job end to end and return its result as a value: ``run(RunConfig) -> RunResult``.

Locally, ``run`` spawns the job's processes; under ``torchrun`` it runs this process's rank, and the coordinator
collects what the other ranks reported through the job's store (``trustgrad.reports``: no collective at the end, so a
dead or cut-off rank cannot block it). Either way the coordinator's side writes the run records to ``cfg.out``:
``summary.json`` (one object), ``metrics.jsonl`` (one line per epoch), ``config.json`` and ``model.safetensors``; ranks
that died, were dropped or never reported are named in ``dropped_ranks``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import factories
from .admission import reserve
from .config import RunConfig, config_to_dict
from .data import load_dataset
from .errors import ConfigError, LaunchError
from .launch import RankContext, run_torchrun_rank, spawn, under_torchrun
from .models import build_model
from .patterns import PATTERNS
from .reports import collect, publish
from .resources import estimate_job
from .train import train_rank

__all__ = ["run", "RunResult"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    state: dict[str, torch.Tensor]
    ranks: list[dict[str, Any] | None]
    out: Path | None = None


def run(cfg: RunConfig) -> RunResult:
    """Validate ``cfg``, run the job (spawned locally or as a torchrun rank) and write its records."""
    factories.allow(cfg.model.name, cfg.model.loss, cfg.dataset)  # the caller's own config names them
    pattern = PATTERNS.get(cfg.pattern.name)
    pattern.check(cfg)
    preflight(cfg)
    started = time.perf_counter()
    if under_torchrun():
        world = int(os.environ.get("WORLD_SIZE", "0"))
        if world != pattern.world_size(cfg):
            raise ConfigError(
                f"pattern {cfg.pattern.name!r} with --workers {cfg.workers} needs {pattern.world_size(cfg)} processes, "
                f"but torchrun started {world}"
            )
        exchange = functools.partial(_exchange_reports, cfg)
        ranks = run_torchrun_rank(train_rank, (cfg,), backend=_backend(cfg), timeout=cfg.timeout, then=exchange)
        if ranks is None:  # not the coordinator: it writes the records
            return RunResult({}, [], {}, [])
    else:
        world = pattern.world_size(cfg)
        # the job starts when its estimate fits beside the user's other running jobs (docs/limits.md, "Admission")
        with reserve(estimate_job(cfg, world).total, f"{cfg.pattern.name} x{world}"):
            started = time.perf_counter()  # a wait for memory is not the job's time
            ranks = spawn(
                train_rank,
                world,
                (cfg,),
                backend=_backend(cfg),
                timeout=cfg.timeout,
                may_die=lambda rank: pattern.may_lose(cfg, rank),
            )
    return _finish(cfg, ranks, time.perf_counter() - started)


def preflight(cfg: RunConfig) -> None:
    """Catch bad datasets, models and sizes here, as one clear error, before any process starts."""
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    build_model(cfg.model.name, ds.input_shape, ds.num_classes, cfg.seed, cfg.model)
    _check_augment(cfg, ds.input_shape)
    if cfg.crypto.encrypt == "ckks":  # insecure or impossible parameters fail here, not in a worker
        from .crypto import CKKSParams, Context

        Context(CKKSParams.from_config(cfg.crypto))
        if cfg.crypto.security == "none":
            log.warning(
                "CKKS with --security none: parameters below any security standard (tests and experiments only)"
            )
    if cfg.proof.mode == "record":
        from .proof.writer import check_replaceable

        check_replaceable(Path(cfg.out) / "proof")  # type: ignore[arg-type]
    world = PATTERNS.get(cfg.pattern.name).world_size(cfg)
    for text in cfg.malicious:
        from .attacks.specs import parse_malicious

        if parse_malicious(text).rank >= world:
            raise ConfigError(f"--malicious {text!r} names a rank outside the job's {world} processes")
    shards = PATTERNS.get(cfg.pattern.name).data_shards(cfg)
    shard = len(ds.x_train) // max(1, shards)
    if shard < cfg.batch_size:
        raise ConfigError(
            f"batch_size {cfg.batch_size} is larger than a worker's shard ({shard} samples of {ds.name} over "
            f"{shards} shards); use a smaller --batch-size or fewer --workers"
        )


def _check_augment(cfg: RunConfig, shape: tuple[int, ...]) -> None:
    if cfg.augment == "none":
        return
    if len(shape) != 3:
        raise ConfigError(f"--augment {cfg.augment} crops and flips images; dataset {cfg.dataset!r} has inputs {shape}")


def _backend(cfg: RunConfig) -> str:
    return "nccl" if cfg.device == "cuda" else "gloo"


#: seconds the coordinator waits for the report of a rank its own records already name as dropped (it may still be
#: reachable, finishing alone); every other rank gets the job's --timeout
DROPPED_RANK_GRACE = 5.0


def _exchange_reports(cfg: RunConfig, ctx: RankContext, store: Any, mine: dict[str, Any]) -> list[Any] | None:
    """Under torchrun: a rank reports to the coordinator; the coordinator returns every rank's result (None: none)."""
    if not mine.get("coordinator"):
        publish(store, ctx.rank, mine)
        return None
    pattern = PATTERNS.get(cfg.pattern.name)
    named = _named_dropped(mine.get("stats", {}))
    ranks, refused = collect(store, ctx.world_size, mine, lambda r: DROPPED_RANK_GRACE if r in named else cfg.timeout)
    missing = [r for r, out in enumerate(ranks) if out is None and not pattern.may_lose(cfg, r)]
    if missing:
        why = "; ".join(refused[r] for r in missing if r in refused) or f"none within --timeout {cfg.timeout:g} s"
        raise LaunchError(f"rank {ctx.rank} (coordinator): no usable result from ranks {missing} ({why})")
    for r, out in enumerate(ranks):
        if out is None:
            log.warning("rank %d did not report%s; the records name it", r, f" ({refused[r]})" if r in refused else "")
    return ranks


def _named_dropped(stats: dict[str, Any]) -> set[int]:
    """Ranks the coordinator's own statistics say the run went on without (ps: ``dropped_workers`` are worker
    indices, rank = index + 1; gossip's consensus monitor: ``peers_lost``, and the encrypted ring's
    ``excluded_ranks``: global ranks)."""
    ranks = {int(w) + 1 for w in stats.get("dropped_workers", [])}
    return ranks | {int(r) for r in [*stats.get("peers_lost", []), *stats.get("excluded_ranks", [])]}


def _finish(cfg: RunConfig, ranks: list[dict[str, Any] | None], wall: float) -> RunResult:
    coord = next((r for r in ranks if r and r.get("coordinator")), None)
    if coord is None:
        raise LaunchError("the job ended without a result from its coordinating rank")
    summary: dict[str, Any] = {
        "pattern": cfg.pattern.name,
        "schedule": cfg.pattern.schedule,
        "workers": cfg.workers,
        "world_size": len(ranks),
        "dataset": cfg.dataset,
        "model": cfg.model.name,
        "epochs": cfg.epochs,
        "steps": coord["steps"],
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "optimizer": cfg.optimizer,
        "seed": cfg.seed,
        "final_loss": coord["final_loss"],
        "test_loss": coord["test_loss"],
        "test_accuracy": coord["test_accuracy"],
        "num_params": coord["num_params"],
        "wall_seconds": wall,
        "train_seconds": coord["train_seconds"],
        "bytes_sent": sum(r["bytes_sent"] for r in ranks if r),
        "bytes_sent_per_rank": [r["bytes_sent"] if r else None for r in ranks],
        "encryption": _encryption_label(cfg),
        "proof": cfg.proof.mode if cfg.proof.mode != "none" else "none (updates are not verified)",
        "malicious": list(cfg.malicious),
    }
    for r in ranks:  # pattern and hook statistics; the server's (if any) come first, then the workers'
        if r:
            for key, value in r.get("stats", {}).items():
                summary.setdefault(key, value)
    _sum_crypto_costs(summary, [r for r in ranks if r])
    # dead (no result) or dropped by the pattern though alive: named alike, locally and under torchrun
    dropped = {i for i, r in enumerate(ranks) if r is None} | _named_dropped(coord.get("stats", {}))
    if dropped:
        summary["dropped_ranks"] = sorted(set(summary.get("dropped_ranks", [])) | dropped)
    failure = _replica_report(cfg, summary, ranks)
    state = {k: torch.as_tensor(v) for k, v in coord["state"].items()}
    result = RunResult(summary, coord["metrics"], state, ranks, Path(cfg.out) if cfg.out else None)
    if cfg.out:
        write_records(cfg, result)
    if cfg.tensorboard:
        from .tracking import write_tensorboard

        write_tensorboard(cfg.tensorboard, result.summary, result.metrics)
    if failure:  # after the records: they say why the run failed
        raise LaunchError(failure)
    return result


def _replica_report(cfg: RunConfig, summary: dict[str, Any], ranks: list[dict[str, Any] | None]) -> str | None:
    """Who trained to the end, in the summary of every pattern that survives losses; the failure, if too few did.

    Gossip's coordinator counts the replicas connected to it at the end; when each lost one was first seen late or
    lost comes from every rank's ``peer_events``. The parameter server's replicas are its workers not dropped.
    """
    summary.pop("peer_events", None)  # per rank, in ``RunResult.ranks``; merged below
    if "replicas_final" not in summary:
        if not PATTERNS.get(cfg.pattern.name).tolerates_worker_loss and "dropped_reasons" not in summary:
            return None
        reasons = summary.get("dropped_reasons", {})
        summary["replicas_started"] = cfg.workers
        summary["replicas_final"] = cfg.workers - len(reasons)
        summary["replicas_lost"] = [{"worker": int(w), "reason": why} for w, why in sorted(reasons.items())]
        return None
    lost = sorted(set(range(summary["replicas_started"])) - set(summary["replica_ranks_final"]))
    events = [dict(e, observed_by=r["rank"]) for r in ranks if r for e in r.get("stats", {}).get("peer_events", [])]
    summary["replicas_lost"] = [_first_seen(rank, events, ranks) for rank in lost]
    if summary["replicas_final"] >= summary["min_replicas"]:
        return None
    where = ", ".join(f"rank {e['rank']} at step {e.get('step', '?')}" for e in summary["replicas_lost"])
    summary["failed"] = (
        f"{cfg.pattern.name}: {summary['replicas_final']} of {summary['replicas_started']} replicas trained to the "
        f"end, fewer than --min-replicas {summary['min_replicas']} (lost: {where})"
    )
    return summary["failed"] + (f"; records in {cfg.out}" if cfg.out else "")


def _first_seen(rank: int, events: list[dict[str, Any]], ranks: list[dict[str, Any] | None]) -> dict[str, Any]:
    """When ``rank`` was lost: the step from which a peer stopped hearing it (``step``) and the step that peer gave
    up on it (``lost_step``), the earliest over its peers; else the first step it was seen late."""
    entry: dict[str, Any] = {"rank": rank, "worker": rank, "died": rank < len(ranks) and ranks[rank] is None}
    found = []
    for observer in sorted({e["observed_by"] for e in events}):
        silent = None
        for e in (e for e in events if e["observed_by"] == observer and e["peer"] == rank):
            if e["event"] == "caught-up":
                silent = None
            elif e["event"] == "late" and silent is None:
                silent = e
            elif e["event"] == "lost":
                found.append(((silent or e)["round"], e["round"], observer, e["reason"]))
                break
        else:
            if silent is not None:
                found.append((silent["round"], None, observer, silent["reason"]))
    if found:
        step, lost_step, observer, reason = min(found, key=lambda f: (f[1] is None, f[0]))
        entry.update(step=step, lost_step=lost_step, observed_by=observer, reason=reason)
    return entry


def _encryption_label(cfg: RunConfig) -> str:
    if cfg.crypto.encrypt == "none":
        return "none (updates travel in plaintext)"
    if cfg.crypto.security == "none":
        return f"{cfg.crypto.encrypt} (INSECURE parameters: --security none)"
    return cfg.crypto.encrypt


def _sum_crypto_costs(summary: dict[str, Any], ranks: list[dict[str, Any]]) -> None:
    """Encryption costs are per rank; the summary reports them summed over all ranks."""
    keys = {k for r in ranks for k in r.get("stats", {}) if k.startswith("he_") or k.endswith("_bytes")}
    for key in keys & {"encrypted_bytes", "plaintext_equivalent_bytes"} | {k for k in keys if k.startswith("he_")}:
        summary[key] = sum(r.get("stats", {}).get(key, 0) for r in ranks)
    if summary.get("plaintext_equivalent_bytes"):
        summary["ciphertext_expansion"] = round(summary["encrypted_bytes"] / summary["plaintext_equivalent_bytes"], 2)


def write_records(cfg: RunConfig, result: RunResult) -> None:
    from safetensors.torch import save_file

    out = Path(cfg.out)  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
    (out / "summary.json").write_text(json.dumps(result.summary, indent=2) + "\n")
    with (out / "metrics.jsonl").open("w") as fh:
        for line in result.metrics:
            fh.write(json.dumps(line) + "\n")
    save_file({k: v.contiguous() for k, v in result.state.items()}, os.fspath(out / "model.safetensors"))
    log.info("run records written to %s", out)
