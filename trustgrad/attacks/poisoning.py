"""Malicious workers: wrappers around an honest worker's replica (a malicious worker wraps an honest one:
docs/architecture.md §3).

``--malicious rank=R,attack=A[,from-step=N][,strength=S]`` makes rank R push poisoned updates from step N on. The
wrapper changes only what the attack changes; the pattern, codec and prover around it are the honest code.

| attack | what the worker does | literature |
|---|---|---|
| ``sign-flip`` | pushes ``-S * g`` (S = 4: boosted, as local-model poisoning does) | Fang et al. 2020 |
| ``noise`` | pushes ``g + N(0, (S * rms(g))^2)`` with S = 10 | Blanchard et al. 2017 (Gaussian Byzantine) |
| ``scale`` | pushes ``S * g`` with S = 10 | model replacement, Bagdasaryan et al. 2020 |
| ``label-flip`` | trains on labels ``C - 1 - y`` | data poisoning, Tolpegin et al. 2020 |
| ``free-rider`` | pushes its previous update again (a stale copy; zeros at first) without computing | Lin et al. 2019 |
| ``random-batch`` | an honest gradient on a batch other than the one the PRF assigns | PoL data order |
| ``forged-proof`` | pushes ``noise`` but claims (commits to) the honest gradient of its assigned batch | PoL spoofing |
| ``crafted-ciphertext`` | ``--encrypt ckks``: its ciphertexts carry a crafted OpenFHE modulus, valid CRC | wire.md |
| ``crafted-partial`` | ``--encrypt ckks --keys threshold``: likewise its partial decryptions | docs/wire.md |
| ``equivocate-partial`` | ``crafted-partial`` to the workers, its honest one to the ps server | docs/wire.md |
| ``false-report`` | ps, threshold keys: reports every other worker's valid partial invalid | docs/wire.md |
| ``split-claim`` | ps, threshold audits: its digest at the server is not of the claim the auditor gets | docs/wire.md |
| ``owner-poison`` | shifts its own labels ``y -> (y + S) mod C`` before training and encrypting them | data owner |
| ``steer`` | pushes ``g + S |g| u``, ``u`` toward a patch backdoor (S = 2.9e-4) | BadNets; :mod:`.backdoor` |

The ``crafted-*`` attacks and the two that game ps's settling of a round's decryption act on bytes and reports, not
gradients (``wire_tamper``): the modulus is the field that, on
OpenFHE 1.6.1, aborted a receiver that parsed it (``std::terminate`` from a ``noexcept`` path).

>>> parse_malicious("rank=2,attack=scale,from-step=5")
MaliciousSpec(rank=2, attack='scale', from_step=5, strength=10.0)
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..replica import Replica
from ..seeding import derive_seed
from .specs import COLLUDING_ATTACKS, POISONINGS, WIRE_ATTACKS, MaliciousSpec, colluding_specs, parse_malicious

__all__ = [
    "MaliciousSpec",
    "parse_malicious",
    "colluding_specs",
    "MaliciousReplica",
    "POISONINGS",
    "WIRE_ATTACKS",
    "wire_tamper",
    "owner_labels",
]

log = logging.getLogger(__name__)


class MaliciousReplica(Replica):
    """An honest replica whose gradient (or training labels, or batch) an attack rewrites."""

    def __init__(self, honest: Replica, spec: MaliciousSpec, x_pool: torch.Tensor, y_pool: torch.Tensor, seed: int):
        super().__init__(honest.model, honest.optimizer, honest.loss_fn)
        self.spec = spec
        self._x_pool, self._y_pool = x_pool, y_pool
        self._gen = torch.Generator().manual_seed(derive_seed(seed, "malicious", spec.rank))
        self._calls = 0
        self._previous: torch.Tensor | None = None
        self.num_classes = int(y_pool.max()) + 1

    @property
    def active(self) -> bool:
        return self._calls - 1 >= self.spec.from_step

    def compute_gradients(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """The honest computation (on flipped labels or a foreign batch for the data attacks), then the gradient the
        attack wants in ``p.grad``: every pattern (gradient pushers and local steppers alike) uses the poisoned one."""
        self._calls += 1
        self._batch = x
        if self.active and self.spec.attack == "label-flip":
            y = self.num_classes - 1 - y
        elif self.active and self.spec.attack == "owner-poison":
            y = (y + int(self.spec.strength)) % self.num_classes
        elif self.active and self.spec.attack == "random-batch":
            idx = torch.randint(0, len(self._x_pool), (len(x),), generator=self._gen)
            x, y = self._x_pool[idx], self._y_pool[idx]
        loss = super().compute_gradients(x, y)
        g = self.flat_grad()
        if self.active and self.spec.attack in _REWRITES:
            g = _REWRITES[self.spec.attack](self, g)
            self.set_flat_grad(g)
        self._previous = g.clone()
        return loss


def _noise(r: MaliciousReplica, g: torch.Tensor) -> torch.Tensor:
    rms = g.pow(2).mean().sqrt().clamp_min(1e-8)
    return g + r.spec.strength * rms * torch.randn(g.shape, generator=r._gen, dtype=g.dtype)


#: gradient rewrites of the model-poisoning attacks (label-flip and random-batch poison the data instead)
_REWRITES = {
    "sign-flip": lambda r, g: -r.spec.strength * g,
    "scale": lambda r, g: r.spec.strength * g,
    "noise": _noise,
    "forged-proof": _noise,  # what it pushes; its claim says "honest gradient of my batch", which replay refutes
    "free-rider": lambda r, g: r._previous.clone() if r._previous is not None else torch.zeros_like(g),
    "steer": lambda r, g: _steer(r, r._batch, g, r.spec.strength),
}


def _steer(r: MaliciousReplica, x: torch.Tensor, g: torch.Tensor, strength: float) -> torch.Tensor:
    from .backdoor import steer

    return steer(r, x, g, strength)


def owner_labels(specs: tuple[str, ...], rank: int, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The labels rank ``rank`` holds as a data owner (what it encrypts for blind checks): shifted under
    ``owner-poison``, else its true ones. Blind checks compare claims with these samples, so they cannot see it."""
    for text in specs:
        spec = parse_malicious(text)
        if spec.rank == rank and spec.attack == "owner-poison":
            return (y + int(spec.strength)) % num_classes
    return y


def wrap_replica(
    replica: Replica, specs: tuple[str, ...], rank: int, x: torch.Tensor, y: torch.Tensor, seed: int, cfg=None
) -> Replica:
    """The replica rank ``rank`` trains with: the honest one, or a malicious wrapper if a spec names this rank."""
    for text in specs:
        spec = parse_malicious(text)
        if spec.rank == rank:
            log.warning("rank %d is malicious: %s from step %d", rank, spec.attack, spec.from_step)
            if cfg is not None and spec.attack in COLLUDING_ATTACKS:
                from .colluding import colluding_replica

                return colluding_replica(replica, spec, cfg, x, y)
            return MaliciousReplica(replica, spec, x, y, seed)
    return replica


def wire_tamper(specs: tuple[str, ...], rank: int) -> Callable[[str, bytes], bytes] | None:
    """For a rank with a ``crafted-*`` attack: ``tamper(kind, payload)`` -> the payload it sends instead (from its
    ``from-step``-th payload of that kind on); ``None`` for every other rank."""
    for text in specs:
        spec = parse_malicious(text)
        if spec.rank == rank and spec.attack in WIRE_ATTACKS:
            log.warning("rank %d is malicious: %s from payload %d", rank, spec.attack, spec.from_step)
            return _Tamper(spec.attack, spec.from_step)
    return None


class _Tamper:
    def __init__(self, attack: str, from_step: int) -> None:
        self.attack, self.kind, self.from_step, self.seen = attack, WIRE_ATTACKS[attack], from_step, 0

    @property
    def active(self) -> bool:
        return self.seen > self.from_step

    def __call__(self, kind: str, payload: bytes) -> bytes:
        if kind != self.kind:
            return payload
        self.seen += 1
        if self.attack == "split-claim" and self.active:  # any other claim's digest: one bit suffices
            return bytes([payload[0] ^ 1]) + payload[1:]
        crafts = self.attack in ("crafted-ciphertext", "crafted-partial", "equivocate-partial")
        return craft_modulus(payload) if crafts and self.active else payload

    def shows(self, honest: bytes, sent: bytes) -> bytes:
        """The partial it shows the ps server when accused (``sent``: what it sent the other workers)."""
        return honest if self.attack == "equivocate-partial" else sent

    def reports(self, invalid: list[int], peers: list[int]) -> list[int]:
        """The workers whose partials it reports invalid (``invalid``: those that really were)."""
        return sorted(peers) if self.attack == "false-report" and self.active else invalid


def craft_modulus(payload: bytes) -> bytes:
    """A trustgrad crypto frame whose first OpenFHE item names another first modulus, re-framed with a valid CRC:
    what a worker holding valid keys can send, and no checksum can stop."""
    from ..crypto import wire

    kind = payload[5]
    meta, items = wire.unpack(payload, kind)
    item = bytearray(items[0])
    # the first tower modulus is the first 60-bit NTT prime word after the embedded parameter block's header
    for at in range(0, len(item) - 8):
        q = int.from_bytes(item[at : at + 8], "little")
        if q.bit_length() in range(50, 61) and q & 1 and q % 1024 == 1:
            item[at : at + 8] = (q ^ (1 << 33)).to_bytes(8, "little")
            break
    return wire.pack(kind, meta, [bytes(item), *items[1:]])
