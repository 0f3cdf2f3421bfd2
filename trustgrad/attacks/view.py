"""The attacker's view: exactly what a (compromised) server received at one step, stored as one safetensors file.

A view holds the model state the update was computed at (the server sent it), what was observed — one worker's
plaintext gradient (``kind="gradient"``), the aggregate (``"aggregate"``) or ciphertext bytes (``"ciphertext"``) — and,
under ``truth/``, the batch that produced it. The truth is for *scoring* the attack afterwards; attacks never read it.

The file is untrusted input: it is read with safetensors (no pickle) after a size check, and every field is validated
(``AttackError``, one line) before a model is built from it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import AttackError

__all__ = ["ServerView", "save_view", "load_view", "VIEW_KINDS"]

VIEW_KINDS = ("gradient", "aggregate", "ciphertext")
_MAX_BYTES = 4 << 30
_SCHEMA = 1


@dataclass(frozen=True)
class ServerView:
    kind: str
    model: str
    model_config: dict[str, Any]
    input_shape: tuple[int, ...]
    num_classes: int
    state: dict[str, torch.Tensor]
    batch_size: int  # samples behind the observed update (per worker batch x contributors)
    contributors: int = 1
    gradients: list[torch.Tensor] | None = None  # per trainable parameter, in model.parameters() order
    ciphertext: bytes | None = None
    truth_x: torch.Tensor | None = None
    truth_y: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # step, worker, pattern, encryption, ...


def save_view(path: str | Path, view: ServerView) -> Path:
    from safetensors.torch import save_file

    if view.kind not in VIEW_KINDS:
        raise ValueError(f"view kind must be one of {VIEW_KINDS}, got {view.kind!r}")
    tensors = {f"state/{k}": v.detach().cpu().contiguous() for k, v in view.state.items()}
    for i, g in enumerate(view.gradients or []):
        tensors[f"grad/{i}"] = g.detach().cpu().contiguous()
    if view.ciphertext is not None:
        tensors["ciphertext"] = torch.frombuffer(bytearray(view.ciphertext), dtype=torch.uint8)
    if view.truth_x is not None:
        tensors["truth/x"] = view.truth_x.detach().cpu().contiguous()
        tensors["truth/y"] = view.truth_y.detach().cpu().contiguous()
    header = {
        "schema": _SCHEMA,
        "kind": view.kind,
        "model": view.model,
        "model_config": view.model_config,
        "input_shape": list(view.input_shape),
        "num_classes": view.num_classes,
        "batch_size": view.batch_size,
        "contributors": view.contributors,
        "num_gradients": len(view.gradients or []),
        "meta": view.meta,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, os.fspath(path), metadata={"trustgrad_view": json.dumps(header)})
    return path


def load_view(path: str | Path) -> ServerView:
    """Read and validate a view file; any problem is an ``AttackError`` naming it."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise AttackError(f"view file {str(path)!r} does not exist")
    if path.stat().st_size > _MAX_BYTES:
        raise AttackError(f"view file {str(path)!r} is larger than {_MAX_BYTES >> 30} GiB")
    try:
        with safe_open(os.fspath(path), framework="pt") as fh:
            header = json.loads((fh.metadata() or {}).get("trustgrad_view", "null"))
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as exc:
        raise AttackError(f"view file {str(path)!r} is corrupt or not a trustgrad view ({exc})") from None
    if not isinstance(header, dict) or header.get("schema") != _SCHEMA:
        raise AttackError(f"view file {str(path)!r} has no trustgrad view header (schema {_SCHEMA})")
    try:
        kind = _pick(header, "kind", str)
        if kind not in VIEW_KINDS:
            raise AttackError(f"view kind must be one of {VIEW_KINDS}, got {kind!r}")
        n_grads = _pick(header, "num_gradients", int)
        gradients = [tensors[f"grad/{i}"] for i in range(n_grads)] if kind != "ciphertext" else None
        ciphertext = tensors["ciphertext"].numpy().tobytes() if kind == "ciphertext" else None
        view = ServerView(
            kind=kind,
            model=_pick(header, "model", str),
            model_config=_pick(header, "model_config", dict),
            input_shape=_shape(_pick(header, "input_shape", list)),
            num_classes=_pick(header, "num_classes", int),
            state={k[len("state/") :]: v for k, v in tensors.items() if k.startswith("state/")},
            batch_size=_pick(header, "batch_size", int),
            contributors=_pick(header, "contributors", int),
            gradients=gradients,
            ciphertext=ciphertext,
            truth_x=tensors.get("truth/x"),
            truth_y=tensors.get("truth/y"),
            meta=_pick(header, "meta", dict),
        )
    except KeyError as exc:
        raise AttackError(f"view file {str(path)!r} lacks {exc.args[0]!r}") from None
    if view.batch_size < 1 or view.num_classes < 2 or not view.state:
        raise AttackError(f"view file {str(path)!r} has an implausible header (batch, classes or state missing)")
    if ciphertext is not None and not ciphertext:
        raise AttackError(f"view file {str(path)!r} holds an empty ciphertext")
    return view


def _shape(values: list[Any]) -> tuple[int, ...]:
    """An input shape from an untrusted header: 1 to 3 positive ints, at most 2**22 values in all."""
    if not 1 <= len(values) <= 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise AttackError(f"view header field 'input_shape' must be 1 to 3 positive integers, got {values!r}")
    if int(np.prod(values)) > 1 << 22:
        raise AttackError(f"view header field 'input_shape' is implausibly large: {values!r}")
    return tuple(values)


def _pick(header: dict[str, Any], key: str, kind: type) -> Any:
    value = header.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise AttackError(f"view header field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def ciphertext_as_gradients(ciphertext: bytes, shapes: list[torch.Size]) -> list[torch.Tensor]:
    """What an attacker without the key can make of ciphertext bytes: read them as if they were the update.

    Bytes are mapped to [-0.5, 0.5] and cut to the parameters' shapes (repeated if too short). This is the best a
    gradient-inversion attack can do with a CKKS ciphertext, which is indistinguishable from uniform noise without the
    secret key (RLWE); the experiments check it does no better than the data-free baseline.
    """
    total = sum(int(np.prod(s)) for s in shapes)
    raw = np.frombuffer(ciphertext, dtype=np.uint8)
    raw = np.resize(raw, total).astype(np.float32) / 255.0 - 0.5
    out, offset = [], 0
    for s in shapes:
        n = int(np.prod(s))
        out.append(torch.from_numpy(raw[offset : offset + n].copy()).reshape(s))
        offset += n
    return out
