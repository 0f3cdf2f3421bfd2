"""Blind verification of one SGD step: the server checks a gradient claim on ciphertexts and learns one scalar.

The paper's proposal (Rorat & Niyomufasha 2022): verify Proof-of-Learning claims (Jia et al. 2021, Alg. 2: re-execute
the step, compare with the claim) *on encrypted data and weights*. Parties and what they hold:

- **data owners** encrypt their samples once, at setup (:func:`encrypt_samples`, J samples per ciphertext pair);
- the **server** holds those ciphertexts (:class:`SampleStore`), the encrypted model version ``W_v, b_v``, and the claim
  a worker pushed, plus the CKKS context and *public* keys only: encryption key, eval-mult key, rotation keys;
- a **worker** (the prover) pushes the claim ``Enc(dW, db)`` in the model's own layout (:func:`encrypt_claim`), so
  the very ciphertext that is verified is the one the server aggregates into the model (no second packing).

Server circuit for a batch of B samples named by the PRF (slot layout ``[f, j, c]``: :mod:`trustgrad.blind.packing`;
levels are CKKS rescalings, model at level <= 1, samples fresh):

  1. group the batch: each group holds at most one sample per in-ciphertext position j (greedy; about B/J to 2B/J
     groups). ``X_g = sum_k X_k * m_{k,g}``, ``Y_g`` alike, with 0/1 plaintext masks ``m`` picking the group's samples
     out of the owners' ciphertexts ................................................................. level 1
  2. logits ``Z_g = rotsum_f(X_g * W) + b``: one product, log2(Fp) rotations over the outermost axis, so the sum is
     replicated into every feature block (no mask) ................................................. level 2
  3. ``P_g = s(Z_g) = 0.5 + 0.197 Z + (-0.004 Z) * Z^2`` (poly; depth 2) or ``P_g = Z_g`` (linear) .... level 4 | 2
  4. ``R_g = P_g - Y_g``; ``T = sum_g R_g * (X_g / B)`` (the outer products of all samples) ......... level 5 | 3
     and ``T_b = sum_g R_g * v_g`` (``v_g``: 1/B on the group's valid (f=0, j, c<C) cells, the bias gradient)
  5. ``S = rotsum_j(T)``, ``S_b = rotsum_j(T_b)``: the recomputed ``dW`` at (f, 0, c), ``db`` at (0, 0, c)
  6. ``D = M * (S - claim_W)``, ``D_b = M_b * (S_b - claim_b)``: 0/1 masks keep only those slots (the sum over j
     leaves partial sums elsewhere) ................................................................ level 6 | 4
  7. ``Q = D^2 + D_b^2``, summed over classes and features by rotations into slot 0 ............. level 7 | 5

Only that ciphertext is decrypted (shared key: :func:`trustgrad.crypto.decrypt`; threshold: every party's
:func:`~trustgrad.crypto.partial_decrypt`, then :func:`~trustgrad.crypto.fuse`), and :func:`judge` accepts iff the
distance is within the honest bound. Steps 1-5 do not depend on the claim: :meth:`BlindVerifier.recompute` once,
then :meth:`BlindVerifier.distance_to` per claim (about 0.1 s each).

What the decryptors learn. Slot 0 is ``gain^2 (||dW - dW_claim||^2 + ||db - db_claim||^2)`` (``gain`` = 8 is
folded into the step-6 masks so the distance's own error shrinks 64x): for an honest claim, CKKS noise
(~1e-10); for a dishonest one, how far it is from the truth. The other slots of the decrypted ciphertext hold partial
sums of the same masked squared differences (per class and feature block), i.e. *where* the claim is wrong, never
values of X, Y, W or the true gradient themselves (every slot of Q is a function of ``S - claim`` on masked cells).

The prover and its partial decryption (threshold mode). The prover is one of the key holders. Its partial decryption
is only useful to combine with *all* others' partials of the *same* ciphertext (n-of-n; ``fuse`` checks the vector
id), and the parties only ever partially decrypt verdict ciphertexts the server produced with this circuit, which
contain nothing but masked squared differences. What a prover could try: (a) learn others' data from the verdict —
the verdict of its own claim concerns its own batch (the PRF draws from the prover's shard) and the current model,
which every worker pulls anyway; (b) shift the verdict with a crafted partial: the fused plaintext is the verdict
plus any offset the prover adds to its partial, so to pass it must cancel the verdict to within the bound, i.e.
predict it. It cannot: ``distance_to(..., weights=rho)`` makes the verdict a *weighted* squared distance
``sum_s rho_s^2 diff_s^2`` with secret weights ``rho_s`` in [0.5, 1] that the server draws fresh for every check, so
even a prover that knows its own ``diff`` exactly only knows the verdict lies in [D/4, D] (D: the unweighted
distance), and an offset lands within the bound with probability about ``bound / (0.75 D)``; the server fuses (the
parties never see a verdict) and treats a verdict that does not decrypt to a number within the bound as a rejection.
(The alternative, a committee that excludes the prover, needs a key the prover holds no share of: per-prover
committee keys, with each claim encrypted under two keys whose plaintexts nobody can compare, or t-of-n recovery,
which the 1.6.1 bindings cannot move between processes.) (c) make the distance wrap around the decryption modulus:
values above ``2**(first_mod_bits - scale_bits - 1)`` decrypt modulo that range. :func:`judge` rejects negative
distances, and landing a wrapped value inside ``[-bound, bound]`` (about 5e-10 wide, of a 2**14 / gain^2 range) requires
predicting the server's computation, including every rescaling error and the encryption noise of ciphertexts the
prover did not make, to about 1e-10. A range check on the claim itself (a zero-knowledge range proof) would close
this fully; not built. (d) make the server compute something else next round: the claim is aggregated into the
model *whole*, and step 2 multiplies samples at positions j > 0 with the model's replicas, which steps 6-7 never
compare. A claim right at j = 0 and wrong in its replicas, padding or other bias blocks would pass and corrupt the
server's model, so that the next round's honest claims fail (honest workers framed and excluded). Step 6b
(:meth:`BlindVerifier._consistency`) adds, with the same secret weights, the squared amount by which the claim is not
a model-layout vector (every replica equal to its neighbour, padding zero): three rotations with keys the circuit
already has. (e) use complex slots: CKKS slots are complex and ``D = a + i t`` squares to ``a^2 - t^2 + 2 i a t``,
so a prover that encrypts ``t = |a|`` next to a poisoned real part zeroes the real part of every squared difference
whatever the weights. The verdict's imaginary part is then ``2 sum rho^2 a t``; OpenFHE's CKKS decoder estimates the
approximation error from the imaginary parts and refuses such a verdict (tests: a x4 sign flip decrypts to no number)
or adds noise of that size. A prover that balances signs over slots so that the imaginary part nearly cancels under
unknown weights keeps a residual chance when the bound is loose (flooded threshold verdicts); computing ``D conj(D)``
needs a joint conjugation key (an automorphism key outside the rotation group), not built.

All claims of a round in one evaluation (:meth:`BlindVerifier.check_round`): groups are formed over every claim's
samples, step 4 multiplies each group's residuals by each claim's own samples (so claim i's sums see only its batch),
and one verdict holds the sum of the claims' weighted distances plus the shape term of their sum (the vector the
model is updated with). If that sum is within the bound every claim is accepted (each term is a weighted square);
otherwise each claim's own verdict, exactly as :meth:`distance_to` makes it, is decrypted and judged alone, so the
decisions are those of per-claim checks. A liar who wants to hide in the sum must still cancel it with its partial
decryption, i.e. predict the sum of every claim's weighted distance: (b) above, no easier.

Measured (OpenFHE 1.6.1, N=16384, 1 thread; batch 32 x 64 features x 10 classes): see ``trustgrad bench blind``
and the module docstring of :mod:`trustgrad.blind` for the numbers.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trustgrad.blind.models import KINDS, SIGMOID
from trustgrad.blind.packing import Layout
from trustgrad.crypto import Context, EncryptedVector, PublicKey, encrypt, wire
from trustgrad.errors import ConfigError, CryptoError

__all__ = [
    "EncryptedSamples",
    "SampleStore",
    "BlindVerifier",
    "EncryptedGradient",
    "Verdict",
    "RoundCheck",
    "encrypt_samples",
    "encrypt_samples_bytes",
    "encrypt_model",
    "encrypt_claim",
    "judge",
    "to_last_level",
]

log = logging.getLogger(__name__)

_MAGIC = b"TGBS1"


class EncryptedSamples:
    """One data owner's samples, encrypted once: ciphertext k holds samples ``ids[k*J:(k+1)*J]`` at j = 0..J-1."""

    __slots__ = ("layout", "ids", "x", "y")

    def __init__(self, layout: Layout, ids: Sequence[int], x: EncryptedVector, y: EncryptedVector) -> None:
        n_ct = -(-len(ids) // layout.per_ct)
        if len(x.ciphertexts) != n_ct or len(y.ciphertexts) != n_ct or x.tag != y.tag:
            raise CryptoError(f"encrypted samples: {len(ids)} ids need {n_ct} X and Y ciphertexts under one key")
        self.layout, self.ids, self.x, self.y = layout, tuple(int(i) for i in ids), x, y

    def __len__(self) -> int:
        return len(self.ids)

    def to_bytes(self) -> bytearray:
        """A bytearray, so that ``Comm.send_bytes`` sends it without a copy (a worker's samples are ~190 MB)."""
        return _frame(self.layout, self.ids, self.x.to_bytes(), self.y.to_bytes())

    @classmethod
    def from_bytes(cls, context: Context, data: bytes, *, public_key: PublicKey | None = None) -> EncryptedSamples:
        what = "encrypted samples"
        if not isinstance(data, (bytes, bytearray)) or not data.startswith(_MAGIC):
            raise CryptoError(f"{what}: not a trustgrad encrypted-samples blob")
        parts, pos = [], len(_MAGIC)
        for _ in range(3):
            if pos + 8 > len(data):
                raise CryptoError(f"{what}: truncated")
            (n,) = struct.unpack_from("<Q", data, pos)
            if pos + 8 + n > len(data):
                raise CryptoError(f"{what}: truncated")
            parts.append(memoryview(data)[pos + 8 : pos + 8 + n])  # views: the ciphertexts are ~190 MB per owner
            pos += 8 + n
        if pos != len(data):
            raise CryptoError(f"{what}: {len(data) - pos} trailing bytes")
        try:
            head = json.loads(bytes(parts[0]))
            f, c, s = head["layout"]
            ids = head["ids"]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in [f, c, s, *ids]):
                raise ValueError("non-integer fields")
            layout = Layout(f, c, s)
        except (ValueError, KeyError, TypeError, ConfigError) as exc:
            raise CryptoError(f"{what}: malformed header ({exc})") from None
        if layout.slots != context.slots:
            raise CryptoError(f"{what}: packed for {layout.slots} slots, this context has {context.slots}")
        x = EncryptedVector.from_bytes(context, parts[1], public_key=public_key)
        y = EncryptedVector.from_bytes(context, parts[2], public_key=public_key)
        return cls(layout, ids, x, y)


def _frame(layout: Layout, ids: Sequence[int], x: bytes, y: bytes) -> bytearray:
    """The bytes of :meth:`EncryptedSamples.to_bytes`, as a bytearray (``Comm.send_bytes`` sends it without a copy)."""
    head = json.dumps({"layout": [layout.features, layout.classes, layout.slots], "ids": [int(i) for i in ids]})
    chunks = [_MAGIC]
    for part in (head.encode(), x, y):
        chunks += [struct.pack("<Q", len(part)), part]
    return bytearray().join(chunks)  # one copy of the parts, none of a part to prefix its length


def _packed(layout: Layout, x: np.ndarray, y: np.ndarray, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = _onehot(np.asarray(y), layout.classes)
    if len(ids) != len(x) or len(y) != len(x) or len(set(int(i) for i in ids)) != len(ids):
        raise ConfigError(f"encrypt_samples needs one distinct id per sample, got {len(ids)} ids for {len(x)} rows")
    packs = [
        layout.pack_samples(x[k : k + layout.per_ct], y[k : k + layout.per_ct]) for k in range(0, len(x), layout.per_ct)
    ]
    return np.concatenate([p[0] for p in packs]), np.concatenate([p[1] for p in packs])


def encrypt_samples_bytes(
    public_key: PublicKey, layout: Layout, x: np.ndarray, y: np.ndarray, ids: Sequence[int]
) -> bytearray:
    """``encrypt_samples(...).to_bytes()`` holding less: the samples' ciphertexts are serialized and dropped before
    the labels' are made (a worker's ~360 digits are ~190 MB of ciphertexts, half of them X)."""
    px, py = _packed(layout, x, y, ids)
    bx = encrypt(public_key, px).to_bytes()
    by = encrypt(public_key, py).to_bytes()
    return _frame(layout, ids, bx, by)


def encrypt_samples(
    public_key: PublicKey, layout: Layout, x: np.ndarray, y: np.ndarray, ids: Sequence[int]
) -> EncryptedSamples:
    """Data owner, once at setup: encrypt samples ``x`` (n x F, flattened if needed) with labels ``y`` (class
    indices or one-hot) under their global ``ids``."""
    px, py = _packed(layout, x, y, ids)
    ex = encrypt(public_key, px)
    ey = encrypt(public_key, py)
    return EncryptedSamples(layout, ids, ex, ey)


def encrypt_model(public_key: PublicKey, layout: Layout, w: np.ndarray, b: np.ndarray) -> EncryptedVector:
    """The model version (``w``: C x F, ``b``: C) as two ciphertexts: weights, then bias (see packing)."""
    return encrypt(public_key, np.concatenate([layout.pack_weights(w), layout.pack_bias(b)]))


def encrypt_claim(public_key: PublicKey, layout: Layout, dw: np.ndarray, db: np.ndarray) -> EncryptedVector:
    """What a worker pushes: its gradient in the model layout. The server can aggregate claims with
    :func:`trustgrad.crypto.aggregate` and apply the mean to an encrypted model (``model - lr * mean``) directly."""
    return encrypt_model(public_key, layout, dw, db)


class SampleStore:
    """The server's index of every owner's encrypted samples: global id -> (ciphertext pair, position j)."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._where: dict[int, tuple[Any, Any, int]] = {}
        self.tag: str | None = None

    def add(self, samples: EncryptedSamples) -> None:
        if samples.layout != self.layout:
            raise ConfigError(f"samples packed with {samples.layout}, store uses {self.layout}")
        if self.tag is not None and samples.x.tag != self.tag:
            raise CryptoError("these samples are encrypted under another key than the store's")
        dup = [i for i in samples.ids if i in self._where]
        if dup:
            raise ConfigError(f"sample ids {dup[:5]} are already in the store")
        per = self.layout.per_ct
        for n, i in enumerate(samples.ids):
            k, j = divmod(n, per)
            self._where[i] = (samples.x.ciphertexts[k], samples.y.ciphertexts[k], j)
        self.tag = samples.x.tag

    def __len__(self) -> int:
        return len(self._where)

    def groups(self, batch: Sequence[int]) -> list[dict[int, list[int]]]:
        """Step 1's assignment: per group, ``id(ciphertext pair) -> positions``; a position is used once per group
        (``round_groups`` of this one batch)."""
        return [{s: positions for (_, s), positions in group.items()} for group in self.round_groups([batch])]

    def round_groups(self, batches: Sequence[Sequence[int]]) -> list[dict[tuple[int, int], list[int]]]:
        """Step 1 over the samples of several batches (batch i's sample s is ``(i, s)``): per group,
        ``(i, s) -> positions``, a position used once per group, so groups fill across batches."""
        missing = [int(s) for b in batches for s in b if int(s) not in self._where]
        if missing:
            raise ConfigError(f"batch names samples the server does not hold: {missing[:5]}")
        used: list[set[int]] = []
        groups: list[dict[tuple[int, int], list[int]]] = []
        for i, batch in enumerate(batches):
            for s in batch:
                j = self._where[int(s)][2]
                g = next((n for n, u in enumerate(used) if j not in u), None)
                if g is None:
                    used.append(set())
                    groups.append({})
                    g = len(used) - 1
                used[g].add(j)
                groups[g].setdefault((i, int(s)), []).append(j)
        return groups

    def cts(self, sample_id: int) -> tuple[Any, Any]:
        x, y, _ = self._where[sample_id]
        return x, y


@dataclass(frozen=True)
class EncryptedGradient:
    """The recomputed gradient, still encrypted: ``dW`` at (f, 0, c) of ``weights``, ``db`` at (0, 0, c) of ``bias``
    (other slots hold partial sums; only :meth:`BlindVerifier.distance_to` reads them, through masks)."""

    weights: Any
    bias: Any
    batch_size: int


@dataclass(frozen=True)
class Verdict:
    """The decrypted distance and the decision."""

    distance: float
    bound: float
    accepted: bool
    reason: str


@dataclass
class RoundCheck:
    """All claims of a round checked in one evaluation (:meth:`BlindVerifier.check_round`): ``total`` is the
    encrypted sum of every claim's weighted distance in slot 0, ``parts`` each claim's masked squared differences
    before the final sum (decrypted one by one only if the total fails: :meth:`BlindVerifier.finish_round`)."""

    total: EncryptedVector
    parts: list[Any]
    claims: list[EncryptedVector] = field(default_factory=list)
    claim_scale: float = 1.0
    weights: list[np.ndarray] | None = None
    decryptions: int = 0


def judge(distance: float, bound: float) -> Verdict:
    """Accept iff ``-bound <= distance <= bound`` (a negative distance means wrap-around or a corrupt verdict)."""
    d = float(distance)
    if not np.isfinite(d):
        return Verdict(d, bound, False, "verdict did not decrypt to a number")
    if d < -bound:
        return Verdict(d, bound, False, "negative squared distance: wrapped around the modulus or corrupted")
    if d > bound:
        return Verdict(d, bound, False, f"claim is {d:.3g} away from the recomputed gradient (bound {bound:.3g})")
    return Verdict(d, bound, True, "claim matches the recomputed gradient")


class BlindVerifier:
    """The server side of the check; holds the context and public key material only (no secret key).

    >>> # v = BlindVerifier(public_key, layout, "poly"); d = v.distance(store, batch_ids, enc_model, enc_claim)
    """

    def __init__(self, public_key: PublicKey, layout: Layout, kind: str = "poly", *, gain: float = 8.0) -> None:
        if not 1.0 <= gain <= 1024.0:
            raise ConfigError(f"gain must be in [1, 1024], got {gain}")
        if kind not in KINDS:
            raise ConfigError(f"blind check kind must be one of {list(KINDS)}, got {kind!r}")
        ctx = public_key.context
        if layout.slots != ctx.slots:
            raise ConfigError(f"layout is for {layout.slots} slots, the context has {ctx.slots}")
        if not public_key.eval_mult:
            raise CryptoError("blind verification needs the (joint) eval-mult key in the server's public key")
        missing = sorted(set(layout.rotations) - set(public_key.rotations))
        if missing:
            raise CryptoError(f"blind verification needs rotation keys for {missing} (see Layout.rotations)")
        need = 7 if kind == "poly" else 5
        if ctx.params.depth < need:
            raise CryptoError(f"the {kind} check needs multiplicative depth {need}, the context has {ctx.params.depth}")
        self.public_key, self.layout, self.kind, self.context, self.gain = public_key, layout, kind, ctx, float(gain)
        self._cc = ctx.cc
        self._pt: dict[Any, Any] = {}

    # -- the circuit ------------------------------------------------------------------------------------------------

    def recompute(self, store: SampleStore, batch: Sequence[int], model: EncryptedVector) -> EncryptedGradient:
        """Steps 1-5: the encrypted gradient of the batch at the encrypted model (independent of any claim)."""
        self._check_vector(model, "model")
        cc, lay, B = self._cc, self.layout, len(batch)
        if B < 1:
            raise ConfigError("the batch is empty")
        if store.tag != self.public_key.tag:
            raise CryptoError("the stored samples were not encrypted under the verifier's public key")
        w_ct, b_ct = model.ciphertexts
        t_parts, tb_parts = [], []
        with wire.openfhe_errors("blind step check"):
            for group in store.groups(batch):
                xs, ys, positions = [], [], []
                for sid, pos in group.items():
                    x, y = self._masked_sample(store, sid, pos)
                    xs.append(x)
                    ys.append(y)
                    positions += pos
                xg, yg = _sum(cc, xs), _sum(cc, ys)  # step 1
                z = self._rotsum(cc.EvalMult(xg, w_ct), lay.feature_rotations)  # step 2
                z = cc.EvalAdd(z, b_ct)
                r = cc.EvalSub(self._activation(z), yg)  # steps 3-4
                t_parts.append(cc.EvalMult(r, cc.EvalMult(xg, 1.0 / B)))
                tb_parts.append(cc.EvalMult(r, self._bias_cell(positions, B)))
            s = self._rotsum(_sum(cc, t_parts), lay.sample_rotations)  # step 5
            sb = self._rotsum(_sum(cc, tb_parts), lay.sample_rotations)
        return EncryptedGradient(s, sb, B)

    def distance_to(
        self,
        gradient: EncryptedGradient,
        claim: EncryptedVector,
        *,
        claim_scale: float = 1.0,
        weights: np.ndarray | None = None,
    ) -> EncryptedVector:
        """Steps 6-7: ``Enc(gain^2 (||dW - dW_claim||^2 + ||db - db_claim||^2))`` in slot 0, as a length-1 vector
        (decrypt it, then :meth:`finish`).

        ``claim_scale``: the claim encrypts ``claim_scale`` times the gradient (the check compares with
        ``claim / claim_scale``, folded into the step-6 masks: no extra level). ``weights``: secret per-slot factors
        in [0, 1] (one per slot), so the verdict is a *weighted* squared distance whose value the prover cannot
        predict (see "The prover and its partial decryption" above); None: all ones.
        """
        self._check_vector(claim, "claim")
        if not (np.isfinite(claim_scale) and claim_scale > 0):
            raise ConfigError(f"claim_scale must be a positive number, got {claim_scale}")
        cc, lay = self._cc, self.layout
        cw, cb = claim.ciphertexts
        with wire.openfhe_errors("blind distance"):
            gmask, bmask, gclaim, bclaim = self._distance_masks(claim_scale, weights)
            d = cc.EvalSub(cc.EvalMult(gradient.weights, gmask), cc.EvalMult(cw, gclaim))
            db = cc.EvalSub(cc.EvalMult(gradient.bias, bmask), cc.EvalMult(cb, bclaim))
            q = cc.EvalAdd(
                cc.EvalAdd(cc.EvalSquare(d), cc.EvalSquare(db)), self._consistency(cw, cb, claim_scale, weights)
            )
            q = self._rotsum(q, lay.class_rotations + lay.feature_rotations)
        return self._verdict_vector(q)

    def _distance_masks(self, claim_scale: float, weights: np.ndarray | None) -> tuple[Any, Any, Any, Any]:
        """Step 6's plaintexts: gain (times the secret weights) on the gradient's slots, and the same over
        ``claim_scale`` for the claim."""
        cc, lay = self._cc, self.layout
        if weights is None:
            gmask = self._plain("gmask", lambda: lay.gradient_mask() * self.gain)
            bmask = self._plain("bmask", lambda: lay.bias_mask() * self.gain)
            gclaim = self._plain(("gmask", claim_scale), lambda: lay.gradient_mask() * self.gain / claim_scale)
            bclaim = self._plain(("bmask", claim_scale), lambda: lay.bias_mask() * self.gain / claim_scale)
            return gmask, bmask, gclaim, bclaim
        weights = np.asarray(weights, np.float64).reshape(-1)
        if weights.shape != (lay.slots,) or not np.all((weights >= 0) & (weights <= 1)):
            raise ConfigError(f"weights must be {lay.slots} values in [0, 1]")
        g, b = lay.gradient_mask() * weights * self.gain, lay.bias_mask() * weights * self.gain
        gm, bm, gc, bc = (cc.MakeCKKSPackedPlaintext(m) for m in (g, b, g / claim_scale, b / claim_scale))
        return gm, bm, gc, bc

    def _consistency(self, cw: Any, cb: Any, claim_scale: float, weights: np.ndarray | None) -> Any:
        """Step 6b: the squared (weighted, gained) amount by which a claim is *not* a model-layout vector.

        Steps 6-7 compare only the slots the recomputed gradient lands in (f, j = 0, c < C). A claim is also
        aggregated into the model whole, and the model's other slots are what step 2 multiplies samples at
        positions j > 0 with: a claim correct at j = 0 but carrying anything else in its replicas j > 0, its padded
        classes or features, or a bias that differs between feature blocks, would pass and corrupt the server's
        model, so that later honest claims fail (an honest worker framed and excluded). This term is zero for
        exactly the vectors :func:`encrypt_claim` packs: every replica equal to its neighbour (rotation by one
        position, ``Cp``; for the bias also by one feature block), padding zero. Three rotations of the fresh
        claim, two of them hoisted (one decomposition of the bias ciphertext)."""
        cc, lay = self._cc, self.layout
        wt = np.ones(lay.slots) if weights is None else np.asarray(weights, np.float64).reshape(-1)
        key = None if weights is None else id(weights)
        scale = self.gain / claim_scale

        def plain(name: str, make: Any) -> Any:
            if key is None:
                return self._plain(("shape", name, claim_scale), lambda: make() * scale)
            return cc.MakeCKKSPackedPlaintext(make() * wt * scale)

        chain = plain("chain", lay.replica_mask)
        chain_b = plain("chain_b", lambda: lay.replica_mask(bias=True))
        pad_w = plain("pad_w", lambda: lay.padding_mask(bias=False))
        pad_b = plain("pad_b", lambda: lay.padding_mask(bias=True))
        blocks = plain("blocks", lay.block_chain_mask)
        m = cc.GetCyclotomicOrder()
        pre = cc.EvalFastRotationPrecompute(cb)
        cb_j = cc.EvalFastRotation(cb, lay.cp, m, pre)
        cb_f = cc.EvalFastRotation(cb, lay.block, m, pre)
        ew = cc.EvalAddMany(
            [
                cc.EvalMult(cw, chain),
                cc.EvalMult(cw, pad_w),
                cc.EvalNegate(cc.EvalMult(cc.EvalRotate(cw, lay.cp), chain)),
            ]
        )
        eb = cc.EvalAddMany(
            [cc.EvalMult(cb, chain_b), cc.EvalMult(cb, pad_b), cc.EvalNegate(cc.EvalMult(cb_j, chain_b))]
        )
        ef = cc.EvalSub(cc.EvalMult(cb, blocks), cc.EvalMult(cb_f, blocks))
        return cc.Relinearize(cc.EvalAddMany([cc.EvalMultNoRelin(e, e) for e in (ew, eb, ef)]))

    def _verdict_vector(self, q: Any) -> EncryptedVector:
        level = int(q.GetLevel())
        return EncryptedVector(
            self.context, [q], 1, "float64", self.public_key.tag, min(level, self.context.params.depth)
        )

    def finish(self, decrypted: np.ndarray) -> float:
        """The squared distance from the decrypted verdict (slot 0 holds ``gain**2`` times it)."""
        return float(np.asarray(decrypted, np.float64).reshape(-1)[0]) / self.gain**2

    @property
    def bound(self) -> float:
        """Honest-claim bound on the distance: ``2**-(scale_bits - 14) / gain**2`` (2.3e-10 at 2**40, gain 8).

        The verdict's absolute CKKS error at its last level is a few units of ``2**-scale_bits`` times the
        rescaling/key-switching noise of N=16384 (~2**10-2**12); measured honest distances: <= 4.1e-11 (shared keys)
        and <= 8.4e-11 (3-party threshold, smudging noise included), so 14 bits leave a 2.7x margin. One gradient
        entry off by 1e-4 adds 1e-8 (43x the bound).
        """
        return 2.0 ** -(self.context.params.scale_bits - 14) / self.gain**2

    @property
    def max_distance(self) -> float:
        """Largest distance that decrypts without wrapping around (larger ones decrypt to a random residue)."""
        p = self.context.params
        return 2.0 ** (p.first_mod_bits - p.scale_bits - 1) / self.gain**2

    def check_round(
        self,
        store: SampleStore,
        batches: Sequence[Sequence[int]],
        model: EncryptedVector,
        claims: Sequence[EncryptedVector],
        *,
        claim_scale: float = 1.0,
        weights: Sequence[np.ndarray] | None = None,
    ) -> RoundCheck:
        """Steps 1-7 for every claim of a round in one evaluation (claim i: gradient of ``batches[i]``).

        The same circuit as :meth:`recompute` and :meth:`distance_to`, packed: step 1 groups the samples of *all*
        claims (one per position per group, so a round of k batches needs about k B / J groups instead of k times
        the per-batch greedy's), steps 2-3 run once per group, step 4 multiplies each group's residuals by each
        claim's own samples (claim i's sums never see claim j's samples), products are summed before one
        relinearisation, and step 7's rotations run once on the sum of the claims' weighted squared differences.
        :meth:`finish_round` decrypts that sum; only if it fails are the claims' distances decrypted one by one.
        """
        if len(batches) != len(claims) or not claims:
            raise ConfigError(
                f"check_round needs one batch per claim, got {len(batches)} batches, {len(claims)} claims"
            )
        if weights is not None and len(weights) != len(claims):
            raise ConfigError("check_round needs one weight vector per claim")
        if not (np.isfinite(claim_scale) and claim_scale > 0):
            raise ConfigError(f"claim_scale must be a positive number, got {claim_scale}")
        self._check_vector(model, "model")
        for claim in claims:
            self._check_vector(claim, "claim")
        if store.tag != self.public_key.tag:
            raise CryptoError("the stored samples were not encrypted under the verifier's public key")
        sizes = [len(b) for b in batches]
        if min(sizes) < 1:
            raise ConfigError("a batch is empty")
        cc, lay = self._cc, self.layout
        w_ct, b_ct = model.ciphertexts
        n = len(claims)
        t_parts: list[list[Any]] = [[] for _ in range(n)]
        tb_parts: list[list[Any]] = [[] for _ in range(n)]
        with wire.openfhe_errors("blind round check"):
            for group in store.round_groups(batches):  # step 1, over the union of the batches
                xs: dict[int, list[Any]] = {}
                ys, cells = [], {}
                for (i, sid), pos in group.items():
                    x, y = self._masked_sample(store, sid, pos)
                    xs.setdefault(i, []).append(x)
                    ys.append(y)
                    cells.setdefault(i, []).extend(pos)
                xi = {i: _sum(cc, v) for i, v in xs.items()}
                xg, yg = _sum(cc, list(xi.values())), _sum(cc, ys)
                z = self._rotsum(cc.EvalMult(xg, w_ct), lay.feature_rotations)  # step 2
                r = cc.EvalSub(self._activation(cc.EvalAdd(z, b_ct)), yg)  # steps 3-4
                for i, x in xi.items():
                    t_parts[i].append(cc.EvalMultNoRelin(r, cc.EvalMult(x, 1.0 / sizes[i])))
                    tb_parts[i].append(cc.EvalMult(r, self._bias_cell(cells[i], sizes[i])))
            parts = []
            for i, claim in enumerate(claims):
                s = self._rotsum(cc.Relinearize(_sum(cc, t_parts[i])), lay.sample_rotations)  # step 5
                sb = self._rotsum(_sum(cc, tb_parts[i]), lay.sample_rotations)
                gmask, bmask, gclaim, bclaim = self._distance_masks(
                    claim_scale, None if weights is None else weights[i]
                )
                cw, cb = claim.ciphertexts
                d = cc.EvalSub(cc.EvalMult(s, gmask), cc.EvalMult(cw, gclaim))  # step 6
                db = cc.EvalSub(cc.EvalMult(sb, bmask), cc.EvalMult(cb, bclaim))
                parts.append(cc.Relinearize(cc.EvalAdd(cc.EvalMultNoRelin(d, d), cc.EvalMultNoRelin(db, db))))
            # the round's model update is the sum of its claims: that sum must be a model-layout vector
            sums = [_sum(cc, [c.ciphertexts[k] for c in claims]) for k in (0, 1)]
            shape = self._consistency(*sums, claim_scale, None if weights is None else weights[0])
            total = self._rotsum(cc.EvalAdd(_sum(cc, parts), shape), lay.class_rotations + lay.feature_rotations)
        return RoundCheck(self._verdict_vector(total), parts, claims=list(claims), claim_scale=claim_scale,
                          weights=None if weights is None else list(weights))  # fmt: skip

    def finish_round(
        self,
        packed: RoundCheck,
        distances_of: Callable[[list[EncryptedVector]], list[float]],
        bound: float | None = None,
    ) -> list[float]:
        """The round's distances: ``distances_of`` decrypts verdicts (shared key: ``finish(decrypt(...))``;
        threshold: the parties' partials, fused) and returns distances. First the sum of every claim's weighted
        distance: within ``bound`` (default :attr:`bound`), every claim is accepted and each distance is reported as
        that sum (an upper bound on each: every term is a weighted square). Otherwise each claim's own verdict is
        decrypted, exactly as :meth:`distance_to` would have made it, and judged alone."""
        bound = self.bound if bound is None else bound
        total = distances_of([packed.total])[0]
        packed.decryptions = 1
        if judge(total, bound).accepted:
            return [total] * len(packed.parts)
        lay = self.layout
        cc, rots = self._cc, lay.class_rotations + lay.feature_rotations
        each = []
        with wire.openfhe_errors("blind round check"):
            for i, (q, claim) in enumerate(zip(packed.parts, packed.claims)):
                wt = None if packed.weights is None else packed.weights[i]
                shape = self._consistency(*claim.ciphertexts, packed.claim_scale, wt)
                each.append(self._verdict_vector(self._rotsum(cc.EvalAdd(q, shape), rots)))
        packed.decryptions += len(each)
        return distances_of(each)

    def distance(
        self, store: SampleStore, batch: Sequence[int], model: EncryptedVector, claim: EncryptedVector
    ) -> EncryptedVector:
        """The whole check: :meth:`recompute` then :meth:`distance_to`."""
        return self.distance_to(self.recompute(store, batch, model), claim)

    # -- helpers ----------------------------------------------------------------------------------------------------

    def _activation(self, z: Any) -> Any:
        if self.kind == "linear":
            return z
        cc = self._cc
        c0, c1, c3 = SIGMOID
        cube = cc.EvalMult(cc.EvalMult(z, c3), cc.EvalSquare(z))  # (c3 z) * z^2: depth 2, not 3
        return cc.EvalAdd(cc.EvalAdd(cube, cc.EvalMult(z, c1)), c0)

    def _rotsum(self, ct: Any, rotations: Sequence[int]) -> Any:
        for r in rotations:
            ct = self._cc.EvalAdd(ct, self._cc.EvalRotate(ct, r))
        return ct

    def _masked_sample(self, store: SampleStore, sid: int, pos: Sequence[int]) -> tuple[Any, Any]:
        """Step 1's terms of one stored sample: its encrypted x and y kept at its group positions (0/1 mask)."""
        x_ct, y_ct = store.cts(sid)
        mask = self._plain(("pos", tuple(pos)), lambda: self.layout.position_mask(pos))
        return self._cc.EvalMult(x_ct, mask), self._cc.EvalMult(y_ct, mask)

    def _bias_cell(self, positions: Sequence[int], size: int) -> Any:
        """The mask that keeps a group's bias residuals (at ``positions``) and divides them by the batch size."""
        return self._plain(
            ("cell", tuple(sorted(positions)), size), lambda: self.layout.bias_cell_mask(positions, 1 / size)
        )

    def _plain(self, key: Any, make: Any) -> Any:
        pt = self._pt.get(key)
        if pt is None:
            if len(self._pt) > 4096:
                self._pt.clear()
            pt = self._pt[key] = self._cc.MakeCKKSPackedPlaintext(make())
        return pt

    def _check_vector(self, v: EncryptedVector, what: str) -> None:
        if v.context.fingerprint != self.context.fingerprint:
            raise CryptoError(f"the {what} belongs to another CKKS context")
        if v.tag != self.public_key.tag:
            raise CryptoError(
                f"the {what} was encrypted under key {v.tag[:8]}, not the verifier's {self.public_key.tag[:8]}"
            )
        if len(v.ciphertexts) != 2 or v.length != 2 * self.layout.slots:
            raise CryptoError(
                f"the {what} must be 2 ciphertexts in the model layout (weights, bias); see encrypt_model"
            )


def to_last_level(cc: Any, cts: list[Any], products: int) -> list[Any]:
    """``products`` multiplications by 1.0: a ciphertext that is only going to be decrypted (the round's published
    mean) drops its towers before it travels (at depth 7: 1.05 MB instead of 4.2 MB per ciphertext, and every partial
    decryption of it alike). Scalar products, not OpenFHE's level reduction, so the shape is one the wire validation
    already knows (``crypto.layout``); values stay below the encryption bound (2**13 < 2**(first_mod - scale - 1))."""
    for _ in range(products):
        cts = [cc.EvalMult(ct, 1.0) for ct in cts]
    return cts


def _sum(cc: Any, cts: list[Any]) -> Any:
    return cts[0] if len(cts) == 1 else cc.EvalAddMany(cts)


def _onehot(y: np.ndarray, classes: int) -> np.ndarray:
    if y.ndim == 2:
        if y.shape[1] != classes:
            raise ConfigError(f"one-hot labels need {classes} columns, got {y.shape[1]}")
        return y.astype(np.float64)
    if y.ndim != 1 or (y.size and (y.min() < 0 or y.max() >= classes)):
        raise ConfigError(f"labels must be class indices in [0, {classes}) or one-hot rows")
    return np.eye(classes)[y.astype(np.int64)]
