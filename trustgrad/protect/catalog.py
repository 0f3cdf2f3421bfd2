"""The registered protections: for each codec, gate and proof mode, what it needs of a pattern and how it is built.

Implementations are imported when a rank builds them, so checking a job's flags loads no OpenFHE code.
"""

from __future__ import annotations

from typing import Any

from ..config import RunConfig
from ..errors import ConfigError
from . import footprint
from .needs import CODECS, ENCRYPTED_SYNC, GATES, PROOFS, UNSUPPORTED_KEYS, UNSUPPORTED_PROOF, Need, Spec

__all__ = ["check_rule"]

_SYNC = Need(frozenset({"sync-rounds", "no-plaintext-state"}), ENCRYPTED_SYNC, pattern=False)
_PER_CLAIM = Need(frozenset({"per-claim"}), UNSUPPORTED_PROOF)


# ------------------------------------------------------------------ codecs
def _plain_server(comm: Any, cfg: RunConfig, parties: list[int], initial: Any) -> Any:
    from .codecs.plain import PlainServer

    return PlainServer()


def _plain_worker(comm: Any, cfg: RunConfig, parties: list[int], rank: int, initial: Any) -> Any:
    from .codecs.plain import PlainWorker

    return PlainWorker()


def _ckks_server(comm: Any, cfg: RunConfig, parties: list[int], initial: Any) -> Any:
    from .codecs.ckks import SecureServer

    return SecureServer(comm, cfg, parties)


def _ckks_worker(comm: Any, cfg: RunConfig, parties: list[int], rank: int, initial: Any) -> Any:
    from .codecs.ckks import SecureWorker

    return SecureWorker(comm, cfg, parties)


def _audited_server(comm: Any, cfg: RunConfig, parties: list[int], initial: Any) -> Any:
    from .codecs.audited import AuditedServer

    return AuditedServer(comm, cfg, parties)


def _audited_worker(comm: Any, cfg: RunConfig, parties: list[int], rank: int, initial: Any) -> Any:
    from .codecs.audited import AuditedWorker

    return AuditedWorker(comm, cfg, parties)


def _ckks_ring(comm: Any, cfg: RunConfig) -> Any:
    from .codecs.ring import RingCodec

    return RingCodec.for_job(comm, cfg)


def _blind_server(comm: Any, cfg: RunConfig, parties: list[int], initial: Any) -> Any:
    from .codecs.blind import BlindServer

    return BlindServer(comm, cfg, initial)


def _blind_worker(comm: Any, cfg: RunConfig, parties: list[int], rank: int, initial: Any) -> Any:
    from .codecs.blind import BlindWorker

    return BlindWorker(comm, cfg, rank - 1, initial)


def _coordinator_stays(cfg: RunConfig, offers: frozenset[str], pattern: str) -> None:
    """Encrypted, the coordinator evaluates the model for the run's records (ps: worker 0, rank 1; ring: rank 0): it
    must not be one that is excluded."""
    if "excludes-workers" not in offers:
        return
    from ..attacks.specs import WIRE_ATTACKS, parse_malicious

    specs = [parse_malicious(text) for text in cfg.malicious]
    excludable = cfg.proof.mode != "none" or any(s.attack in {*WIRE_ATTACKS, "crafted-key"} for s in specs)
    rank, who = (0, "rank 0") if pattern == "ring" else (1, "worker 0 (rank 1)")
    if excludable and any(s.rank == rank for s in specs):
        raise ConfigError(
            f"--malicious rank={rank} with --encrypt ckks and verification or a crafted-* attack: {who} "
            "evaluates the model for the run's records, and once excluded its copy stops; make another rank malicious"
        )


def _blind_job(cfg: RunConfig, offers: frozenset[str], pattern: str) -> None:
    from .codecs.blind import check_blind_config

    if cfg.crypto.encrypt != "none" and not _SYNC.offers <= offers:  # as every encrypted codec (``_SYNC``)
        raise ConfigError(_SYNC.message.format(pattern=pattern))
    check_blind_config(cfg)
    _coordinator_stays(cfg, offers, pattern)


CODECS.register("plain")(Spec(server=_plain_server, worker=_plain_worker))
CODECS.register("ckks-shared")(
    Spec(
        needs=(Need(frozenset({"codec-payload", "keyless-aggregator"}), UNSUPPORTED_KEYS), _SYNC),
        validate=_coordinator_stays, server=_ckks_server, worker=_ckks_worker, encrypted=True,
        memory=footprint.ckks_codec,
    )
)  # fmt: skip
CODECS.register("ckks-threshold")(
    Spec(
        needs=(Need(frozenset({"codec-payload"}), UNSUPPORTED_KEYS), _SYNC),
        validate=_coordinator_stays, server=_ckks_server, worker=_ckks_worker, peer=_ckks_ring, encrypted=True,
        memory=footprint.ckks_codec,
    )
)  # fmt: skip
CODECS.register("ckks-audited")(  # threshold keys with --proof audit: the auditor encrypts what it admitted
    Spec(
        needs=(Need(frozenset({"codec-payload"}), UNSUPPORTED_KEYS), _SYNC),
        validate=_coordinator_stays, server=_audited_server, worker=_audited_worker, encrypted=True,
        memory=footprint.audited,
    )
)  # fmt: skip
CODECS.register("blind")(
    Spec(
        needs=(_PER_CLAIM,), validate=_blind_job, server=_blind_server, worker=_blind_worker, encrypted=True,
        memory=footprint.blind,
    )
)  # fmt: skip


# ------------------------------------------------------------------ gates
def _audit(comm: Any, cfg: RunConfig, ds: Any, num_params: int, asynchronous: bool, codec: Any) -> Any:
    from .gates.audit import ServerAudit

    return ServerAudit(cfg, ds, cfg.workers, num_params, asynchronous)


def _remote_audit(comm: Any, cfg: RunConfig, ds: Any, num_params: int, asynchronous: bool, codec: Any) -> Any:
    from .gates.cipher_audit import RemoteAudit, ThresholdRemoteAudit

    if cfg.crypto.keys == "threshold":
        return ThresholdRemoteAudit(comm, cfg.seed, cfg.workers, cfg.workers + 1, codec, num_params)
    return RemoteAudit(comm, cfg.seed, cfg.workers, peer=cfg.workers + 1)


def _ciphertext_auditor(comm: Any, cfg: RunConfig, parties: list[int]) -> Any:
    from .gates.cipher_audit import CiphertextAuditor, ThresholdAuditor

    if cfg.crypto.keys == "threshold":
        return ThresholdAuditor(comm, cfg, parties)
    return CiphertextAuditor(comm, cfg, parties)


def _cipher_audit_job(cfg: RunConfig, offers: frozenset[str], pattern: str) -> None:
    if cfg.proof.audit_rate != 1.0:
        raise ConfigError(
            "--proof audit with --encrypt ckks needs --audit-rate 1: every claim is checked before it is "
            "aggregated (nothing encrypted can be rolled back)"
        )
    _stand_in_runs_plain_sync(cfg, frozenset())  # the auditor rank holds no round's plaintext model


def _stand_in_runs_plain_sync(cfg: RunConfig, offers: frozenset[str], pattern: str = "ps") -> None:
    """``--excluded-shard auditor``: the auditor computes an excluded shard's gradient at each round's model."""
    if cfg.proof.excluded_shard == "auditor" and "sync-rounds" not in offers:
        raise ConfigError(
            "--excluded-shard auditor runs plaintext --schedule sync audits: the auditor computes the excluded "
            "shard's gradient at each round's model, which only a synchronous plaintext server holds"
        )


def _blind_gate(comm: Any, cfg: RunConfig, ds: Any, num_params: int, asynchronous: bool, codec: Any) -> Any:
    from .gates.blind import BlindAudit

    return BlindAudit(comm, cfg.seed, list(range(1, cfg.workers + 1)), codec)


def _robust(comm: Any, cfg: RunConfig, ds: Any, num_params: int, asynchronous: bool, codec: Any) -> Any:
    from .gates.robust import RobustGate

    return RobustGate(cfg.aggregate)


def check_rule(cfg: RunConfig, offers: frozenset[str] = frozenset({"sync-rounds"}), pattern: str = "ps") -> None:
    """``--aggregate RULE``: compares the updates of one round, and needs enough of them for its f."""
    from ..robust import parse_aggregate

    rule = parse_aggregate(cfg.aggregate)
    if "sync-rounds" not in offers:
        raise ConfigError(
            f"--aggregate {rule.name} runs under --schedule sync: a robust rule compares the updates of one round, "
            "which asynchronous schedules never hold together"
        )
    problem = rule.needs(cfg.workers)
    if problem is not None:
        raise ConfigError(f"--aggregate: {problem}, and this job has --workers {cfg.workers}")


GATES.register("audit")(Spec(validate=_stand_in_runs_plain_sync, server=_audit))
GATES.register("cipher-audit")(
    Spec(validate=_cipher_audit_job, server=_remote_audit, worker=_ciphertext_auditor, extra_rank=True)
)
GATES.register("blind")(Spec(server=_blind_gate))
GATES.register("robust")(Spec(validate=check_rule, server=_robust))

# ------------------------------------------------------------------ proof modes
PROOFS.register("none")(Spec())
PROOFS.register("record")(Spec(needs=(Need(frozenset({"replicated-steps"}), UNSUPPORTED_PROOF),)))
PROOFS.register("audit")(Spec(needs=(_PER_CLAIM,)))
PROOFS.register("blind")(Spec(needs=(_PER_CLAIM,)))
