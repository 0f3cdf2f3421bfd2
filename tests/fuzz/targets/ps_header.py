"""Fuzz ``trustgrad.patterns.ps.protocol.parse_push_header``: the float64 header a ps worker sends before a push.

A worker controls every field. Accepted headers must be exactly what was sent, as integers (no rounding of a fraction,
no NaN or infinity reaching ``int()``), of a known kind, and a gradient must announce 1..max_payload bytes (the server
allocates that much before it receives the payload).
"""

from __future__ import annotations

import math

from tests.fuzz.harness import Finding
from trustgrad.errors import TrustgradError
from trustgrad.patterns.ps.protocol import DONE, GRADIENT, HEADER, parse_push_header

NAME = "ps_header"
MAX_PAYLOAD = 4 * 8970 + 4096
_ODD = [math.nan, math.inf, -math.inf, -0.0, -1.0, 0.5, 1e300, 2.0**53, 2.0**53 + 2, 2.0**63, 3.0, 7.0]


def setup(workdir):
    return [float(GRADIENT), 12.0, 30.0, float(4 * 8970), 2.1]


def case(state, rng):
    values = list(state)
    choice = rng.randrange(4)
    if choice == 0:
        values[rng.randrange(HEADER)] = rng.choice(_ODD)
    elif choice == 1:
        values[3] = float(rng.choice([0, 1, MAX_PAYLOAD, MAX_PAYLOAD + 1, -MAX_PAYLOAD, rng.randrange(1 << 40)]))
        values[0] = float(rng.choice([GRADIENT, DONE, 0, 4, -1]))
    elif choice == 2:
        values = values[: rng.randrange(HEADER)] + [rng.random() for _ in range(rng.randrange(3))]
    else:
        values = [rng.choice(_ODD + [rng.uniform(-1e6, 1e6)]) for _ in range(HEADER)]
    try:
        kind, step, version, nbytes, loss = parse_push_header(values, 3, MAX_PAYLOAD)
    except TrustgradError as exc:
        if "\n" in str(exc):
            raise
        return "refused"
    exact = [kind, step, version, nbytes] == values[:4] and all(isinstance(v, int) for v in (kind, step, version))
    if not exact or (kind == GRADIENT and not 0 < nbytes <= MAX_PAYLOAD) or kind not in (1, 2, 3):
        raise Finding("silent-accept", f"accepted {values} as {(kind, step, version, nbytes, loss)}")
    return "accepted"
