"""The exact probability that the verifier accepts one given proof, over the nonce it draws.

The bound of :mod:`.soundness` holds for every forger; this measures one proof: every segment is re-executed once
(``check_all``), and the sampling rule turns which segments failed into the probability that a verification with a
fresh nonce would have drawn none of them (``soundness.exact_acceptance``). ``trustgrad bench proof`` reports it for
the adaptive forgers (docs/proof.md).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .soundness import Soundness, exact_acceptance
from .verifier import Verdict, VerifyOptions, verify

__all__ = ["measure_acceptance"]


def measure_acceptance(path: str | Path, options: VerifyOptions | None = None) -> tuple[float, Verdict]:
    """The exact probability that ``verify(path, options)`` accepts, over its random nonce; and the ``--all`` verdict.

    Every segment is re-executed once (``check_all``); a failure of any check that does not depend on the nonce
    rejects with certainty (0.0); otherwise the probability follows from the sampling rule (:func:`exact_acceptance`).
    """
    options = options or VerifyOptions()
    full = verify(path, replace(options, check_all=True))
    if not full.soundness or any(not r.startswith("replay:") for r in full.reasons):
        return 0.0, full
    s = Soundness(**full.soundness)
    wrong = {i for i, seg in enumerate(full.segments) if not seg.passed}
    pool = [i for i in range(s.segments) if i not in set(s.top)]
    return exact_acceptance(wrong, s.top, pool, s.random), full
