"""Shared fixtures: contexts are costly to key, so one per session (OpenFHE contexts are immutable once built)."""

from __future__ import annotations

import numpy as np
import pytest

from trustgrad.crypto import CKKSParams, Context, keygen, threshold_keygen

# Toy parameters (N=1024, 512 slots) for tests whose outcome does not depend on size; insecure on purpose.
SMALL = {"ring_dim": 1024, "security": "none", "allow_insecure": True}


@pytest.fixture(scope="session")
def small_ctx() -> Context:
    return Context(CKKSParams.for_aggregation("shared", depth=2, **SMALL))


@pytest.fixture(scope="session")
def small_keys(small_ctx):
    return keygen(small_ctx)


@pytest.fixture(scope="session")
def small_threshold():
    """A 3-party threshold key on toy parameters: (context, joint public key, [share1, share2, share3])."""
    ctx = Context(CKKSParams.for_aggregation("threshold", **SMALL))
    pk, shares = None, []
    for _ in range(3):
        pk, share = threshold_keygen(ctx, 3, pk)
        shares.append(share)
    return ctx, pk, shares


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
