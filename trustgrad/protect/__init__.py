"""Protections: codecs, gates and observers a pattern calls (docs/architecture.md §3; the slots are ``slots``).

``build(cfg)`` is the one place that reads ``--encrypt``, ``--keys``, ``--proof`` and ``--aggregate``: it names the
job's codec and gates (``Protections``), which then build their parts on each rank. Which combinations run follows
from what a pattern *offers* (``Pattern.offers``: capabilities such as ``sync-rounds``) and what each protection
*needs* (the registries ``CODECS``, ``GATES``, ``PROOFS``, filled in ``catalog``), not from per-pattern lists:
``check`` refuses a job whose pattern lacks a need, with the need's one-line message.

>>> from trustgrad.config import RunConfig
>>> p = build(RunConfig().replace(crypto={"encrypt": "ckks", "keys": "threshold"}, proof={"mode": "none"}))
>>> p.codec, p.gates, p.encrypted
('ckks-threshold', (), True)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import RunConfig
from ..errors import ConfigError
from . import catalog  # noqa: F401  (registers the protections)
from .needs import CAPABILITIES, CODECS, GATES, PROOFS, Footprint, Need, Spec
from .slots import Batch, Claim, Correction, Gate, Observer, Received, ServerCodec, Verdict, WorkerCodec

__all__ = [
    "build", "check", "key_modes", "Protections", "Footprint", "Need", "Spec", "CODECS", "GATES", "PROOFS",
    "CAPABILITIES",
    "Batch", "Claim", "Correction", "Gate", "Observer", "Received", "ServerCodec", "Verdict", "WorkerCodec",
]  # fmt: skip


@dataclass(frozen=True)
class Protections:
    """A job's protections by name, built into objects on each rank (``server_codec``, ``worker_codec``, ``gates``)."""

    cfg: RunConfig
    codec: str
    gates: tuple[str, ...] = ()
    proof: str = "none"
    parties: tuple[int, ...] = field(default=())

    @property
    def encrypted(self) -> bool:
        """The server holds no plaintext update or model (so worker 0 evaluates and writes the records)."""
        return CODECS.get(self.codec).encrypted

    @property
    def extra_ranks(self) -> int:
        return sum(GATES.get(g).extra_rank for g in self.gates)

    def memory(self, parameters: int) -> Footprint:
        """What this job's protections add to its ranks' peak memory (the launch estimate, ``resources``)."""
        specs = [CODECS.get(self.codec), *(GATES.get(g) for g in self.gates)]
        return sum((s.memory(self.cfg, parameters) for s in specs if s.memory), Footprint())

    def server_codec(self, comm: Any, initial: Any) -> ServerCodec:
        return CODECS.get(self.codec).server(comm, self.cfg, list(self.parties), initial)  # type: ignore[misc]

    def worker_codec(self, comm: Any, rank: int, initial: Any) -> WorkerCodec:
        return CODECS.get(self.codec).worker(comm, self.cfg, list(self.parties), rank, initial)  # type: ignore[misc]

    def peer_codec(self, comm: Any) -> Any:
        """The codec of a pattern without a server (every rank a key party), or None for plaintext."""
        make = CODECS.get(self.codec).peer
        return make(comm, self.cfg) if make is not None else None

    def server_gates(self, comm: Any, ds: Any, num_params: int, asynchronous: bool, codec: ServerCodec) -> list[Gate]:
        """The gates of the server, in the order they screen a round."""
        made = [GATES.get(g).server for g in self.gates]
        return [make(comm, self.cfg, ds, num_params, asynchronous, codec) for make in made]  # type: ignore[misc]

    def serve_extra_rank(self, comm: Any) -> dict[str, Any]:
        """The loop of a protection that runs on a rank of its own (the ciphertext auditor)."""
        (name,) = [g for g in self.gates if GATES.get(g).extra_rank]
        return GATES.get(name).worker(comm, self.cfg, list(self.parties)).serve()  # type: ignore[misc]


def key_modes(offers: frozenset[str]) -> list[str]:
    """The CKKS key modes a pattern offering ``offers`` can carry (what ``trustgrad bench he`` measures)."""
    codecs = {keys: CODECS.get(f"ckks-{keys}") for keys in ("shared", "threshold")}
    return [k for k, spec in codecs.items() if all(n.offers <= offers for n in spec.needs if n.pattern)]


def build(cfg: RunConfig) -> Protections:
    """The job's protections from its flags (the only reader of ``cfg.crypto`` and ``cfg.proof`` for patterns)."""
    # blind verification brings its own codec: claims in the layout its checks read
    codec = "blind" if cfg.proof.mode == "blind" else f"{cfg.crypto.encrypt}-{cfg.crypto.keys}"
    codec = "plain" if codec.startswith("none-") else codec
    gates = [_PROOF_GATES.get((cfg.proof.mode, CODECS.get(codec).encrypted))]
    gates += ["robust"] if cfg.aggregate != "mean" else []
    named = tuple(g for g in gates if g)
    # threshold keys under audit: the auditor encrypts the claims it admitted (protect/codecs/audited.py)
    codec = "ckks-audited" if codec == "ckks-threshold" and "cipher-audit" in named else codec
    parties = list(range(1, cfg.workers + 1))  # the workers hold the keys; under shared keys an auditor rank too
    auditor_holds_key = codec == "ckks-shared" and any(GATES.get(g).extra_rank for g in named)
    parties += [cfg.workers + 1] if auditor_holds_key else []
    return Protections(cfg, codec, named, cfg.proof.mode, tuple(parties))


#: (--proof, encrypted codec) -> the gate that checks claims at the receiver (None: no gate)
_PROOF_GATES = {("audit", False): "audit", ("audit", True): "cipher-audit", ("blind", True): "blind"}


def check(cfg: RunConfig, pattern: Any, catalogue: Mapping[str, frozenset[str]]) -> None:
    """Refuse (``ConfigError``, one line) a job whose ``pattern`` (a ``Pattern`` class) lacks what its protections
    need; ``catalogue``: every registered pattern's name -> what it offers (a refusal names those that could)."""
    p = build(cfg)
    offers = pattern.offers_for(cfg)
    fields = {"encrypt": cfg.crypto.encrypt, "keys": cfg.crypto.keys, "proof": cfg.proof.mode,
              "pattern": pattern.name, "note": pattern.encryption_note}  # fmt: skip
    specs = [CODECS.get(p.codec), PROOFS.get(p.proof), *(GATES.get(g) for g in p.gates)]
    for spec in specs:  # the pattern's kind first (the refusal names who could), then this job's shape
        _refuse_missing([n for n in spec.needs if n.pattern], offers, fields, catalogue)
    for spec in specs:
        _refuse_missing([n for n in spec.needs if not n.pattern], offers, fields, catalogue)
        if spec.validate is not None:
            spec.validate(cfg, offers, pattern.name)


def _refuse_missing(
    needs: list[Need], offers: frozenset[str], fields: dict[str, Any], catalogue: Mapping[str, frozenset[str]]
) -> None:
    for need in needs:
        if not need.offers <= offers:
            able = [name for name, theirs in catalogue.items() if need.offers <= theirs]
            raise ConfigError(need.message.format(**fields, able=", ".join(able) or "none yet"))
