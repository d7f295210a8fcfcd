"""The package's layers, checked on its source: every import of every module under dynexit/ (at any depth,
inside functions too) is an edge of the module graph, which must have no cycle and no edge upwards.

Layers, by path: the library (models and the maths of exits) under the workflows (training, searches,
experiments) under the presentation (analysis, command line). The package's public API
(``dynexit/__init__.py``) and ``dynexit/__main__.py`` stand outside the layers.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dynexit"
LIBRARY, WORKFLOW, PRESENTATION = 0, 1, 2
LAYER_NAMES = {LIBRARY: "library", WORKFLOW: "workflow", PRESENTATION: "presentation"}
# The first name below ``dynexit`` decides a module's layer.
LAYERS = {
    "config": LIBRARY, "models": LIBRARY, "costs": LIBRARY, "policies": LIBRARY, "curves": LIBRARY,
    "inference": LIBRARY, "timing": LIBRARY, "logits": LIBRARY, "data": LIBRARY, "utils": LIBRARY,
    "yaml_files": LIBRARY,
    "training": WORKFLOW, "search": WORKFLOW, "runs": WORKFLOW,
    "analysis": PRESENTATION, "cli": PRESENTATION,
}
EXEMPT = {"dynexit", "dynexit.__main__"}


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__.py``)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module ``name`` refers to: itself, or its closest enclosing module (``a.b.func``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``module`` imports anywhere in its source: ``import x``, ``from x import y``
    (``x.y`` when it is a module), relative imports, and ``importlib.import_module("literal")``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        for name in names:
            if name == "dynexit" or name.startswith("dynexit."):
                target = _resolve(name, modules)
                if target is not None:
                    found |= {target} | _packages_run_first(target, module)
    found.discard(module)
    return found


def _packages_run_first(target: str, importer: str) -> set[str]:
    """Importing ``a.b.c`` runs ``a.b/__init__.py`` first: the target's enclosing packages, except the root
    (the public API) and those enclosing the importer (already being initialised when it runs)."""
    parts = target.split(".")
    enclosing = {".".join(parts[:i]) for i in range(2, len(parts))}
    mine = {".".join(importer.split(".")[:i]) for i in range(1, len(importer.split(".")) + 1)}
    return enclosing - mine


def module_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer_of(module: str) -> int:
    top = module.split(".")[1]
    if top not in LAYERS:
        raise KeyError(f"{module}: no layer for dynexit.{top}; add it to LAYERS in {Path(__file__).name}")
    return LAYERS[top]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_checker_sees_imports_inside_functions_and_finds_cycles(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from dynexit.runs import runner\n    import dynexit.cli.main\n")
    modules = {"dynexit.runs.runner": Path(), "dynexit.cli": Path(), "dynexit.runs": Path()}
    # dynexit.runs: importing dynexit.runs.runner runs the package's __init__.py first
    assert imports_of("dynexit.x", source, modules) == {"dynexit.runs.runner", "dynexit.runs", "dynexit.cli"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_every_module_has_a_layer():
    """Every module under dynexit/ falls in a layer (KeyError otherwise), the layer of its top-level name;
    and the three layers each hold modules."""
    layers = {module: layer_of(module) for module in module_graph() if module not in EXEMPT}
    assert {m: layers[m] for m in ("dynexit.costs", "dynexit.models.perceiver", "dynexit.runs.runner",
                                   "dynexit.training.loop", "dynexit.cli", "dynexit.analysis")} == {
        "dynexit.costs": LIBRARY, "dynexit.models.perceiver": LIBRARY, "dynexit.runs.runner": WORKFLOW,
        "dynexit.training.loop": WORKFLOW, "dynexit.cli": PRESENTATION, "dynexit.analysis": PRESENTATION}
    assert set(layers.values()) == {LIBRARY, WORKFLOW, PRESENTATION}
    assert set(layers) | EXEMPT == set(module_files())  # no module left out of the graph
    with pytest.raises(KeyError, match="no layer for dynexit.plugins"):
        layer_of("dynexit.plugins.extra")


def test_no_import_cycle():
    cycle = find_cycle(module_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_nothing_imports_upwards():
    upward = []
    for module, targets in sorted(module_graph().items()):
        if module in EXEMPT:
            continue
        for target in sorted(targets):
            if target not in EXEMPT and layer_of(target) > layer_of(module):
                upward.append(f"{module} ({LAYER_NAMES[layer_of(module)]}) imports {target} "
                              f"({LAYER_NAMES[layer_of(target)]})")
            elif target in EXEMPT:
                upward.append(f"{module} imports {target}, the public API (import its home module instead)")
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("package", ["dynexit", "dynexit.training"])
def test_no_lazy_module_getattr_hides_an_import(package):
    """A module-level ``__getattr__`` loads modules behind the checker's back; only the public API may
    defer its imports (it stands outside the layers), and it must name every target statically."""
    path = module_files()[package]
    defines = any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in ast.parse(path.read_text()).body)
    assert not defines or package == "dynexit"


def test_no_dynamic_import_hides_an_edge():
    """importlib.import_module with a computed name would load a package module unseen by this checker
    (the command line once loaded its commands so); only the public API's table of names may, and the loader
    of user model factories, which refuses modules of the package (tests/test_any_model.py checks it)."""
    found = []
    for module, path in module_files().items():
        if module == "dynexit":  # the public API: its names are a static table (see the next test)
            continue
        if module == "dynexit.models.interface":  # imports the user's own module, never one of dynexit's
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = getattr(node.func, "attr", getattr(node.func, "id", None)) if isinstance(node, ast.Call) else None
            if name in ("import_module", "__import__") and node.args and not isinstance(node.args[0], ast.Constant):
                found.append(f"{module}, line {node.lineno}")
    assert found == []


def test_public_api_is_the_home_modules_objects():
    import importlib

    import dynexit

    homes = dynexit._PUBLIC
    assert set(dynexit.__all__) == set(homes) | {"__version__"}
    for name, home in homes.items():
        assert getattr(dynexit, name) is getattr(importlib.import_module(home), name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dynexit.nope  # noqa: B018
