"""The attacker's view: exactly what a (compromised) server received at one step, stored as one safetensors file.

A view holds the model state the update was computed at (the server sent it), what was observed — one worker's
plaintext gradient (``kind="gradient"``), the aggregate (``"aggregate"``) or ciphertext bytes (``"ciphertext"``) — and,
under ``truth/``, the batch that produced it. The truth is for *scoring* the attack afterwards; attacks never read it.

The file is untrusted input: it is read with safetensors (no pickle) after a size check against the memory budget,
its header is bounded before it is parsed, and every size it declares is checked against what the file holds and
what an attack on it would allocate (``AttackError``, one line, exit 2) before a model is built (docs/limits.md).
"""

from __future__ import annotations

import json
import math
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


#: a view header is a few hundred bytes (its ``meta`` lists senders); anything larger is not a trustgrad view
_MAX_HEADER_CHARS = 64 << 10
_MAX_HEADER_DEPTH = 8  # header -> meta -> lists of senders: 3 levels used; json recurses per level
_MAX_CLASSES = 1 << 20
_MAX_BATCH = 1 << 16  # DLG's setting is batch 1-8; a large batch is no gradient-inversion target
_MAX_GRADIENTS = 4096  # one per trainable parameter tensor of a registry model (mlp depth 256: 514)
_MAX_MODEL_NAME = 64
_LBFGS_HISTORY = 100  # DLG's L-BFGS keeps 2 x history vectors the size of the dummy batch (dlg.py)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def load_view(path: str | Path, *, budget: int | None = None) -> ServerView:
    """Read and validate a view file; any problem is an ``AttackError`` (one line, exit 2) naming it.

    Order matters (issue 14): the file size against the memory budget, then the header alone (bounded text and
    nesting), then every size the header declares against what the file holds and what an attack on it would
    allocate (the model counted on torch's ``meta`` device, nothing built), and only then the tensors.
    ``budget`` (bytes) defaults to :func:`trustgrad.resources.memory_budget` of this machine.
    """
    from ..resources import Machine, budget_text, human_bytes, memory_budget

    path = Path(path)
    where = f"view file {_short(str(path))}"
    if not path.is_file():
        raise AttackError(f"{where} does not exist")
    size = path.stat().st_size
    machine = Machine.detect() if budget is None else None
    budget = memory_budget(machine) if machine is not None else budget
    limit_text = budget_text(machine) if machine is not None else f"the memory budget of {human_bytes(budget)}"
    if size > _MAX_BYTES or size > budget:
        raise AttackError(f"{where} is {human_bytes(size)}: larger than {_MAX_BYTES >> 30} GiB or {limit_text}")
    header, names = _read_header(path, where)
    fields = _header_fields(header, names, where, size)
    _check_sizes(fields, where, size, budget, limit_text)
    tensors = _read_tensors(path, where)
    return _assemble(fields, tensors, where)


def _read_header(path: Path, where: str) -> tuple[dict[str, Any], list[str]]:
    """The trustgrad header and the tensor names, without loading any tensor."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            names = list(fh.keys())  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as exc:
        raise AttackError(f"{where} is corrupt or not a trustgrad view ({_first_line(exc)})") from None
    text = metadata.get("trustgrad_view")
    if not isinstance(text, str):
        raise AttackError(f"{where} has no trustgrad view header (schema {_SCHEMA})")
    if len(text) > _MAX_HEADER_CHARS:
        raise AttackError(f"{where}: its header is {len(text)} characters (max {_MAX_HEADER_CHARS}): not a view")
    try:
        header = json.loads(text)
    except RecursionError:
        raise AttackError(f"{where}: its header is nested too deeply (max {_MAX_HEADER_DEPTH} levels)") from None
    except ValueError as exc:
        raise AttackError(f"{where}: its header is not JSON ({_first_line(exc)})") from None
    if _depth(header) > _MAX_HEADER_DEPTH:
        raise AttackError(f"{where}: its header is nested too deeply (max {_MAX_HEADER_DEPTH} levels)")
    if not isinstance(header, dict) or header.get("schema") != _SCHEMA:
        raise AttackError(f"{where} has no trustgrad view header (schema {_SCHEMA})")
    return header, names


def _header_fields(header: dict[str, Any], names: list[str], where: str, size: int) -> dict[str, Any]:
    """Every header field type- and range-checked; the sizes bounded by what the file can hold."""
    from ..config import model_config_from_dict
    from ..errors import ConfigError

    kind = _pick(header, "kind", str)
    if kind not in VIEW_KINDS:
        raise AttackError(f"view kind must be one of {VIEW_KINDS}, got {_short(kind)}")
    model = _pick(header, "model", str)
    if not 0 < len(model) <= _MAX_MODEL_NAME:
        raise AttackError(f"{where}: view header field 'model' must be a model name, got {_short(model)}")
    try:
        model_config = model_config_from_dict(_pick(header, "model_config", dict))
    except ConfigError as exc:
        raise AttackError(f"{where}: the view's model_config is invalid: {exc}") from None
    # every class owns at least one float32 weight of the last layer in the stored state
    num_classes = _bounded(header, "num_classes", 2, min(_MAX_CLASSES, size // 4), where)
    batch_size = _bounded(header, "batch_size", 1, _MAX_BATCH, where)
    fields = {
        "kind": kind,
        "model": model,
        "model_config": model_config,
        "input_shape": _shape(_pick(header, "input_shape", list)),
        "num_classes": num_classes,
        "batch_size": batch_size,
        "contributors": _bounded(header, "contributors", 1, batch_size, where),
        "num_gradients": _bounded(header, "num_gradients", 0, _MAX_GRADIENTS, where),
        "meta": _pick(header, "meta", dict),
    }
    stored = sum(n.startswith("grad/") for n in names)
    if kind != "ciphertext" and fields["num_gradients"] != stored:
        raise AttackError(f"{where}: the header declares {fields['num_gradients']} gradients, the file holds {stored}")
    return fields


def _check_sizes(fields: dict[str, Any], where: str, size: int, budget: int, limit_text: str) -> None:
    """The declared model must fit the file (its state is stored there) and an attack on it the memory budget."""
    from ..errors import ConfigError
    from ..resources import count_model, human_bytes

    shape = fields["input_shape"]
    try:
        count = count_model(fields["model"], shape, fields["num_classes"], fields["model_config"], size // 4)
    except ConfigError as exc:
        raise AttackError(f"the view names a model trustgrad cannot build: {exc}") from None
    state = count.parameters * 4
    if state > size:
        raise AttackError(
            f"the view's state does not fit model {fields['model']!r}: {where} declares {count.parameters:,} "
            f"parameters ({human_bytes(state)}) but holds {human_bytes(size)} in all"
        )
    batch, sample = fields["batch_size"], int(np.prod(shape))
    # the victim model, its gradients and the second-order graph; the dummy batch with L-BFGS's history;
    # activations forward and backward twice (gradient of the gradient); the file's tensors
    need = 4 * (
        4 * count.parameters + batch * sample * (2 * _LBFGS_HISTORY + 4) + 4 * batch * count.activations_per_sample
    )
    need += size
    if need > budget:
        raise AttackError(
            f"{where}: an attack on its {fields['model']} ({count.parameters:,} parameters, batch {batch}) needs an "
            f"estimated {human_bytes(need)}, above {limit_text}"
        )


def _read_tensors(path: Path, where: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, MemoryError) as exc:
        raise AttackError(f"{where} is corrupt or not a trustgrad view ({_first_line(exc)})") from None


def _assemble(fields: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> ServerView:
    kind, batch = fields["kind"], fields["batch_size"]
    state = {k[len("state/") :]: v for k, v in tensors.items() if k.startswith("state/")}
    gradients = [tensors[f"grad/{i}"] for i in range(fields["num_gradients"])] if kind != "ciphertext" else None
    for name, tensor in [*state.items(), *enumerate(gradients or [])]:
        if tensor.dtype not in _FLOAT_DTYPES:
            raise AttackError(f"{where}: tensor {_short(str(name))} has dtype {tensor.dtype}, not floating point")
    ciphertext = None
    if kind == "ciphertext":
        raw = tensors.get("ciphertext")
        if raw is None or raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() == 0:
            raise AttackError(f"{where} holds no ciphertext bytes (a 1-D uint8 tensor 'ciphertext')")
        ciphertext = raw.numpy().tobytes()
    truth_x, truth_y = tensors.get("truth/x"), tensors.get("truth/y")
    if (truth_x is None) != (truth_y is None):
        raise AttackError(f"{where}: ground truth needs both truth/x and truth/y")
    if truth_x is not None and truth_y is not None:
        if tuple(truth_x.shape) != (batch, *fields["input_shape"]) or tuple(truth_y.shape) != (batch,):
            raise AttackError(
                f"{where}: its ground truth does not match batch {batch} of inputs {fields['input_shape']}"
            )
        if truth_x.dtype not in _FLOAT_DTYPES or truth_y.dtype.is_floating_point or truth_y.dtype == torch.bool:
            raise AttackError(f"{where}: its ground truth has the wrong dtypes ({truth_x.dtype}, {truth_y.dtype})")
        if truth_y.numel() and not 0 <= int(truth_y.min()) <= int(truth_y.max()) < fields["num_classes"]:
            raise AttackError(f"{where}: its ground-truth labels lie outside 0..{fields['num_classes'] - 1}")
    if not state:
        raise AttackError(f"{str(where)} has an implausible header (batch, classes or state missing)")
    from ..config import config_to_dict

    return ServerView(
        kind=kind,
        model=fields["model"],
        model_config=config_to_dict(fields["model_config"]),
        input_shape=fields["input_shape"],
        num_classes=fields["num_classes"],
        state=state,
        batch_size=batch,
        contributors=fields["contributors"],
        gradients=gradients,
        ciphertext=ciphertext,
        truth_x=truth_x,
        truth_y=truth_y,
        meta=fields["meta"],
    )


def _bounded(header: dict[str, Any], key: str, low: int, high: int, where: str) -> int:
    value = _pick(header, key, int)
    if not low <= value <= high:
        raise AttackError(f"{where}: view header field {key!r} must be in [{low}, {high}], got {_short(value)}")
    return value


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, iteratively (the value came from a parser that recursed already)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """A foreign library's message cut to its first line (OpenFHE and torch append C++ stack traces)."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return lines[0][:limit]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shape(values: list[Any]) -> tuple[int, ...]:
    """An input shape from an untrusted header: 1 to 3 positive ints, at most 2**22 values in all."""
    if not 1 <= len(values) <= 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise AttackError(f"view header field 'input_shape' must be 1 to 3 positive integers, got {_short(values)}")
    if math.prod(values) > 1 << 22:
        raise AttackError(f"view header field 'input_shape' is implausibly large: {_short(values)}")
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
