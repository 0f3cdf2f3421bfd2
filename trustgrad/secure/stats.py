"""What encryption cost a rank: seconds per phase and bytes on the wire, reported in summary.json."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class CryptoStats:
    seconds: dict[str, float] = field(
        default_factory=lambda: {"keygen": 0.0, "encrypt": 0.0, "aggregate": 0.0, "decrypt": 0.0}
    )
    encrypted_bytes: int = 0  # ciphertext bytes this rank sent
    plaintext_bytes: int = 0  # what the same payloads weigh as float32

    @contextmanager
    def timing(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started

    def sent(self, ciphertext_bytes: int, values: int) -> None:
        self.encrypted_bytes += ciphertext_bytes
        self.plaintext_bytes += 4 * values

    def summary(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {f"he_{k}_seconds": round(v, 4) for k, v in self.seconds.items()}
        out["encrypted_bytes"] = self.encrypted_bytes
        out["plaintext_equivalent_bytes"] = self.plaintext_bytes
        out["ciphertext_expansion"] = (
            round(self.encrypted_bytes / self.plaintext_bytes, 2) if self.plaintext_bytes else 0
        )
        return out
