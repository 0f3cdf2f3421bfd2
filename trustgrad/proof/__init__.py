"""Proof-of-Learning (Jia et al., IEEE S&P 2021), hardened against the published spoofs (Zhang et al. S&P 2022;
Fang et al. EuroS&P 2023).

- :mod:`.prover`: the training hook behind ``--proof record`` (writes ``OUT/proof``).
- :mod:`.format`, :mod:`.commit`, :mod:`.writer`: the proof folder, its Merkle commitment, bounded safe readers.
- :mod:`.replay`: :func:`replay_segment`, :func:`distances`, :class:`Thresholds` — reused by per-update audits.
- :mod:`.verifier`: :func:`verify` -> :class:`Verdict`; :mod:`.naive`: the reference design's verifier, for comparison;
  :mod:`.checks`: the steps both are built from.
- :mod:`.budget`, :mod:`.soundness`, :mod:`.claims`: the memory budget, the stated soundness (how many segments to
  replay for a given forgery acceptance), and which claims are checked; :mod:`.acceptance`: the exact acceptance of
  a given proof.
- :mod:`.calibrate`: measures honest reproduction error, from which the thresholds are set.

See docs/proof.md for the format, the threat model and what a valid proof does and does not establish.
"""

from .naive import verify_naive
from .replay import Distances, Hyper, Thresholds, distances, replay_segment
from .verifier import SegmentCheck, Verdict, VerifyOptions, verify

__all__ = [
    "verify",
    "verify_naive",
    "Verdict",
    "VerifyOptions",
    "SegmentCheck",
    "replay_segment",
    "distances",
    "Distances",
    "Thresholds",
    "Hyper",
]
