"""The package's layers: every module has one (listed in ``rlcourse/__init__.py``'s docstring and
in :data:`rlcourse.LAYERS`), and no import, at the top of a file or inside a function, points to
a higher layer or closes a cycle between top-level modules."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import rlcourse
from rlcourse import LAYERS

PACKAGE = Path(rlcourse.__file__).parent
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}


def _top_level_modules() -> set[str]:
    """Every module file and package directly in rlcourse/ (not ``__init__``/``__main__``)."""
    names = {p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("__")}
    names |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    return names


def _imports(path: Path) -> set[str]:
    """The top-level rlcourse modules ``path`` imports (``from rlcourse import x`` counts as x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] != "rlcourse":
                continue
            if len(parts) > 1:
                found.add(parts[1])
            else:  # from rlcourse import ppo, DATA_DIR: modules only, names of __init__ are layer 0
                found |= {a.name for a in node.names if a.name in LAYER_OF}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "rlcourse" and len(parts) > 1:
                    found.add(parts[1])
    return found


def _owner(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


FILES = sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or not
               p.name.startswith("__"))


def test_every_module_has_a_layer():
    modules = _top_level_modules()
    assert modules - set(LAYER_OF) == set(), "add these modules to rlcourse.LAYERS"
    assert set(LAYER_OF) - modules == set(), "LAYERS names modules that do not exist"
    assert len(LAYER_OF) == sum(len(v) for v in LAYERS.values()), "a module is in two layers"


def test_docstring_lists_the_same_layers():
    """Each numbered line of the docstring names exactly that layer's modules."""
    doc = rlcourse.__doc__
    section = doc[doc.index("\n0. "):doc.index("\n\nSubmodules")]
    listed = {}
    for block in re.split(r"\n(?=\d\. )", section.strip()):
        layer = int(block.split(".", 1)[0])
        listed[layer] = set(re.findall(r":mod:`rlcourse\.(\w+)`", block))
    assert listed == {k: set(v) for k, v in LAYERS.items()}


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PACKAGE)) for p in FILES])
def test_no_import_points_to_a_higher_layer(path):
    owner = _owner(path)
    layer = LAYER_OF[owner]
    upward = {m: LAYER_OF[m] for m in _imports(path) - {owner} if LAYER_OF.get(m, -1) > layer}
    assert not upward, f"{path.relative_to(PACKAGE)} (layer {layer}) imports {upward}"


def test_no_cycle_between_modules():
    graph: dict[str, set[str]] = {m: set() for m in LAYER_OF}
    for path in FILES:
        graph[_owner(path)] |= _imports(path) - {_owner(path)}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        if state.get(node) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*trail, node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for dep in sorted(graph[node]):
            visit(dep, [*trail, node])
        state[node] = 2

    for module in sorted(graph):
        visit(module, [])


def test_the_checks_catch_an_upward_import(tmp_path):
    """The parser sees function-level imports and ``from rlcourse import x``."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from rlcourse import recipes, DATA_DIR\n"
                   "    import rlcourse.site.x\n")
    assert _imports(bad) == {"recipes", "site"}
