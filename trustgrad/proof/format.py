"""The proof format: a folder of JSON and safetensors files, and the bounded readers a verifier uses on it.

A proof (schema ``trustgrad-pol/2``) is everything a verifier needs besides the data itself (Jia et al. 2021, Alg. 1,
with the reference design's gaps closed: hyperparameters, seeds, data fingerprint and schema version are in the proof)::

    proof/
      manifest.json                  schema, config (every hyperparameter), seed, k, model state spec, data commitment,
                                     library versions and thread count, checkpoint steps
      checkpoints/step_00000010.safetensors
                                     full state after that many steps: ``model/<name>`` (state_dict incl. buffers),
                                     ``momentum/<param>`` (SGD momentum buffers), ``rng/torch`` (torch RNG state)
      indices.safetensors            ``indices``: int64 [steps, workers, batch_size], every worker's batch of every step
      commitment.json                Merkle root over the digests of all the files above

A proof comes from an untrusted prover, so every reader here bounds sizes *before* reading (a declared size is never
allocated unchecked), accepts only JSON and safetensors (never pickle), and checks names, dtypes and shapes against
what the verifier expects. Problems raise :class:`~trustgrad.errors.ProofError`; the verifier turns those into an
invalid verdict with the reason.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ProofError

__all__ = [
    "SCHEMA",
    "MANIFEST",
    "COMMITMENT",
    "INDICES",
    "checkpoint_name",
    "proof_files",
    "capture_state",
    "restore_state",
    "state_spec",
    "read_bounded",
    "read_json",
    "read_safetensors",
    "parse_safetensors",
    "safetensors_limit",
    "MAX_JSON_BYTES",
]

#: 2: the manifest names the loss and the optimizer by their registry names (1 hard-coded cross-entropy)
SCHEMA = "trustgrad-pol/2"
MANIFEST = "manifest.json"
COMMITMENT = "commitment.json"
INDICES = "indices.safetensors"
MAX_JSON_BYTES = 8 << 20  # a manifest of a huge run is well under a megabyte
HEADER_SLACK = 1 << 20  # safetensors JSON header and alignment, on top of the tensors' bytes

_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
_NAMES = {dt: name for name, (dt, _) in _DTYPES.items()}


def checkpoint_name(step: int) -> str:
    return f"checkpoints/step_{step:08d}.safetensors"


def proof_files(checkpoints: list[int]) -> list[str]:
    """The committed files of a proof, in commitment order: manifest, checkpoints (by step), indices."""
    return [MANIFEST, *(checkpoint_name(s) for s in checkpoints), INDICES]


# --------------------------------------------------------------------------------------------------------------------
# state <-> flat dict of tensors (one naming scheme for prover, verifier, replay and attacks)


#: optimizer state entry -> checkpoint prefix (SGD's momentum buffer keeps schema 2's ``momentum/``; Adam's moments
#: and step count are ``exp_avg/``, ``exp_avg_sq/``, ``step/``)
STATE_KEYS = {"momentum_buffer": "momentum", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", "step": "step"}
_PREFIX_KEYS = {prefix: key for key, prefix in STATE_KEYS.items()}


def capture_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rng: bool = True,
    into: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """A detached copy of the full training state: model state_dict, the optimizer's per-parameter state (SGD's
    momentum buffers; Adam's moments and step count), torch RNG state.

    ``into``: an earlier copy nobody reads any more; its tensors of the same name, shape and dtype are overwritten in
    place (a copy into memory already touched costs a fraction of a fresh clone's, whose new pages the kernel must
    fault in and zero: 12 ms against 30-70 ms for a ResNet-18 state; bench scale). The result is the same values."""
    into = into or {}

    def copy(name: str, value: torch.Tensor) -> torch.Tensor:
        old = into.get(name)
        if old is not None and old.shape == value.shape and old.dtype == value.dtype and old.is_contiguous():
            return old.copy_(value.detach())
        return value.detach().clone().contiguous()

    state = {f"model/{k}": copy(f"model/{k}", v) for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, s in optimizer.state.items():
        for key, prefix in STATE_KEYS.items():
            value = s.get(key)
            if isinstance(value, torch.Tensor):
                name = f"{prefix}/{names[id(p)]}"
                state[name] = copy(name, value)
    if rng:
        state["rng/torch"] = copy("rng/torch", torch.get_rng_state())
    return state


def restore_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` (as written by :func:`capture_state`) into a model and a fresh optimizer built on it."""
    model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model/")}, strict=True)
    params = dict(model.named_parameters())
    optimizer.state.clear()
    for key, value in state.items():
        prefix, _, name = key.partition("/")
        if prefix in _PREFIX_KEYS:
            dtype = torch.float32 if prefix == "step" else params[name].dtype  # Adam keeps its count as float32
            optimizer.state[params[name]][_PREFIX_KEYS[prefix]] = value.detach().clone().to(dtype)


def state_spec(model: nn.Module, with_momentum: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes a checkpoint of ``model`` must hold (the RNG state is checked separately)."""
    spec = {f"model/{k}": (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    if with_momentum:
        spec.update({f"momentum/{n}": (tuple(p.shape), p.dtype) for n, p in model.named_parameters()})
    return spec


# --------------------------------------------------------------------------------------------------------------------
# bounded readers


def read_bounded(path: Path, max_bytes: int, what: str) -> bytes:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ProofError(f"{what}: file {path.name!r} is missing") from None
    except OSError as exc:
        raise ProofError(f"{what}: cannot stat {path.name!r} ({exc.strerror})") from None
    if not path.is_file():
        raise ProofError(f"{what}: {path.name!r} is not a regular file")
    if size > max_bytes:
        raise ProofError(f"{what}: {path.name!r} is {size} bytes, more than the {max_bytes} this proof can need")
    try:
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise ProofError(f"{what}: cannot read {path.name!r} ({exc.strerror})") from None
    if len(data) > max_bytes:  # grew while we read it
        raise ProofError(f"{what}: {path.name!r} exceeds {max_bytes} bytes")
    return data


def read_json(path: Path, what: str, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """A JSON object from ``path``, at most ``max_bytes`` long (JSON only: nothing is executed)."""
    raw = read_bounded(path, max_bytes, what)
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise ProofError(f"{what}: {path.name!r} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ProofError(f"{what}: {path.name!r} must hold a JSON object")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard constant {name}")


def safetensors_limit(*specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    """The most bytes a safetensors file holding (a subset of) these tensors can take."""
    return sum(math.prod(shape) * _itemsize(dtype) for spec in specs for shape, dtype in spec.values()) + HEADER_SLACK


def read_safetensors(
    path: Path,
    what: str,
    spec: dict[str, tuple[tuple[int, ...], torch.dtype]],
    optional: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`parse_safetensors` of the file at ``path``, whose size is bounded before it is read."""
    raw = read_bounded(path, safetensors_limit(spec, optional or {}), what)
    return parse_safetensors(raw, path.name, what, spec, optional)


def parse_safetensors(
    raw: bytes,
    file_name: str,
    what: str,
    spec: dict[str, tuple[tuple[int, ...], torch.dtype]],
    optional: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
) -> dict[str, torch.Tensor]:
    """Tensors of safetensors bytes whose names, shapes and dtypes are exactly ``spec`` (plus any of ``optional``).

    The header's declared dtypes, shapes and offsets are checked against ``spec`` and against the buffer before any
    tensor is materialised, so a proof cannot make the verifier allocate more than it expects or read out of bounds.
    """
    optional = optional or {}
    allowed = {**optional, **spec}
    if len(raw) < 8:
        raise ProofError(f"{what}: {file_name!r} is truncated (no safetensors header)")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > min(len(raw) - 8, HEADER_SLACK):
        raise ProofError(f"{what}: {file_name!r} declares a {header_len}-byte header in a {len(raw)}-byte file")
    try:
        header = json.loads(raw[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProofError(f"{what}: {file_name!r} has a corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise ProofError(f"{what}: {file_name!r} has a corrupt safetensors header")
    header.pop("__metadata__", None)
    body = len(raw) - 8 - header_len
    missing = sorted(set(spec) - set(header))
    extra = sorted(set(header) - set(allowed))
    if missing or extra:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise ProofError(f"{what}: {file_name!r} has the wrong tensors ({detail})")
    for name, entry in header.items():
        shape, dtype = allowed[name]
        if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES:
            raise ProofError(f"{what}: tensor {name!r} has an unsupported dtype")
        if _DTYPES[entry["dtype"]][0] != dtype:
            raise ProofError(f"{what}: tensor {name!r} is {entry['dtype']}, expected {_NAMES[dtype]}")
        if entry.get("shape") != list(shape):
            raise ProofError(f"{what}: tensor {name!r} has shape {entry.get('shape')}, expected {list(shape)}")
        offsets = entry.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= body
            or offsets[1] - offsets[0] != math.prod(shape) * _itemsize(dtype)
        ):
            raise ProofError(f"{what}: tensor {name!r} has invalid data offsets (truncated or tampered file)")
    try:
        from safetensors.torch import load

        tensors = load(raw)
    except Exception as exc:  # the Rust parser's errors are SafetensorError; any failure means unusable input
        raise ProofError(f"{what}: {file_name!r} is not a valid safetensors file ({type(exc).__name__})") from None
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ProofError(f"{what}: tensor {name!r} holds NaN or infinite values")
    return tensors


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
