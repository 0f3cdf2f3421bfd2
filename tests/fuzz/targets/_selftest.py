"""The harness's own self-test: one case per outcome, so a test can check that each is recognised.

Each case draws its behaviour from its ``rng``, so the test can compute what every case must be classified as.
"""

from __future__ import annotations

import os
import signal
import time

from tests.fuzz.harness import Finding
from trustgrad.errors import CryptoError

NAME = "_selftest"
BEHAVIOURS = ("refused", "invalid-verdict", "accepted", "crash", "hang", "memory", "traceback", "silent-accept")


def setup(workdir):
    return None


def behaviour(rng) -> str:
    return rng.choice(BEHAVIOURS)


def case(state, rng):
    chosen = behaviour(rng)
    if chosen == "refused":
        raise CryptoError("crafted ciphertext refused")
    if chosen == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if chosen == "hang":
        time.sleep(3600)
    if chosen == "memory":
        bytearray(1 << 40)  # far beyond any RLIMIT_AS budget: MemoryError
    if chosen == "traceback":
        raise RecursionError("maximum recursion depth exceeded")
    if chosen == "silent-accept":
        raise Finding("silent-accept", "changed payload decoded to different values")
    return chosen
