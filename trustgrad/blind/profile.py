"""Where a blind-verified job spends its seconds: the breakdown ``trustgrad bench blind`` prints, as the run summary
carries it (``summary.json``: ``blind_breakdown``), so a job and the benchmark compare phase by phase.

Phases, at the server (the workers wait on it for all but set-up and re-keying): ``set-up`` (threshold keys, the
joint evaluation keys, every owner's samples received and checked, W0 encrypted), of which ``keys`` is the wait for
the key parties' keys; ``model update`` (the encrypted SGD step and the published mean); ``check`` (recomputing the
round's gradients and their weighted distances); ``verdict decryption`` (the round trip for every key party's partial
decryptions and their fusion); ``re-key`` (after an exclusion: keys, samples and the survivors' models again).

>>> b = blind_breakdown({"check_seconds": 2.0, "verdict_seconds": 0.5, "rekey_seconds": 0.0, "audited_claims": 4,
...                      "verdict_decryptions": 1}, 9.0, {"keygen": 6.0, "aggregate": 0.1})
>>> b["seconds"]["check"], b["per_claim"]["check"]
(2.0, 0.5)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["blind_breakdown"]


def blind_breakdown(report: Mapping[str, Any], setup_seconds: float, he_seconds: Mapping[str, float]) -> dict[str, Any]:
    """The server's seconds per phase (totals and per checked claim) from its audit report and crypto timings."""
    seconds = {
        "set-up": float(setup_seconds),
        "keys": float(he_seconds.get("keygen", 0.0)),
        "model update": float(he_seconds.get("aggregate", 0.0)),
        "check": float(report["check_seconds"]),
        "verdict decryption": float(report["verdict_seconds"]),
        "re-key": float(report["rekey_seconds"]),
    }
    claims = max(1, int(report["audited_claims"]))
    return {
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "per_claim": {k: round(seconds[k] / claims, 4) for k in ("check", "verdict decryption")},
        "verdict_decryptions": int(report.get("verdict_decryptions", 0)),
    }
