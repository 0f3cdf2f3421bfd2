"""Fuzz target: Proof-of-Learning folders (``trustgrad.proof.verify``), mutated and re-committed as a forger would.

``setup`` writes one tiny honest proof (2 workers, a 64-4-10 mlp, 6 steps, k=2: three segments); every case copies
it, applies one to three mutations drawn from the case's rng (a manifest leaf replaced, deleted or added; a
checkpoint tensor rescaled, zeroed, made NaN, re-typed, re-shaped, dropped or added; the generator state zeroed or
randomised; an index moved out of range or swapped; a file truncated, padded, swapped or given a forged header), and
recomputes the commitment most of the time (a forger can). Outcomes:

- ``refused``: ``ProofError`` with a one-line message (not a proof at all, or beyond the memory budget);
- ``invalid-verdict``: a verdict with reasons, none of them the verifier's own "unexpected error" fallback;
- ``accepted``: only if the mutation changed nothing the verifier claims to check -- the files are equal as values
  (tensors bit for bit, manifest as parsed JSON), or every changed manifest key is one the verdict lists as not
  checked (or ``config.epochs`` / ``config.max_steps`` that leave the step count as it was). Anything else accepted
  is a ``silent-accept`` finding.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

NAME = "proof"

_VALUES: list[Any] = [
    0,
    -1,
    1,
    2,
    7,
    2**31,
    2**62,
    2**200,
    10**12,
    0.5,
    1e-300,
    1e308,
    -1e308,
    "",
    "x",
    "sgd",
    None,
    [],
    {},
    True,
    False,
    [1, 2],
    {"a": 1},
    "cross-entropy",
    "poly-bce",
    "a" * 5000,
]


def setup(workdir: Path) -> dict[str, Any]:
    import torch

    from trustgrad.attacks.pol_spoof import honest_proof
    from trustgrad.config import RunConfig

    torch.set_num_threads(1)
    cfg = RunConfig().replace(
        workers=2,
        max_steps=6,
        epochs=1000,
        seed=5,
        progress=False,
        model={"name": "mlp", "hidden": 4, "depth": 1},
        proof={"k": 2},
    )
    honest = honest_proof(cfg, Path(workdir) / "honest")
    files = sorted(p.relative_to(honest).as_posix() for p in honest.rglob("*") if p.is_file())
    return {"honest": honest, "files": files, "work": Path(workdir), "count": 0}


def case(state: dict[str, Any], rng: random.Random) -> str:
    from trustgrad.errors import ProofError
    from trustgrad.proof import VerifyOptions, verify
    from trustgrad.proof.writer import recommit

    state["count"] += 1
    path = state["work"] / f"case{state['count'] % 4}"
    if path.exists():
        shutil.rmtree(path)
    shutil.copytree(state["honest"], path)
    applied = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        # a mutator that cannot read what an earlier one broke is skipped (the forger's tooling, not the verifier)
        with contextlib.suppress(Exception):
            applied.append(rng.choice(_MUTATORS)(path, rng))
    if rng.random() < 0.85:
        with contextlib.suppress(ValueError, KeyError, TypeError, OSError, RecursionError):
            recommit(path)  # when the forger's own tool gives up, the verifier sees the stale commitment
    options = VerifyOptions(check_all=rng.random() < 0.7, nonce=str(rng.getrandbits(32)))
    try:
        verdict = verify(path, options)
    except ProofError as exc:
        if "\n" in str(exc):
            raise _finding("traceback", f"multi-line ProofError after {applied}: {str(exc)[:200]}") from None
        return "refused"
    if not verdict.valid:
        if verdict.failed("verifier"):
            raise _finding("traceback", f"verifier fallback after {applied}: {verdict.reasons[-1][:300]}")
        return "invalid-verdict"
    changed = _semantic_changes(state["honest"], path)
    if all(_harmless(key, state["honest"], path) for key in changed):
        return "accepted"
    raise _finding("silent-accept", f"{applied} accepted; changed {sorted(changed)[:5]}")


# ---------------------------------------------------------------------------------------------------- mutators


def _manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / "manifest.json").read_text())


def _write_manifest(path: Path, m: Any) -> None:
    (path / "manifest.json").write_text(json.dumps(m))


def _leaf_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    if isinstance(value, dict) and value:
        return [p for k, v in value.items() for p in _leaf_paths(v, (*prefix, k))]
    if isinstance(value, list) and value and len(value) < 50:
        return [p for i, v in enumerate(value) for p in _leaf_paths(v, (*prefix, i))]
    return [prefix]


def _set_leaf(path: Path, rng: random.Random) -> str:
    m = _manifest(path)
    where = rng.choice(_leaf_paths(m))
    node = m
    for key in where[:-1]:
        node = node[key]
    old = node[where[-1]]
    choices = [*_VALUES]
    if isinstance(old, (int, float)) and not isinstance(old, bool):
        choices += [old + 1, old - 1, old * 2, -old, old * (1 + 1e-9), float(old)]
    node[where[-1]] = rng.choice(choices)
    _write_manifest(path, m)
    return f"set {'.'.join(map(str, where))}"


def _delete_key(path: Path, rng: random.Random) -> str:
    m = _manifest(path)
    where = rng.choice([p for p in _leaf_paths(m) if p and isinstance(p[-1], str)])
    node = m
    for key in where[:-1]:
        node = node[key]
    del node[where[-1]]
    _write_manifest(path, m)
    return f"delete {'.'.join(map(str, where))}"


def _add_key(path: Path, rng: random.Random) -> str:
    m = _manifest(path)
    target = rng.choice([m, m["config"], m["training"], m["config"]["model"]])
    target[rng.choice(["extra", "__class__", "lr", "hidden", "steps"])] = rng.choice(_VALUES)
    _write_manifest(path, m)
    return "add key"


def _manifest_bytes(path: Path, rng: random.Random) -> str:
    kind = rng.choice(["truncate", "deep", "nan", "binary", "list", "reformat"])
    raw = (path / "manifest.json").read_bytes()
    data = {
        "truncate": raw[: rng.randrange(len(raw))],
        "deep": b"[" * 100_000 + b"]" * 100_000,
        "nan": raw.replace(b'"lr": 0.1', b'"lr": NaN', 1),
        "binary": bytes(rng.getrandbits(8) for _ in range(64)),
        "list": b"[1, 2, 3]",
        "reformat": json.dumps(json.loads(raw), indent=rng.choice([None, 0, 4]), sort_keys=False).encode(),
    }[kind]
    (path / "manifest.json").write_bytes(data)
    return f"manifest bytes {kind}"


def _checkpoints(path: Path) -> list[Path]:
    return sorted((path / "checkpoints").glob("*.safetensors"))


def _tensor(path: Path, rng: random.Random) -> str:
    import torch
    from safetensors.torch import load_file, save_file

    file = rng.choice(_checkpoints(path))
    t = load_file(str(file))
    key = rng.choice(sorted(t))
    op = rng.choice(["scale", "zero", "nan", "double", "reshape", "drop", "add", "rng-zero", "rng-random", "shift"])
    v = t[key]
    if op == "scale":
        t[key] = v * rng.choice([2.0, -1.0, 1.5, 0.5]) if v.is_floating_point() else v
    elif op == "zero":
        t[key] = torch.zeros_like(v) + (1 if not v.any() else 0)
    elif op == "nan" and v.is_floating_point():
        t[key] = v.clone().reshape(-1).index_fill(0, torch.tensor([0]), float(rng.choice(["nan", "inf"]))).view_as(v)
    elif op == "double" and v.is_floating_point():
        t[key] = v.double()
    elif op == "reshape":
        t[key] = v.reshape(-1)[: max(1, v.numel() - 1)].clone()
    elif op == "drop":
        del t[key]
    elif op == "add":
        t[rng.choice(["extra", "momentum/9.weight", "model/x"])] = torch.zeros(3)
    elif op == "rng-zero" and "rng/torch" in t:
        t["rng/torch"] = torch.zeros_like(t["rng/torch"])
    elif op == "rng-random" and "rng/torch" in t:
        t["rng/torch"] = torch.randint(0, 256, t["rng/torch"].shape, dtype=torch.uint8)
    elif v.is_floating_point():  # shift by 1% of the tensor's norm: far above honest replay noise
        t[key] = v + 0.01 * (float(v.norm()) + 1e-3)
    else:
        t[key] = v + 1
    save_file(t, str(file))
    return f"tensor {op} {key} in {file.name}"


def _indices(path: Path, rng: random.Random) -> str:
    import torch
    from safetensors.torch import load_file, save_file

    idx = load_file(str(path / "indices.safetensors"))["indices"].clone()
    op = rng.choice(["value", "swap", "shape", "dtype"])
    if op == "value":
        idx[rng.randrange(idx.shape[0]), rng.randrange(idx.shape[1]), rng.randrange(idx.shape[2])] = rng.choice(
            [-1, 2**62, -(2**63), 1436, 1437, 0, 5]
        )
    elif op == "swap":
        a, b = rng.randrange(idx.shape[0]), rng.randrange(idx.shape[0])
        idx[[a, b]] = idx[[b, a]]
    elif op == "shape":
        idx = idx[: max(1, idx.shape[0] - 1)].clone()
    else:
        idx = idx.to(torch.int32)
    save_file({"indices": idx}, str(path / "indices.safetensors"))
    return f"indices {op}"


def _file_bytes(path: Path, rng: random.Random) -> str:
    files = [*_checkpoints(path), path / "indices.safetensors"]
    file = rng.choice(files)
    raw = file.read_bytes()
    op = rng.choice(["truncate", "pad", "swap", "header-len", "header-json", "flip"])
    if op == "truncate":
        raw = raw[: rng.randrange(len(raw))]
    elif op == "pad":
        raw += bytes(rng.choice([1, 7, 4096, 1 << 20]))
    elif op == "swap":
        raw = rng.choice(files).read_bytes()
    elif op == "header-len":
        raw = rng.choice([1 << 60, len(raw), 0, 3]).to_bytes(8, "little") + raw[8:]
    elif op == "header-json":
        header = b'{"model/1.weight": {"dtype": "F32", "shape": [1000000000, 1000000000], "data_offsets": [0, 4]}}'
        raw = len(header).to_bytes(8, "little") + header + raw[8:]
    else:
        i = rng.randrange(len(raw))
        raw = raw[:i] + bytes([raw[i] ^ (1 << rng.randrange(8))]) + raw[i + 1 :]
    file.write_bytes(raw)
    return f"bytes {op} {file.name}"


def _commitment(path: Path, rng: random.Random) -> str:
    c = json.loads((path / "commitment.json").read_text())
    op = rng.choice(["root", "digest", "drop", "garbage"])
    if op == "root":
        c["root"] = "00" * 32
    elif op == "digest":
        c["files"][rng.randrange(len(c["files"]))][1] = "ff" * 32
    elif op == "drop":
        c["files"].pop()
    else:
        c = rng.choice([[], "x", {"files": 3}, None])
    (path / "commitment.json").write_text(json.dumps(c))
    return f"commitment {op}"


_MUTATORS = [
    _set_leaf,
    _set_leaf,
    _set_leaf,
    _delete_key,
    _add_key,
    _manifest_bytes,
    _tensor,
    _tensor,
    _tensor,
    _indices,
    _file_bytes,
    _commitment,
]


# ---------------------------------------------------------------------------------------------------- no-op check


def _semantic_changes(honest: Path, path: Path) -> set[str]:
    """Manifest leaves (dotted) and other files whose *values* differ from the honest proof's."""
    changed: set[str] = set()
    a, b = _manifest(honest), _manifest(path)
    for key in {*_flat(a), *_flat(b)}:
        if _flat(a).get(key, _MISSING) != _flat(b).get(key, _MISSING):
            changed.add(key)
    from safetensors.torch import load_file

    for file in [*(p.relative_to(honest) for p in _checkpoints(honest)), Path("indices.safetensors")]:
        x, y = load_file(str(honest / file)), load_file(str(path / file))
        if x.keys() != y.keys() or any(x[k].dtype != y[k].dtype or not _close(x[k], y[k]) for k in x):
            changed.add(f"file:{file}")
    return changed


_MISSING = object()


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def _same(x: Any, y: Any) -> bool:
    return tuple(x.shape) == tuple(y.shape) and bool(
        (x.view(-1).view(dtype=_bits(x)) == y.view(-1).view(dtype=_bits(y))).all()
    )


def _close(x: Any, y: Any) -> bool:
    """Equal, or (floats) within a millionth of the tensor's norm: a low mantissa bit flipped is inside the replay
    tolerance the verifier documents (thresholds 3e-4 of a segment's update, calibrated on honest noise), not a
    forgery it claims to catch."""
    if _same(x, y):
        return True
    if not x.is_floating_point() or tuple(x.shape) != tuple(y.shape):
        return False
    diff = float((x.double() - y.double()).norm())
    return diff == diff and diff <= 1e-6 * float(x.double().norm())


def _bits(t: Any) -> Any:
    import torch

    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]


def _harmless(key: str, honest: Path, path: Path) -> bool:
    """A change the verifier does not claim to check (the verdict lists such keys as not checked)."""
    from trustgrad.proof.claims import CHECKED, _lookup

    if not key.startswith("file:") and _lookup(CHECKED, key) is None:
        return True
    if key in ("config.epochs", "config.max_steps"):  # checked as far as they set the step count
        return _manifest(honest)["steps"] == _manifest(path)["steps"]
    if key == "config.model.loss":  # "" is the model's own loss: naming that loss spells the default out
        return _resolved_loss(honest) == _resolved_loss(path)
    if key.startswith("config."):  # a change that parses to the same value (a default spelled out or dropped)
        from trustgrad.config import config_from_dict

        def parsed(proof: Path) -> Any:  # this key's value in the parsed config: other changed keys judged apart
            value: Any = config_from_dict(_manifest(proof)["config"])
            for name in key.split(".")[1:]:
                value = getattr(value, name)
            return value

        with contextlib.suppress(Exception):
            return parsed(honest) == parsed(path)
    return False


def _resolved_loss(path: Path) -> str | None:
    """The loss a proof's config trains with: its ``model.loss``, or the model's own when that is "" (None: the config
    does not parse, or names no model the zoo builds)."""
    from trustgrad.config import config_from_dict
    from trustgrad.models import build_model

    with contextlib.suppress(Exception):
        model = config_from_dict(_manifest(path)["config"]).model
        return model.loss or getattr(
            build_model(model.name, (1, 8, 8), 10, 0, model), "trustgrad_loss", "cross-entropy"
        )
    return None


def _finding(kind: str, detail: str) -> Exception:
    try:
        from tests.fuzz.harness import Finding
    except ImportError:  # the harness has not landed yet: an exception of the same shape
        return RuntimeError(f"{kind}: {detail}")
    return Finding(kind, detail)
