"""Model parallelism: split the model, not the data (docs/architecture.md §2).

``pipeline``: vertical split, a pipeline of layer stages on consecutive ranks fed micro-batches (GPipe, 1F1B).
``tensor``: horizontal split, the weight matrices of linear layers sharded across ranks (Megatron-LM pairs).
``split``: where to cut a model into stages. The patterns ``pipeline`` and ``tensor`` (``trustgrad.patterns``) are
thin adapters over these.

Under model parallelism every rank of a pipeline (or every tensor-parallel rank) sees the same mini-batch: the job has
one data shard per model replica, and ``--workers`` counts ranks, not data shards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..comm import Comm
    from ..config import RunConfig

__all__ = ["reject_protections", "account"]


def reject_protections(cfg: RunConfig, pattern: str) -> None:
    """Proofs, encryption and attacks protect data-parallel updates; a model-parallel rank sends activations."""
    used = [
        flag
        for flag, on in (
            ("--proof", cfg.proof.mode != "none"),
            ("--encrypt", cfg.crypto.encrypt != "none"),
            ("--malicious", bool(cfg.malicious)),
            ("--record-server-view", cfg.record_server_view),
        )
        if on
    ]
    if used:
        raise ConfigError(
            f"pattern {pattern!r} splits the model across ranks; {used[0]} protects data-parallel updates and is "
            "not supported with it (use a data-parallel pattern, e.g. allreduce)"
        )


def account(comm: Comm, nbytes: float, messages: int = 1) -> None:
    """Count bytes an engine sent outside ``Comm`` (pipelining's point-to-point, DTensor's collectives)."""
    comm.bytes_sent += int(nbytes)
    comm.messages_sent += messages
