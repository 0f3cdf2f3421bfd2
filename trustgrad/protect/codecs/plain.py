"""The plaintext codec: a flat float32 gradient as its raw bytes; the server takes the mean and sends the model."""

from __future__ import annotations

from typing import Any

import torch

from ...errors import LaunchError
from ..slots import ServerCodec, WorkerCodec

__all__ = ["PlainServer", "PlainWorker", "mean"]


def mean(values: list[torch.Tensor]) -> torch.Tensor:
    """The mean of a round's gradients, summed in sender order in float32 (what ``allreduce`` computes)."""
    total = values[0].clone()
    for g in values[1:]:
        total.add_(g)
    return total.div_(len(values))


class PlainServer(ServerCodec):
    def max_payload(self, num_params: int) -> int:
        return 0  # the server's inbox bound already covers a float32 model

    def decode(self, payload: bytes, rank: int, num_params: int) -> torch.Tensor:
        if len(payload) != 4 * num_params:
            raise LaunchError(
                f"ps: worker {rank - 1} pushed {len(payload)} bytes, expected {4 * num_params} (float32 x {num_params})"
            )
        return torch.frombuffer(bytearray(payload), dtype=torch.float32)

    def combine(self, values: list[Any]) -> torch.Tensor:
        return mean(values)


class PlainWorker(WorkerCodec):
    def encode(self, flat: torch.Tensor) -> bytes:
        return flat.detach().to(torch.float32).contiguous().numpy().tobytes()

    def max_payload(self, num_params: int) -> int:
        return 4 * num_params

    def apply(self, replica: Any, payload: torch.Tensor) -> None:  # the server sends the model itself
        replica.set_flat_params(payload)
