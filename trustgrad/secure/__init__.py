"""Encryption in the training loop: distributed CKKS key set-up and encrypted aggregation over ``Comm``.

``trustgrad.crypto`` is the torch-free interface over OpenFHE; this package moves its keys and ciphertexts between
ranks (as bytes over torch.distributed) and keeps the accounting (bytes and seconds) that run summaries report.
"""

from .keys import KeyRing, setup_keys
from .stats import CryptoStats

__all__ = ["KeyRing", "setup_keys", "CryptoStats"]
