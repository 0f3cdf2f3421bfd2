"""Message tags live in ``trustgrad.tags`` and never collide: fixed tags are distinct, none falls inside a family of
per-round tags, families do not overlap, and no other module defines a tag of its own."""

from __future__ import annotations

import ast
from itertools import combinations
from pathlib import Path

import trustgrad
from trustgrad import tags

ROOT = Path(trustgrad.__file__).resolve().parent
GLOO_MAX_TAG = (1 << 31) - 1  # torch passes tags as a C int


def test_fixed_tags_are_distinct_and_in_range():
    values = list(tags.FIXED.values())
    assert len(set(values)) == len(values), tags.FIXED
    assert all(0 <= v <= GLOO_MAX_TAG for v in values)


def test_no_fixed_tag_falls_inside_a_family():
    for name, tag in tags.FIXED.items():
        inside = [f for f, (base, size) in tags.FAMILIES.items() if base <= tag < base + size]
        assert not inside, (name, tag, inside)


def test_families_do_not_overlap_and_stay_in_range():
    for (a, (base_a, size_a)), (b, (base_b, size_b)) in combinations(tags.FAMILIES.items(), 2):
        assert base_a + size_a <= base_b or base_b + size_b <= base_a, (a, b)
    assert all(base >= 0 and base + size - 1 <= GLOO_MAX_TAG for base, size in tags.FAMILIES.values())


def test_every_tag_constant_is_defined_in_trustgrad_tags():
    """A module-level ``*TAG*`` name bound to a number literal outside tags.py would be a second registry."""
    offenders = []
    for path in ROOT.rglob("*.py"):
        if path.name == "tags.py":
            continue
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else []
            names = [t.id for t in targets if isinstance(t, ast.Name) and "TAG" in t.id.upper()]
            literal = isinstance(getattr(node, "value", None), (ast.Constant, ast.BinOp))
            if names and literal and "LEN" not in names[0]:
                offenders.append(f"{path.relative_to(ROOT)}: {names}")
    assert not offenders, offenders
