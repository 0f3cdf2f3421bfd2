"""Per-worker Proof-of-Learning in distributed training: every pushed update is a claim, audited by replay.

A claim says "this is the gradient of the loss at model version v on the batch the PRF assigns me for step c". The
server chains each worker's claims into a hash chain (what the worker sent binds it), samples which claims to audit
from a seed derived from the round's commitments and a committed nonce, and the auditor re-executes the sampled claims
(Jia et al. 2021, Alg. 2, at the granularity of one step) against a threshold calibrated on the replay platform
(``calibration``). A rejected worker is excluded and the model is repaired to the trajectory without its lies
(``repair``).
"""

from .auditor import Auditor, AuditReport, ClaimCheck
from .claims import ClaimChain

__all__ = ["Auditor", "AuditReport", "ClaimCheck", "ClaimChain"]
