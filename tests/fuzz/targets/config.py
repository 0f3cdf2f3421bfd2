"""Fuzz target: ``trustgrad train`` argument vectors and TOML config files.

A case drives :func:`trustgrad.cli.train.prepare`: parsing, the TOML file, the config dataclasses' ranges, the
pattern's checks and the resource check before launch (processes, memory budget, device, output folder), on a fixed
2-core, 8 GiB machine so that a case's outcome depends on its seed alone. Nothing is launched: ``prepare`` stops
where ``run`` would start processes.

``accepted`` means the job would launch; the target then checks that what was accepted is what was asked (every
numeric flag given reads back unchanged in the config) and within the limits (processes under the cap unless
``--oversubscribe``, the estimate under the budget).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

NAME = "config"

_MACHINE_CORES = 2
_MACHINE_BYTES = 8 << 30

_INTS = ["0", "1", "2", "3", "4", "7", "9", "64", "1000", "65536", "2147483648", "9223372036854775807",
         "9223372036854775808", "-1", "-9223372036854775809", "1e3", "0x10", "two", "", "4.0"]  # fmt: skip
_FLOATS = ["0", "-1", "1e-9", "0.001", "0.1", "0.5", "0.9", "1", "3", "6", "120", "1e10", "1e300", "1e308", "1e400",
           "inf", "-inf", "nan", "NaN", "1e-320", "x", ""]  # fmt: skip
_WORDS = ["allreduce", "ring", "ps", "gossip", "local-sgd", "pipeline", "tensor", "digits", "digits32",
          "breast-cancer", "synthetic", "mnist", "mlp", "logreg", "logreg-poly", "lenet", "poly-mlp", "sync",
          "async", "ssp", "ckks", "none", "shared", "threshold", "record", "audit", "blind", "cuda", "cpu",
          "exponential", "random-pairs", "elastic", "average", "gpipe", "1f1b", "128", "nope", "", "a\nb",
          "x" * 5000, "../..", "é"]  # fmt: skip


def setup(workdir: Path) -> dict[str, Any]:
    from trustgrad.cli.train import _GROUPS, prepare
    from trustgrad.resources import Machine

    (workdir / "a-file").write_text("not a folder\n")
    (workdir / "out").mkdir()
    machine = Machine(cores=_MACHINE_CORES, memory_available=_MACHINE_BYTES, memory_source="fixed")
    prepare(["--workers", "2", "--epochs", "1"], machine)  # the honest job is accepted (and imports are warm)
    _warm_meta_kernels()
    flags = [(flag, key, kind) for _, group in _GROUPS for flag, key, kind, _ in group]
    return {"workdir": workdir, "machine": machine, "flags": flags}


# ----------------------------------------------------------------------------------------------------------------
# argument vectors


def _value_for(kind: Any, rng: random.Random) -> str:
    if kind is int:
        return rng.choice(_INTS)
    if kind is float:
        return rng.choice(_FLOATS)
    if kind is str:
        return rng.choice(_WORDS)
    return rng.choice(["1,3", "0", "-1,2", "99999999999999999999", "a,b", ",", ""])  # split points


def _straggler(rng: random.Random) -> str:
    parts = [f"rank={rng.choice(['1', '2', '0', '9', 'all', 'x', '-1'])}"]
    for key in rng.sample(["prob", "slowdown", "step-ms", "bogus"], rng.randint(0, 4)):
        parts.append(f"{key}={rng.choice(_FLOATS)}")
    return ",".join(parts)


def _malicious(rng: random.Random) -> str:
    parts = [f"rank={rng.choice(_INTS)}", f"attack={rng.choice(['noise', 'sign-flip', 'scale', 'nope', ''])}"]
    if rng.random() < 0.5:
        parts.append(f"strength={rng.choice(_FLOATS)}")
    if rng.random() < 0.3:
        parts.append(f"from-step={rng.choice(_INTS)}")
    return ",".join(parts)


def _out(state: dict[str, Any], rng: random.Random) -> str:
    work = state["workdir"]
    return rng.choice(
        [str(work / "out"), str(work / "out" / "new" / "deeper"), str(work / "a-file"), str(work / "a-file" / "sub"),
         "/proc/trustgrad", "/", str(work / ("x" * 300))]
    )  # fmt: skip


def _argv(state: dict[str, Any], rng: random.Random) -> tuple[list[str], dict[str, str]]:
    """An argument vector and the numeric flags it gives (flag -> text), to check what an accepted job holds."""
    argv: list[str] = []
    given: dict[str, str] = {}
    for flag, _key, kind in rng.sample(state["flags"], rng.randint(1, 6)):
        value = _value_for(kind, rng)
        argv += [flag, value]
        given[flag] = value
    extras = {
        "--straggler": lambda: ["--pattern", "ps", "--straggler", _straggler(rng)],
        "--malicious": lambda: ["--malicious", _malicious(rng)],
        "--out": lambda: ["--out", _out(state, rng)],
        "--proof": lambda: ["--proof", "record", "--out", _out(state, rng)],
        "--oversubscribe": lambda: ["--oversubscribe"],
        "--workers": lambda: ["--workers", rng.choice(["5", "8", "9", "1000"]), "--batch-size", "1"],
        "--hidden": lambda: ["--hidden", rng.choice(["4096", "16384", "65536"]), "--depth", rng.choice(["1", "2"])],
        "--device": lambda: ["--device", "cuda"],
        "--record-server-view": lambda: ["--record-server-view"],
    }
    for name in rng.sample(list(extras), rng.randint(0, 3)):
        words = extras[name]()
        argv += words
        for word in words:  # a flag given again: the last one counts
            given.pop(word, None)
    return argv, given


# ----------------------------------------------------------------------------------------------------------------
# TOML texts


def _toml_value(rng: random.Random, depth: int = 0) -> str:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return str(rng.choice([0, 1, 2, -1, 2**31, 2**63 - 1, -(2**63), 10**30]))
    if kind == 1:
        return rng.choice(["0.5", "1e-9", "1e308", "inf", "-inf", "nan", "1e10", "3.0"])
    if kind == 2:
        return json.dumps(rng.choice(_WORDS))
    if kind == 3:
        return rng.choice(["true", "false"])
    if kind == 4:
        return rng.choice(["1979-05-27T07:32:00Z", "07:32:00", "'literal'", '"""multi\nline"""'])
    if kind == 5:
        return "[" + ", ".join(_toml_value(rng, depth + 1) for _ in range(rng.randint(0, 3))) + "]"
    return "{ " + ", ".join(f"k{i} = {_toml_value(rng, depth + 1)}" for i in range(rng.randint(0, 2))) + " }"


_TOP_KEYS = ["workers", "epochs", "batch_size", "lr", "momentum", "seed", "threads", "timeout", "dataset", "device",
             "out", "malicious", "progress", "max_steps", "wrokers", "server_threads", "weight_decay"]  # fmt: skip
_TABLES = {
    "pattern": ["name", "schedule", "staleness", "straggler", "worker_timeout", "peer_timeout", "segment_kb",
                "alpha", "local_steps", "split_points", "stages", "microbatches", "servers", "nmae"],
    "model": ["name", "hidden", "depth", "width"],
    "crypto": ["encrypt", "keys", "ring_dim", "scale_bits", "security"],
    "proof": ["mode", "k", "audit_rate"],
}  # fmt: skip


def _toml_text(rng: random.Random) -> str | bytes:
    op = rng.randrange(10)
    if op == 0:  # deep nesting: tomli recurses (RecursionError past ~400 levels)
        n = rng.choice([10, 399, 401, 1000, 100_000])
        return rng.choice([f"a = {'[' * n}{']' * n}\n", f"a = {'{ b = ' * n}1{' }' * n}\n"])
    if op == 1:
        return "[" + ".".join(["t"] * rng.choice([10, 500, 5000])) + "]\nx = 1\n"
    if op == 2:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
    if op == 3:
        return "pad = '" + "x" * rng.choice([100, (1 << 20) + 10]) + "'\n"
    lines = [f"{key} = {_toml_value(rng)}" for key in rng.sample(_TOP_KEYS, rng.randint(0, 4))]
    for table in rng.sample(list(_TABLES), rng.randint(0, 3)):
        lines.append(f"[{table}]")
        lines += [f"{key} = {_toml_value(rng)}" for key in rng.sample(_TABLES[table], rng.randint(1, 3))]
    if op == 4:
        lines.insert(rng.randrange(len(lines) + 1), rng.choice(["workers = = 2", "[pattern", "x = ", "= 1", "\x00"]))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------


def case(state: dict[str, Any], rng: random.Random) -> str:
    from trustgrad.cli.train import prepare
    from trustgrad.errors import TrustgradError

    argv, given = _argv(state, rng) if rng.random() < 0.6 else ([], {})
    if not argv or rng.random() < 0.3:
        text = _toml_text(rng)
        path = Path(state["workdir"]) / "case.toml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        argv = ["--config", str(path), *argv]
    try:
        prepared = prepare(argv, state["machine"])
    except TrustgradError as exc:
        if len(str(exc).splitlines()) > 1:
            raise  # the harness counts a multi-line message as a traceback
        return "refused"
    _check_accepted(state, prepared, given)
    return "accepted"


def _check_accepted(state: dict[str, Any], prepared: Any, given: dict[str, str]) -> None:
    from tests.fuzz.harness import Finding
    from trustgrad.config import config_to_dict
    from trustgrad.resources import memory_budget, process_cap

    cfg = prepared.cfg
    flat = config_to_dict(cfg)
    keys = {flag: key for flag, key, _ in state["flags"]}
    for flag, text in given.items():
        node: Any = flat
        for part in keys[flag].split("."):
            node = node[part]
        expected: Any = text
        if isinstance(node, float):
            expected = float(text)
        elif isinstance(node, int) and not isinstance(node, bool):
            expected = int(text)
        if isinstance(node, (int, float, str)) and node != expected:
            raise Finding("silent-accept", f"{flag} {text!r} was accepted as {node!r}")
    numbers = [v for v in _leaves(flat) if isinstance(v, float)]
    if not all(math.isfinite(v) for v in numbers):
        raise Finding("silent-accept", f"a non-finite number was accepted: {numbers}")
    estimate = prepared.estimate
    if estimate.processes > process_cap(state["machine"]) and not prepared.oversubscribe:
        raise Finding("silent-accept", f"{estimate.processes} processes accepted above the cap")
    if estimate.total > memory_budget(state["machine"]):
        raise Finding("silent-accept", f"an estimate of {estimate.total} bytes accepted above the budget")


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def _warm_meta_kernels() -> None:
    """Count every registry model once: torch's first meta forward of a layer type costs seconds on a loaded
    machine, which would otherwise land in whichever case meets that type first."""
    from trustgrad.config import ModelConfig
    from trustgrad.models import MODELS
    from trustgrad.resources import count_model

    for name in MODELS.names():
        shape = (1, 32, 32) if "lenet" in name else (1, 8, 8)
        count_model(name, shape, 10, ModelConfig(name=name))
