from __future__ import annotations

import pytest

from trustgrad.config import CryptoConfig
from trustgrad.crypto import CKKSParams, Context
from trustgrad.errors import ConfigError, CryptoError


def test_presets_are_128_bit_n8192_with_bv():
    for keys, scale in (("shared", 40), ("threshold", 50)):
        params = CKKSParams.for_aggregation(keys)
        assert (params.scale_bits, params.security, params.depth) == (scale, "128", 1)
        ctx = Context(params)
        # BV keeps N = 8192; HYBRID would be refused at 8192 and pick 16384 (see params.py)
        assert (ctx.ring_dim, ctx.slots) == (8192, 4096)


def test_hybrid_needs_a_larger_ring():
    assert Context(CKKSParams.for_aggregation("shared", key_switching="hybrid")).ring_dim == 16384
    with pytest.raises(CryptoError, match="does not comply"):
        Context(CKKSParams.for_aggregation("shared", key_switching="hybrid", ring_dim=8192))


def test_ring_too_small_for_security_is_refused():
    with pytest.raises(CryptoError, match="creating the CKKS context failed"):
        Context(CKKSParams(ring_dim=1024))


def test_insecure_requires_explicit_opt_in():
    with pytest.raises(CryptoError, match="insecure"):
        CKKSParams(security="none", ring_dim=1024)
    assert CKKSParams(security="none", ring_dim=1024, allow_insecure=True).security == "none"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ring_dim": 1000}, "ring_dim"),
        ({"scale_bits": 10}, "scale_bits"),
        ({"scale_bits": 50, "first_mod_bits": 50}, "first_mod_bits"),
        ({"first_mod_bits": 61}, "first_mod_bits"),
        ({"depth": 0}, "depth"),
        ({"batch_size": 3}, "batch_size"),
        ({"ring_dim": 1024, "batch_size": 1024, "security": "none", "allow_insecure": True}, "batch_size"),
        ({"security": "512"}, "security"),
        ({"key_switching": "ghs"}, "key_switching"),
        ({"digit_bits": 61}, "digit_bits"),
        ({"security": "none", "allow_insecure": True}, "ring_dim"),
    ],
)
def test_out_of_range_values_name_the_argument(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CKKSParams(**kwargs)


def test_preset_rejects_unknown_key_mode():
    with pytest.raises(ConfigError, match="keys"):
        CKKSParams.for_aggregation("quorum")


def test_from_config():
    assert CKKSParams.from_config(CryptoConfig(encrypt="ckks", keys="threshold")).scale_bits == 50
    p = CKKSParams.from_config(CryptoConfig(encrypt="ckks", security="none", ring_dim=2048, scale_bits=45))
    assert (p.security, p.allow_insecure, p.ring_dim, p.scale_bits) == ("none", True, 2048, 45)
