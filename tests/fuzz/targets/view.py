"""Fuzz target: server views (``trustgrad attack --view FILE``), mutants of one small honest view.

The format has no digest or commitment to recompute, but the safetensors header does have offsets: every mutant that
changes a tensor's dtype, shape or presence rewrites the header and the data so the file is well-formed safetensors,
and header rewrites keep the offsets consistent. A case drives what ``trustgrad attack`` does before the attack
itself: ``load_view`` and ``attack_inputs`` (the victim model built and loaded, the update checked against it).

``accepted`` is returned only when the loaded view is exactly what the file says (header fields and tensors): the
format is not authenticated (the server holding it is the attacker), so a content change read faithfully is not a
silent acceptance; a view that loads as something other than its bytes is.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Any

NAME = "view"

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}
_HUGE_INTS = [0, 1, 2, 3, 9, 11, 255, 65536, 10**6, 10**9, 2**31, 2**63 - 1, 2**64, 2**70, -1, -(2**63)]
_ODD_VALUES = [None, True, False, "10", 10.0, 1e308, float("inf"), [], {}, [10], "", "x" * 1000]


def setup(workdir: Path) -> dict[str, Any]:
    import torch

    from trustgrad.attacks.view import ServerView, save_view
    from trustgrad.data import load_dataset
    from trustgrad.models import build_model

    ds = load_dataset("digits")
    model = build_model("mlp", ds.input_shape, ds.num_classes, seed=0)
    x, y = ds.x_train[:2], ds.y_train[:2]
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    view = ServerView(
        kind="gradient",
        model="mlp",
        model_config={"name": "mlp", "hidden": 64, "depth": 2},
        input_shape=ds.input_shape,
        num_classes=ds.num_classes,
        state={k: v.detach() for k, v in model.state_dict().items()},
        batch_size=2,
        gradients=list(grads),
        truth_x=x,
        truth_y=y,
        meta={"step": 0, "senders": [1], "pattern": "ps"},
    )
    honest = save_view(workdir / "honest.safetensors", view)
    from trustgrad.attacks.on_view import attack_inputs
    from trustgrad.attacks.view import load_view

    attack_inputs(load_view(honest))  # the honest view loads (and the imports and meta kernels are warm)
    _warm_meta_kernels()
    return {"workdir": workdir, "raw": honest.read_bytes()}


# ----------------------------------------------------------------------------------------------------------------
# the safetensors container: 8-byte little-endian header length, JSON header, data


def _split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header: dict[str, Any], data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _tensors(header: dict[str, Any], data: bytes) -> dict[str, tuple[str, list[int], bytes]]:
    return {
        k: (v["dtype"], v["shape"], data[v["data_offsets"][0] : v["data_offsets"][1]])
        for k, v in header.items()
        if k != "__metadata__"
    }


def _pack(metadata: dict[str, str], tensors: dict[str, tuple[str, list[int], bytes]]) -> bytes:
    """A well-formed safetensors file: offsets recomputed from the tensors' bytes."""
    header: dict[str, Any] = {"__metadata__": metadata}
    data, offset = b"", 0
    for name, (dtype, shape, blob) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        data += blob
        offset += len(blob)
    return _join(header, data)


# ----------------------------------------------------------------------------------------------------------------
# mutators: each returns the mutant's bytes


def _set_field(view: dict[str, Any], rng: random.Random) -> None:
    key = rng.choice(["num_classes", "batch_size", "contributors", "num_gradients", "schema", "kind", "model"])
    pool = _HUGE_INTS + _ODD_VALUES + (["ciphertext", "aggregate", "lenet", "logreg", "poly-mlp"] if key in (
        "kind",
        "model",
    ) else [])  # fmt: skip
    view[key] = rng.choice(pool)


def _model_config(view: dict[str, Any], rng: random.Random) -> None:
    cfg = view["model_config"] if isinstance(view["model_config"], dict) else {}
    view["model_config"] = cfg
    choice = rng.randrange(5)
    if choice == 0:
        cfg[rng.choice(["hidden", "depth"])] = rng.choice(_HUGE_INTS + _ODD_VALUES)
    elif choice == 1:  # a model the file's size cannot hold, within the config's caps
        cfg.update(hidden=rng.choice([4096, 65536]), depth=rng.choice([1, 2, 256]))
    elif choice == 2:
        cfg[rng.choice(["width", "__class__", "name"])] = rng.choice(_ODD_VALUES)
    elif choice == 3:
        view["model_config"] = rng.choice(_ODD_VALUES)
    else:
        view["model"] = rng.choice(["mlp", "lenet", "lenet-sigmoid", "logreg", "poly-mlp", "nope", "MLP"])


def _input_shape(view: dict[str, Any], rng: random.Random) -> None:
    view["input_shape"] = rng.choice(
        [[], [64], [1, 8, 8], [8, 8], [1, 8, 8, 1], [0, 8, 8], [-1, 8, 8], [1, 2**40, 2**40], [3, 32, 32], ["1"]]
        + [[rng.choice(_HUGE_INTS)] * rng.randint(1, 3)]
    )


def _deep_meta(view: dict[str, Any], rng: random.Random) -> str:
    depth = rng.choice([4, 8, 9, 50, 1000, 20_000, 100_000])
    opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
    meta = opener * depth + ("1" if opener == "[" else "1") + closer * depth
    body = json.dumps({k: v for k, v in view.items() if k != "meta"})
    return body[:-1] + ', "meta": ' + meta + "}"


def _header_text(view: dict[str, Any], rng: random.Random) -> str:
    text = json.dumps(view)
    choice = rng.randrange(4)
    if choice == 0:
        return text[: rng.randrange(len(text))]
    if choice == 1:
        return text.replace("}", ', "pad": "' + "x" * rng.choice([10, 70_000]) + '"}', 1)
    if choice == 2:
        return rng.choice(["null", "[]", "1", '"view"', "{}", "NaN", "\x00" * 8])
    return text.replace('"schema": 1', '"schema": ' + rng.choice(["2", "1.0", "true", '"1"', "1e400"]))


def _mutate_header(raw: bytes, rng: random.Random) -> bytes:
    header, data = _split(raw)
    view = json.loads(header["__metadata__"]["trustgrad_view"])
    op = rng.randrange(6)
    text: str | None = None
    if op == 0:
        _set_field(view, rng)
    elif op == 1:
        _model_config(view, rng)
    elif op == 2:
        _input_shape(view, rng)
    elif op == 3:
        text = _deep_meta(view, rng)
    elif op == 4:
        text = _header_text(view, rng)
    else:
        for _ in range(rng.randint(2, 4)):  # several at once: consistent-looking lies
            rng.choice([_set_field, _model_config, _input_shape])(view, rng)
    header["__metadata__"]["trustgrad_view"] = json.dumps(view) if text is None else text
    return _join(header, data)


def _mutate_tensors(raw: bytes, rng: random.Random) -> bytes:
    header, data = _split(raw)
    tensors = _tensors(header, data)
    names = list(tensors)
    name = rng.choice(names)
    dtype, shape, blob = tensors[name]
    op = rng.randrange(7)
    if op == 0:  # same bytes read as another dtype of the same width
        same = [d for d, w in _DTYPE_BYTES.items() if w == _DTYPE_BYTES[dtype] and d != dtype]
        tensors[name] = (rng.choice(same or ["U8"]), shape if same else [len(blob)], blob)
    elif op == 1:  # the same values under another shape
        n = len(blob) // _DTYPE_BYTES[dtype]
        tensors[name] = (dtype, rng.choice([[n], [1, n], [n, 1], list(reversed(shape))]), blob)
    elif op == 2:
        del tensors[name]
    elif op == 3:  # a bigger tensor, consistently framed
        grow = rng.choice([1, 2, 10])
        tensors[name] = (dtype, [len(blob) * grow // _DTYPE_BYTES[dtype]], blob * grow)
    elif op == 4:
        tensors[rng.choice(["grad/99", "state/extra", "ciphertext", "truth/x"])] = ("F32", [4], b"\x00" * 16)
    elif op == 5:  # values: NaN, inf, huge labels
        fill = rng.choice([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xff\xff\xff\x7f"])
        tensors[name] = (dtype, shape, (fill * (len(blob) // 4 + 1))[: len(blob)])
    else:
        tensors[name] = (dtype, shape, bytes(b ^ 0xFF for b in blob))
    return _pack(header["__metadata__"], tensors)


def _mutate_bytes(raw: bytes, rng: random.Random) -> bytes:
    op = rng.randrange(4)
    if op == 0:
        return raw[: rng.randrange(len(raw))]
    if op == 1:
        return raw + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    if op == 2:
        at = rng.randrange(len(raw))
        return raw[:at] + bytes([raw[at] ^ (1 << rng.randrange(8))]) + raw[at + 1 :]
    return struct.pack("<Q", rng.choice([0, 7, 2**40, 2**63])) + raw[8:]


_MUTATORS = [_mutate_header, _mutate_header, _mutate_header, _mutate_tensors, _mutate_tensors, _mutate_bytes]


def case(state: dict[str, Any], rng: random.Random) -> str:
    from trustgrad.attacks.on_view import attack_inputs
    from trustgrad.attacks.view import load_view
    from trustgrad.errors import TrustgradError

    mutant = rng.choice(_MUTATORS)(state["raw"], rng)
    path = Path(state["workdir"]) / "mutant.safetensors"
    path.write_bytes(mutant)
    try:
        view = load_view(path)
        model, gradients = attack_inputs(view)
    except TrustgradError as exc:
        if len(str(exc).splitlines()) > 1:
            raise  # the harness classifies a multi-line message as a traceback
        return "refused"
    _check_faithful(mutant, view, model, gradients)
    return "accepted"


def _check_faithful(mutant: bytes, view: Any, model: Any, gradients: list[Any]) -> None:
    """What was accepted is exactly what the file says; anything else is a silent reinterpretation."""
    import torch

    from tests.fuzz.harness import Finding

    header, data = _split(mutant)
    declared = json.loads(header["__metadata__"]["trustgrad_view"])
    for key in ("kind", "model", "num_classes", "batch_size", "contributors"):
        if getattr(view, key) != declared[key]:
            raise Finding(
                "silent-accept", f"view field {key} loaded as {getattr(view, key)!r}, file says {declared[key]!r}"
            )
    if list(view.input_shape) != declared["input_shape"]:
        raise Finding("silent-accept", f"input_shape loaded as {view.input_shape}, file says {declared['input_shape']}")
    stored = _tensors(header, data)
    for name, tensor in view.state.items():
        if tensor.contiguous().numpy().tobytes() != stored[f"state/{name}"][2]:
            raise Finding("silent-accept", f"state/{name} differs from the file's bytes")
    loaded = model.state_dict()
    for name, tensor in view.state.items():
        if not torch.equal(loaded[name].to(tensor.dtype), tensor) and not torch.isnan(tensor).any():
            raise Finding("silent-accept", f"the victim model's {name} is not the view's state")
    if view.kind != "ciphertext" and len(gradients) != declared["num_gradients"]:
        raise Finding("silent-accept", f"{len(gradients)} gradients used, file declares {declared['num_gradients']}")


def _warm_meta_kernels() -> None:
    """Count every registry model once: torch's first meta forward of a layer type costs seconds on a loaded
    machine, which would otherwise land in whichever case meets that type first."""
    from trustgrad.config import ModelConfig
    from trustgrad.models import MODELS
    from trustgrad.resources import count_model

    for name in MODELS.names():
        shape = (1, 32, 32) if "lenet" in name else (1, 8, 8)
        count_model(name, shape, 10, ModelConfig(name=name))
