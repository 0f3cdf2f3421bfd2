"""CKKS context and keys (shared-key mode), with validated serialization.

Object model:

- :class:`Context` holds only public parameters; it never holds a key, so sending it (``to_bytes``) can leak nothing.
  Receiving one (``from_bytes``) does not parse OpenFHE bytes at all: the context is rebuilt from the parameters and
  its OpenFHE serialization compared with the sender's digest (OpenFHE's prime generation is deterministic).
- :class:`PublicKey` is everything public about a key: the encryption key plus any evaluation keys (relinearisation,
  rotations) and, in threshold mode, how many of the parties have joined it. This is what a server receives.
- :class:`SecretKey` decrypts. ``to_bytes`` refuses unless ``include_secret=True`` (docs/architecture.md §4); it is
  meant for a party's own trusted storage, never for the wire.

Every serialized object carries the context fingerprint and its key tag (OpenFHE's random 128-bit key identifier),
so a key, ciphertext or partial decryption from another context or key is rejected with a one-line ``CryptoError``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import openfhe

from trustgrad.crypto import layout, wire
from trustgrad.crypto.params import CKKSParams
from trustgrad.errors import CryptoError

__all__ = ["Context", "PublicKey", "SecretKey", "keygen"]

log = logging.getLogger(__name__)

_FEATURES = ("PKE", "KEYSWITCH", "LEVELEDSHE", "ADVANCEDSHE", "MULTIPARTY")


class Context:
    """A CKKS crypto context built from :class:`CKKSParams`; public by construction.

    >>> ctx = Context(CKKSParams(ring_dim=1024, security="none", allow_insecure=True))
    >>> ctx.slots
    512
    """

    __slots__ = ("params", "_cc", "fingerprint", "_layouts")

    def __init__(self, params: CKKSParams) -> None:
        self.params = params
        with wire.openfhe_errors("creating the CKKS context"):
            cc = openfhe.GenCryptoContext(params._openfhe())
            for feature in _FEATURES:
                cc.Enable(getattr(openfhe, feature))
        self._cc = cc
        self._layouts: dict[Any, Any] = {}  # layouts of the OpenFHE objects this context receives (crypto.layout)
        self.fingerprint = hashlib.blake2b(openfhe.Serialize(cc, openfhe.BINARY), digest_size=16).hexdigest()
        if params.security == "none":
            log.warning("CKKS context built with security='none': NOT SECURE, for tests and toy runs only")
        log.debug("CKKS context N=%d slots=%d %s", self.ring_dim, self.slots, self.fingerprint)

    @property
    def cc(self) -> Any:
        """The underlying ``openfhe.CryptoContext`` (for circuits beyond aggregation)."""
        return self._cc

    @property
    def ring_dim(self) -> int:
        return int(self._cc.GetRingDimension())

    @property
    def slots(self) -> int:
        """Values packed per ciphertext (N/2 unless ``batch_size`` is set)."""
        return int(self._cc.GetBatchSize())

    def __repr__(self) -> str:
        return f"Context(N={self.ring_dim}, slots={self.slots}, security={self.params.security}, id={self.fingerprint})"

    def to_bytes(self) -> bytes:
        """The parameters and a digest of the OpenFHE context (about 300 bytes; no key material)."""
        return wire.pack(wire.KIND_CONTEXT, {"params": self.params._to_json(), "ctx": self.fingerprint}, [])

    @classmethod
    def from_bytes(cls, data: bytes) -> Context:
        meta, _ = wire.unpack(data, wire.KIND_CONTEXT)
        params = CKKSParams._from_json(wire.field(meta, "params", str, "context"))
        ctx = cls(params)
        if ctx.fingerprint != wire.field(meta, "ctx", str, "context"):
            raise CryptoError(
                "context: rebuilding it from its parameters gave a different OpenFHE context "
                "(sender uses another OpenFHE version or build)"
            )
        return ctx

    # -- internal: shared by keys, vectors and threshold ---------------------------------------------------------

    def _check_meta(self, meta: dict[str, Any], what: str) -> None:
        got = meta.get("ctx")
        if got != self.fingerprint:
            ring = meta.get("ring_dim", "?")
            raise CryptoError(
                f"{what} belongs to another CKKS context (ring dimension {ring}, id {got}); "
                f"this context is N={self.ring_dim}, id {self.fingerprint}"
            )

    def _meta(self, **fields: Any) -> dict[str, Any]:
        return {"ctx": self.fingerprint, "ring_dim": self.ring_dim, **fields}

    def _parse(self, item: memoryview, parse: Callable[[bytes], Any], what: str) -> Any:
        with wire.openfhe_errors(f"parsing {what}"):
            return parse(bytes(item))

    def _parse_isolated(self, item: memoryview, parse: Callable[[bytes], Any], kind: str, what: str) -> Any:
        """Bytes no exact layout covers (evaluation keys): parsed first in the isolated helper
        (:mod:`trustgrad.crypto.sandbox`), then here only if that parse was clean."""
        from trustgrad.crypto.sandbox import sandbox_for

        sandbox_for(self).parse(kind, item, what)
        return self._parse(item, parse, what)


class PublicKey:
    """Encryption key plus public evaluation keys; safe to give to the aggregation server.

    ``parties``/``joined``: 1/1 for a shared key; in threshold mode the number of parties and how many have
    contributed so far (the key is ``complete`` when all have).
    """

    __slots__ = ("context", "_pk", "tag", "parties", "joined", "eval_mult", "rotations", "_enc")

    def __init__(
        self,
        context: Context,
        pk: Any,
        *,
        parties: int = 1,
        joined: int = 1,
        eval_mult: bool = False,
        rotations: Iterable[int] = (),
    ) -> None:
        self.context = context
        self._pk = pk
        self.tag = str(pk.GetKeyTag())
        self.parties = parties
        self.joined = joined
        self.eval_mult = eval_mult
        self.rotations = tuple(sorted(set(rotations)))
        self._enc: Any = None

    def _encryption_key(self) -> Any:
        """The key in its canonical (deserialized) form: what it encrypts serializes in the canonical layout as it
        is, so senders skip the round trip that ``layout.canonical`` costs."""
        if self._enc is None:
            with wire.openfhe_errors("preparing the public key"):
                self._enc = _deser_pk(layout.canonical(self._pk, layout.PUBLIC_KEY))
        return self._enc

    @property
    def complete(self) -> bool:
        return self.joined == self.parties

    def __repr__(self) -> str:
        return f"PublicKey(tag={self.tag[:8]}, parties={self.joined}/{self.parties}, eval_mult={self.eval_mult})"

    def to_bytes(self) -> bytes:
        with wire.openfhe_errors("serializing the public key"):
            items = [layout.serialize(self.context, self._pk, layout.PUBLIC_KEY, (0, 0), self.tag)]
            if self.eval_mult:
                items.append(openfhe.SerializeEvalMultKeyString(openfhe.BINARY, self.tag))
            if self.rotations:
                items.append(openfhe.SerializeEvalAutomorphismKeyString(openfhe.BINARY, self.tag))
        meta = self.context._meta(
            tag=self.tag, parties=self.parties, joined=self.joined, eval_mult=self.eval_mult, rotations=self.rotations
        )
        return wire.pack(wire.KIND_PUBLIC_KEY, meta, items)

    @classmethod
    def from_bytes(cls, context: Context, data: bytes) -> PublicKey:
        """Parse a public key (and install its evaluation keys in OpenFHE's key store)."""
        what = "public key"
        meta, items = wire.unpack(data, wire.KIND_PUBLIC_KEY)
        context._check_meta(meta, what)
        tag = wire.field(meta, "tag", str, what)
        parties = wire.field(meta, "parties", int, what)
        joined = wire.field(meta, "joined", int, what)
        eval_mult = wire.field(meta, "eval_mult", bool, what)
        rotations = wire.field(meta, "rotations", list, what)
        if not 1 <= joined <= parties <= MAX_PARTIES:
            raise CryptoError(f"{what}: invalid party counts {joined}/{parties}")
        if not all(isinstance(r, int) and not isinstance(r, bool) for r in rotations) or len(rotations) > 4096:
            raise CryptoError(f"{what}: malformed rotation index list")
        if len(items) != 1 + eval_mult + bool(rotations):
            raise CryptoError(f"{what}: {len(items)} items do not match the announced evaluation keys")
        layout.check(context, layout.PUBLIC_KEY, (0, 0), items[0], tag, what)
        pk = context._parse(items[0], _deser_pk, what)
        if str(pk.GetKeyTag()) != tag:
            raise CryptoError(f"{what}: key tag does not match its header")
        rest = iter(items[1:])
        if eval_mult:
            _install(openfhe.SerializeEvalMultKeyString, _deser_eval_mult, tag, next(rest), context, "eval-mult key")
        if rotations:
            _install(openfhe.SerializeEvalAutomorphismKeyString, _deser_rot, tag, next(rest), context, "rotation keys")
        return cls(context, pk, parties=parties, joined=joined, eval_mult=eval_mult, rotations=rotations)


class SecretKey:
    """A secret key (shared mode) or, as :class:`~trustgrad.crypto.threshold.KeyShare`, one party's share."""

    __slots__ = ("context", "_sk", "tag")

    def __init__(self, context: Context, sk: Any) -> None:
        self.context = context
        self._sk = sk
        self.tag = str(sk.GetKeyTag())

    def __repr__(self) -> str:  # never print key material
        return f"{type(self).__name__}(tag={self.tag[:8]})"

    def _extra_meta(self) -> dict[str, Any]:
        return {"index": 0, "parties": 1}

    def to_bytes(self, *, include_secret: bool = False) -> bytes:
        """Serialize the secret key, for the owner's own trusted storage only.

        Refuses unless ``include_secret=True``: secret keys must never travel with public material by accident.
        """
        if not include_secret:
            raise CryptoError(
                "refusing to serialize a secret key; pass include_secret=True to write it to trusted local storage"
            )
        meta = self.context._meta(tag=self.tag, secret=True, **self._extra_meta())
        return wire.pack(wire.KIND_SECRET_KEY, meta, [layout.canonical(self._sk, layout.SECRET_KEY)])

    @classmethod
    def from_bytes(cls, context: Context, data: bytes) -> SecretKey:
        what = "secret key"
        meta, items = wire.unpack(data, wire.KIND_SECRET_KEY)
        context._check_meta(meta, what)
        tag = wire.field(meta, "tag", str, what)
        index = wire.field(meta, "index", int, what)
        parties = wire.field(meta, "parties", int, what)
        if len(items) != 1:
            raise CryptoError(f"{what}: expected 1 item, got {len(items)}")
        layout.check(context, layout.SECRET_KEY, (0, 0), items[0], tag, what)
        sk = context._parse(items[0], _deser_sk, what)
        if str(sk.GetKeyTag()) != tag:
            raise CryptoError(f"{what}: key tag does not match its header")
        if parties == 1 and index == 0:
            return cls(context, sk)
        if not 1 <= index <= parties <= MAX_PARTIES:
            raise CryptoError(f"{what}: invalid party index {index}/{parties}")
        return KeyShare(context, sk, index=index, parties=parties)


MAX_PARTIES = 1024


def keygen(context: Context, *, eval_mult: bool = False, rotations: Sequence[int] = ()) -> tuple[PublicKey, SecretKey]:
    """Shared-key mode: generate a key pair (one party, or a dealer, runs this and shares the secret key).

    ``eval_mult`` adds the relinearisation key (ciphertext x ciphertext products; 1.2 MB at N=8192), ``rotations``
    rotation keys for those slot offsets. Aggregation needs neither.
    """
    with wire.openfhe_errors("key generation"):
        kp = context.cc.KeyGen()
        if eval_mult:
            context.cc.EvalMultKeyGen(kp.secretKey)
        if rotations:
            context.cc.EvalRotateKeyGen(kp.secretKey, [int(r) for r in rotations])
    log.debug("generated a CKKS key pair (eval_mult=%s, rotations=%s)", eval_mult, list(rotations))
    return PublicKey(context, kp.publicKey, eval_mult=eval_mult, rotations=rotations), SecretKey(context, kp.secretKey)


# -- parsers and layouts -------------------------------------------------------------------------------------------


def _deser_pk(b: bytes) -> Any:
    return openfhe.DeserializePublicKeyString(b, openfhe.BINARY)


def _deser_sk(b: bytes) -> Any:
    return openfhe.DeserializePrivateKeyString(b, openfhe.BINARY)


def _deser_eval_mult(b: bytes) -> None:
    openfhe.DeserializeEvalMultKeyString(b, openfhe.BINARY)


def _deser_rot(b: bytes) -> None:
    openfhe.DeserializeEvalAutomorphismKeyString(b, openfhe.BINARY)


def _install(
    serialize: Callable[..., bytes], deser: Callable[[bytes], None], tag: str, item: memoryview, ctx: Context, what: str
) -> None:
    """Insert evaluation keys into OpenFHE's process-wide key store, unless the very same keys are already there
    (OpenFHE refuses to overwrite an eval-mult key, e.g. when the key generator parses its own public key)."""
    try:
        if serialize(openfhe.BINARY, tag) == item:
            return
    except Exception:  # OpenFHE raises when no key is stored for the tag: the normal case on a receiver
        pass
    ctx._parse_isolated(item, deser, what, f"public key: {what}")


class KeyShare(SecretKey):
    """One party's secret share of a threshold key: party ``index`` (1-based) of ``parties``."""

    __slots__ = ("index", "parties")

    def __init__(self, context: Context, sk: Any, *, index: int, parties: int) -> None:
        super().__init__(context, sk)
        self.index = index
        self.parties = parties

    def __repr__(self) -> str:
        return f"KeyShare(party={self.index}/{self.parties}, tag={self.tag[:8]})"

    def _extra_meta(self) -> dict[str, Any]:
        return {"index": self.index, "parties": self.parties}
