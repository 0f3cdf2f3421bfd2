"""Every point-to-point message tag of the package, in one place (tests/test_tags.py checks none collide).

gloo matches a receive to a send by (peer, tag): two protocols that share a tag between the same two ranks can take
each other's messages. Fixed tags are single numbers; a *family* is ``base + i`` for ``i`` in ``range(size)`` (one
tag per round or step), and no fixed tag may fall inside a family. Families of patterns that never run in the same
job (a ring's steps, gossip's rounds) start at 0 and share that range: one pattern runs per job.
"""

from __future__ import annotations

__all__ = ["FIXED", "FAMILIES", "PATTERN_STEPS"]

# ps wire protocol (patterns/ps/protocol.py)
PS_PUSH, PS_PAYLOAD, PS_REPLY = 11, 12, 13
PS_CLOSE = 14  # never sent: the server's deliberately timed-out receive that closes a dropped worker's own group

# key set-up and the protections' exchanges (secure/, protect/)
KEY_SETUP = 71
EVALUATION_KEYS = 72
PARTIAL_DECRYPTION = 73  # worker <-> worker partial decryptions of a ps round
REPUSH = 74  # worker -> server: the round's gradient again, under the keys made after an exclusion
BLIND = 75  # worker -> server: blind checks' partial decryptions, samples, models after re-keying
DECRYPTION_STATUS = 76  # worker -> server: the partials that failed validation; its own partial when accused
CIPHER_AUDIT = 77  # server <-> auditor rank: claims, verdicts, published aggregates
RING_CIPHERTEXT = 78  # the encrypted ring's ciphertexts, partial decryptions and sums

# codes inside ps messages (not tags): the server's reply statuses, and what a SERVICE reply asks a key party for
OK, DROPPED, BYE = 0, 1, 2
SERVICE = 3  # before replying, the server asks a key party for work: [SERVICE, request, count]
VERDICTS, REKEY = 1, 2  # blind checks: partial decryptions of verdicts; re-keying among the survivors (ckks too)
DECRYPT, SHOW, RELAY = 4, 5, 6  # a threshold round's joint decryption (``protect.codecs.ckks.SecureServer.settle``)

# families: base + round (or step)
PATTERN_STEPS = (0, 1 << 10)  # ring all-reduce step k, gossip round t mod 2**10: one pattern per job (see above)
LOCAL_SGD_MERGE = 1 << 29  # + round: elastic rounds of local SGD
CONSENSUS_MONITOR = 1 << 30  # + round: the consensus-distance monitor of decentralized patterns
LINK_RELEASE = (1 << 31) - 1  # never sent: a timed-out receive that releases a cut link's group

#: name -> tag of every fixed tag
FIXED = {
    "PS_PUSH": PS_PUSH, "PS_PAYLOAD": PS_PAYLOAD, "PS_REPLY": PS_REPLY, "PS_CLOSE": PS_CLOSE, "KEY_SETUP": KEY_SETUP,
    "EVALUATION_KEYS": EVALUATION_KEYS, "PARTIAL_DECRYPTION": PARTIAL_DECRYPTION, "REPUSH": REPUSH, "BLIND": BLIND,
    "DECRYPTION_STATUS": DECRYPTION_STATUS, "CIPHER_AUDIT": CIPHER_AUDIT, "RING_CIPHERTEXT": RING_CIPHERTEXT,
    "LINK_RELEASE": LINK_RELEASE,
}  # fmt: skip

#: name -> (base, size) of every family
FAMILIES = {
    "PATTERN_STEPS": PATTERN_STEPS,
    "LOCAL_SGD_MERGE": (LOCAL_SGD_MERGE, 1 << 29),
    "CONSENSUS_MONITOR": (CONSENSUS_MONITOR, (1 << 30) - 1),
}
