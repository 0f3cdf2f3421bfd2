"""Blind verification: the server checks a worker's gradient claim on ciphertexts and decrypts only a distance."""

from trustgrad.blind.models import poly_bce, reference_gradient, squared_distance
from trustgrad.blind.packing import Layout
from trustgrad.blind.params import BlindParams, context_from_bytes
from trustgrad.blind.step_check import (
    BlindVerifier,
    EncryptedGradient,
    EncryptedSamples,
    SampleStore,
    Verdict,
    encrypt_claim,
    encrypt_model,
    encrypt_samples,
    judge,
)

__all__ = [
    "BlindParams",
    "BlindVerifier",
    "EncryptedGradient",
    "EncryptedSamples",
    "Layout",
    "SampleStore",
    "Verdict",
    "context_from_bytes",
    "encrypt_claim",
    "encrypt_model",
    "encrypt_samples",
    "judge",
    "poly_bce",
    "reference_gradient",
    "squared_distance",
]
