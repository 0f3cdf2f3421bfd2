"""Users' own code by name: ``"package.module:factory"`` strings for models, datasets and losses.

Every rank of a job, the auditor and the verifier rebuild a user's model in their own process, so what travels is a
name, not an object: ``"package.module:attr"`` (``attr`` may be dotted: ``Class.method``). The module must be
importable where it is resolved: installed, or on ``PYTHONPATH`` (spawned ranks inherit ``sys.path``; a script's own
folder is ``sys.path[0]``, so a factory defined in ``python my_job.py`` is ``"my_job:make_model"``).

Importing a module runs its code. A proof, a server view or a config file is untrusted input, so resolving a name is
gated: :func:`resolve` imports only names the local user allowed in this process (:func:`allow`): the CLI and the API
allow the names their user gave; ``trustgrad verify`` allows only names given on its own command line, which must
equal the proof's (docs/architecture.md §4, "Users' code"). Names are checked for syntax before anything is imported.

>>> parse("my_models.resnet:make_model")
('my_models.resnet', 'make_model')
>>> is_factory("mlp"), is_factory("pkg:f")
(False, True)
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable
from typing import Any

from .errors import ConfigError

__all__ = ["is_factory", "parse", "check", "allow", "allowed", "resolve", "call", "name_of"]

log = logging.getLogger(__name__)

#: a module path or attribute path of at most this many characters: a name, not a payload
MAX_NAME = 256
_ALLOWED: set[str] = set()


def is_factory(name: object) -> bool:
    """Whether ``name`` names user code (``module:attr``) rather than a registry entry."""
    return isinstance(name, str) and ":" in name


def parse(spec: str) -> tuple[str, str]:
    """``(module, attr)`` of a valid ``module:attr`` string; a one-line ``ConfigError`` naming what is wrong."""
    if not isinstance(spec, str) or len(spec) > MAX_NAME or spec.count(":") != 1:
        raise ConfigError(f"factory {_short(spec)} must be 'package.module:name' (one colon, at most {MAX_NAME} chars)")
    module, attr = spec.split(":")
    for label, path in (("module", module), ("name", attr)):
        parts = path.split(".")
        if not all(p.isidentifier() and p.isascii() for p in parts):
            raise ConfigError(
                f"factory {_short(spec)}: the {label} part must be dotted Python identifiers, got {_short(path)}"
            )
    if any(p.startswith("_") for p in attr.split(".")):  # private helpers are not an interface anyone named
        raise ConfigError(f"factory {_short(spec)}: the name must not be private (leading underscore)")
    return module, attr


def check(spec: str) -> str:
    """Validate syntax only (nothing imported); returns ``spec``."""
    parse(spec)
    return spec


def allow(*specs: str | None) -> None:
    """Let this process import the factories the local user named (registry names and None are ignored)."""
    for spec in specs:
        if is_factory(spec):
            _ALLOWED.add(check(spec))  # type: ignore[arg-type]


def allowed(spec: str) -> bool:
    return spec in _ALLOWED


def resolve(spec: str, what: str) -> Callable[..., Any]:
    """Import and return the callable ``spec`` names, if this process's user allowed it; else ``ConfigError``."""
    module_name, attr = parse(spec)
    if spec not in _ALLOWED:
        raise ConfigError(
            f"{what} {_short(spec)} is user code that was not named here: importing it would run code an input file "
            f"chose; name it yourself (e.g. --model {spec}) to trust it"
        )
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"{what} {_short(spec)}: module {exc.name!r} is not importable here ({_where()})") from None
    except AttributeError:
        raise ConfigError(f"{what} {_short(spec)}: module {module_name!r} has no attribute {attr!r}") from None
    except Exception as exc:  # the user's module failed while importing: its error, one line
        raise ConfigError(f"{what} {_short(spec)}: importing {module_name!r} failed ({_one_line(exc)})") from None
    if not callable(obj):
        raise ConfigError(f"{what} {_short(spec)} is a {type(obj).__name__}, not a callable")
    return obj


def call(spec: str, what: str, *args: Any) -> Any:
    """``resolve(spec)(*args)``; an exception the user's factory raises becomes one line naming it."""
    fn = resolve(spec, what)
    try:
        return fn(*args)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{what} {_short(spec)} raised {type(exc).__name__}: {_one_line(exc)}") from None


def name_of(obj: str | Callable[..., Any], what: str) -> str:
    """The ``module:attr`` string of a factory given as a string or as an importable top-level callable.

    A callable defined in a script run as ``python path/job.py`` lives in ``__main__``; other processes import the
    script by its file name (its folder is ``sys.path[0]``, which spawned ranks inherit), so it is ``job:attr``.
    """
    if isinstance(obj, str):
        return check(obj)
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not callable(obj) or not module or not qualname or "<" in qualname:
        raise ConfigError(
            f"{what} {_short(obj)} is not an importable top-level function or class: every rank and the verifier "
            "rebuild it by name, so define it at module level (or pass 'package.module:name')"
        )
    if module == "__main__":
        module = _main_module_name(what)
    return check(f"{module}:{qualname}")


def _main_module_name(what: str) -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":  # python -m package.module
        return spec.name
    path = getattr(main, "__file__", None)
    if path is None:
        raise ConfigError(
            f"{what} is defined in an interactive session: other processes cannot import it; put it in a module"
        )
    from pathlib import Path

    file = Path(path).resolve()
    if str(file.parent) not in {str(Path(p or ".").resolve()) for p in sys.path}:
        raise ConfigError(f"{what}: {file.name}'s folder is not on sys.path, so other processes cannot import it")
    return file.stem


def _where() -> str:
    return "installed, or its folder on PYTHONPATH"


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
