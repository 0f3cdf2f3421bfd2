"""The ``--malicious`` specs: every attack's name and default strength, and the parser.

``--malicious rank=R,attack=A[,from-step=N][,strength=S]`` names an attack implemented higher up: a poisoning
wrapper (:mod:`.poisoning`, :mod:`.colluding`, :mod:`.backdoor`) or a rogue key party (``secure.rogue``, which
registers how each of ``KEY_ATTACK_NAMES`` behaves). The names are declared here, below ``config``, which checks every
spec where it is given (docs/architecture.md §2).

>>> parse_malicious("rank=2,attack=scale,from-step=5")
MaliciousSpec(rank=2, attack='scale', from_step=5, strength=10.0)
>>> parse_malicious("rank=1,attack=rogue-key-cancel").strength
1.0
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

__all__ = [
    "MaliciousSpec",
    "parse_malicious",
    "colluding_specs",
    "POISONINGS",
    "WIRE_ATTACKS",
    "KEY_ATTACK_NAMES",
    "COLLUDING_ATTACKS",
]

#: attack -> default strength
POISONINGS: dict[str, float] = {
    "sign-flip": 4.0,
    "noise": 10.0,
    "scale": 10.0,
    "label-flip": 1.0,
    "free-rider": 1.0,
    "random-batch": 1.0,
    "forged-proof": 10.0,
    "crafted-ciphertext": 1.0,
    "crafted-partial": 1.0,
    "equivocate-partial": 1.0,
    "false-report": 1.0,
    "split-claim": 1.0,
    "steer": 2.9e-4,
    "owner-poison": 1.0,
}
# the colluding omniscient attacks and the backdoor (attacks.colluding): strength = ALIE's z (0: the paper's z_max),
# IPM's epsilon, the backdoor's boost
POISONINGS.update({"alie": 0.0, "ipm": 0.1, "min-max": 1.0, "min-sum": 1.0, "backdoor": 1.0})
#: attacks on the bytes a worker sends -> the payload kind they craft
WIRE_ATTACKS = {
    "crafted-ciphertext": "ciphertext",
    "crafted-partial": "partial",
    "equivocate-partial": "partial",
    "false-report": "partial",
    "split-claim": "digest",
}
#: key-party attacks (threshold key set-up; the gradient stays honest): ``secure.rogue.KEY_ATTACKS`` holds how each
#: party behaves
KEY_ATTACK_NAMES = ("crafted-key", "rogue-key-chain", "rogue-key-cancel", "rogue-key-equivocate")


@dataclass(frozen=True)
class MaliciousSpec:
    rank: int
    attack: str
    from_step: int = 0
    strength: float = 1.0


def parse_malicious(text: str) -> MaliciousSpec:
    """Parse ``rank=R,attack=A[,from-step=N][,strength=S]``; any problem is a one-line ``ConfigError``."""
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"malformed --malicious {text!r}: expected rank=R,attack=A[,from-step=N][,strength=S]")
        fields[key.strip()] = value.strip()
    unknown = sorted(set(fields) - {"rank", "attack", "from-step", "strength"})
    if unknown:
        raise ConfigError(f"malformed --malicious {text!r}: unknown field {unknown[0]!r}")
    if "rank" not in fields or "attack" not in fields:
        raise ConfigError(f"malformed --malicious {text!r}: rank= and attack= are required")
    attack = fields["attack"]
    known = {**POISONINGS, **dict.fromkeys(KEY_ATTACK_NAMES, 1.0)}
    if attack not in known:
        raise ConfigError(f"unknown malicious attack {attack!r} (known: {', '.join(sorted(known))})")
    try:
        rank, from_step = int(fields["rank"]), int(fields.get("from-step", "0"))
        strength = float(fields.get("strength", known[attack]))
    except ValueError:
        raise ConfigError(
            f"malformed --malicious {text!r}: rank and from-step are integers, strength a number"
        ) from None
    if rank < 0 or from_step < 0:
        raise ConfigError(f"malformed --malicious {text!r}: rank and from-step must be >= 0")
    return MaliciousSpec(rank, attack, from_step, strength)


#: the attacks that collude in a round (``attacks.colluding``)
COLLUDING_ATTACKS = ("alie", "ipm", "min-max", "min-sum", "backdoor")


def colluding_specs(specs: tuple[str, ...]) -> list[MaliciousSpec]:
    """The ``--malicious`` specs that name a colluding attack (``attacks.colluding``), parsed (one-line errors)."""
    return [spec for spec in map(parse_malicious, specs) if spec.attack in COLLUDING_ATTACKS]
