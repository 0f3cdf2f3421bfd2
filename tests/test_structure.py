"""The package's shape, read from its source with ``ast``: no import circles, no private names imported across
modules, and patterns that schedule without knowing which protections run (docs/architecture.md §3).

Imports at module level and inside functions both count: a function-level import that closes a circle still ties
the two modules together and only moves the failure to the first call. Imports under ``if TYPE_CHECKING:`` never run
and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import trustgrad

ROOT = Path(trustgrad.__file__).resolve().parent


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _tree(path: Path) -> ast.Module:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []  # type-only imports never run
    return tree


def _base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def _imports(modules: dict[str, tuple[Path, bool]]) -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """module -> the package's modules it imports; and every (importer, imported module, private name)."""
    edges: dict[str, set[str]] = {}
    private = []
    for module, (path, is_package) in modules.items():
        out = set()
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Import):
                out |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = _base(module, is_package, node)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    out |= {full} if full in modules else {base} if base in modules else set()
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append((module, base, alias.name))
        edges[module] = out - {module}
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.add(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def test_the_cycle_finder_finds_a_planted_circle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(edges) == [{"a", "b", "c"}]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_circles():
    edges, _ = _imports(_modules())
    assert len(edges) > 100  # the whole package was read
    assert {"trustgrad.proof.verifier", "trustgrad.proof.checks"} <= edges["trustgrad.proof.naive"]
    circles = [sorted(c) for c in _cycles(edges)]
    assert not circles, circles


def test_the_import_reader_sees_function_level_and_private_imports_and_skips_type_only_ones(tmp_path):
    (tmp_path / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from .b import _hidden, shown\n"
        "if TYPE_CHECKING:\n"
        "    from .c import _only_a_type\n"
        "def later():\n"
        "    from . import d\n"
    )
    for name in "bcd":
        (tmp_path / f"{name}.py").write_text("")
    modules = {f"pkg.{name}": (tmp_path / f"{name}.py", False) for name in "abcd"}
    edges, private = _imports(modules)
    assert edges["pkg.a"] == {"pkg.b", "pkg.d"}
    assert private == [("pkg.a", "pkg.b", "_hidden")]


def test_no_private_name_is_imported_from_another_module():
    _, private = _imports(_modules())
    assert not private, private


def test_names_declared_low_are_the_names_registered_high():
    """config validates optimizer and key-attack names without importing what builds them: the lists must agree."""
    from trustgrad.attacks.specs import KEY_ATTACK_NAMES
    from trustgrad.config import OPTIMIZER_NAMES
    from trustgrad.optim import OPTIMIZERS
    from trustgrad.secure.rogue import KEY_ATTACKS

    assert sorted(OPTIMIZER_NAMES) == OPTIMIZERS.names()
    assert sorted(KEY_ATTACK_NAMES) == sorted(KEY_ATTACKS)


#: a pattern calls the protections' slots (``trustgrad.protect``), never an implementation
PROTECTION_IMPLEMENTATIONS = (
    "trustgrad.protect.codecs", "trustgrad.protect.gates", "trustgrad.protect.catalog", "trustgrad.secure",
    "trustgrad.crypto", "trustgrad.blind", "trustgrad.audit", "trustgrad.robust", "trustgrad.proof",
)  # fmt: skip


def test_patterns_read_no_protection_flags_and_import_no_protection():
    modules = _modules()
    edges, _ = _imports(modules)
    patterns = [m for m in modules if m.startswith("trustgrad.patterns")]
    assert "trustgrad.patterns.ps.server" in patterns
    for module in patterns:
        bad = sorted(m for m in edges[module] if m.startswith(PROTECTION_IMPLEMENTATIONS))
        assert not bad, (module, bad)
        for node in ast.walk(_tree(modules[module][0])):
            if isinstance(node, ast.Attribute) and node.attr in ("crypto", "proof"):
                owner = ast.unparse(node.value)
                assert not owner.endswith("cfg"), f"{module}:{node.lineno} reads {owner}.{node.attr}"
