"""Every point-to-point message tag of the package, and the codes inside ps messages, in one place.

gloo matches a receive to a send by (peer, tag): two protocols that share a tag between the same two ranks can take
each other's messages. A *fixed* tag is one number; a *family* is ``base + i`` for ``i`` in ``range(size)``, one tag
per round or step. tests/test_tags.py checks that fixed tags are distinct, that none falls inside a family and that
families do not overlap. Ring steps and gossip rounds share one family (``PATTERN_ROUNDS``): one pattern runs per job.
"""

from __future__ import annotations

__all__ = ["FIXED", "FAMILIES"]

# families: base + round (or step)
PATTERN_ROUNDS = 0  # + ring step k (< 2 W), + gossip round t: a pattern's own schedule
PATTERN_ROUNDS_SIZE = 1 << 28
LOCAL_SGD_MERGE = 1 << 29  # + round: elastic rounds of local SGD
CONSENSUS_MONITOR = 1 << 30  # + round: the consensus-distance monitor of decentralized patterns

_FIXED_BASE = 1 << 28  # fixed tags sit between the pattern rounds and the merge rounds

# ps wire protocol (patterns/ps/protocol.py)
PS_PUSH, PS_PAYLOAD, PS_REPLY = _FIXED_BASE + 11, _FIXED_BASE + 12, _FIXED_BASE + 13
PS_CLOSE = _FIXED_BASE + 14  # never sent: a deliberately timed-out receive that closes a dropped worker's own group
PS_WIRE = _FIXED_BASE + 15  # server -> worker: the secret and address of the worker's bounded link (ps/transport.py)

# key set-up and the protections' exchanges (secure/, protect/)
KEY_SETUP = _FIXED_BASE + 71
EVALUATION_KEYS = _FIXED_BASE + 72
PARTIAL_DECRYPTION = _FIXED_BASE + 73  # worker <-> worker partial decryptions of a ps round
REPUSH = _FIXED_BASE + 74  # worker -> server: the round's gradient again, under the keys made after an exclusion
BLIND = _FIXED_BASE + 75  # worker -> server: blind checks' partial decryptions, samples, models after re-keying
DECRYPTION_STATUS = _FIXED_BASE + 76  # worker -> server: partials that failed validation; its own when accused
CIPHER_AUDIT = _FIXED_BASE + 77  # server <-> auditor rank: claims, verdicts, published aggregates
RING_CIPHERTEXT = _FIXED_BASE + 78  # the encrypted ring's ciphertexts, partial decryptions and sums
AUDIT_CLAIM = _FIXED_BASE + 79  # worker -> auditor rank (threshold keys): the plaintext claim, the round's partial
AUDIT_MEAN = _FIXED_BASE + 80  # auditor rank -> worker (threshold keys): the fused mean every replica steps on

LINK_RELEASE = (1 << 31) - 1  # never sent: a timed-out receive that releases a cut link's group (patterns/links.py)

# codes inside ps messages (not tags): the server's reply statuses, and what a SERVICE reply asks a key party for
OK, DROPPED, BYE = 0, 1, 2
SERVICE = 3  # before replying, the server asks a key party for work: [SERVICE, request, count]
VERDICTS, REKEY = 1, 2  # blind checks: partial decryptions of verdicts; re-keying among the survivors (ckks too)
DECRYPT, SHOW, RELAY = 4, 5, 6  # a threshold round's joint decryption (``protect.codecs.ckks.SecureServer.settle``)

#: name -> tag of every fixed tag
FIXED = {
    "PS_PUSH": PS_PUSH, "PS_PAYLOAD": PS_PAYLOAD, "PS_REPLY": PS_REPLY, "PS_CLOSE": PS_CLOSE, "PS_WIRE": PS_WIRE,
    "KEY_SETUP": KEY_SETUP,
    "EVALUATION_KEYS": EVALUATION_KEYS, "PARTIAL_DECRYPTION": PARTIAL_DECRYPTION, "REPUSH": REPUSH, "BLIND": BLIND,
    "DECRYPTION_STATUS": DECRYPTION_STATUS, "CIPHER_AUDIT": CIPHER_AUDIT, "RING_CIPHERTEXT": RING_CIPHERTEXT,
    "AUDIT_CLAIM": AUDIT_CLAIM, "AUDIT_MEAN": AUDIT_MEAN, "LINK_RELEASE": LINK_RELEASE,
}  # fmt: skip

#: name -> (base, size) of every family
FAMILIES = {
    "PATTERN_ROUNDS": (PATTERN_ROUNDS, PATTERN_ROUNDS_SIZE),
    "LOCAL_SGD_MERGE": (LOCAL_SGD_MERGE, 1 << 29),
    "CONSENSUS_MONITOR": (CONSENSUS_MONITOR, (1 << 30) - 1),  # up to, not including, LINK_RELEASE
}
