"""The package's layering holds: no module imports from a layer above its own.

Layers, lowest first (README "Layout"):

0. shared contracts and utilities: ``errors``, ``utils``, ``contracts``, ``resources``;
1. components: ``media``, ``models``, ``losses``, ``degradation``, ``shards``, ``data``, ``metrics``;
2. components built on those: ``training``, ``inference``, ``export``, ``tracking``, ``launch``, ``evaluation``;
3. composition roots: ``config``, ``resume_check``, ``train``, ``validate``, ``demo``, ``evaluate``;
4. the command line: ``cli``, ``__main__``.

Imports inside functions count too. Within a layer the component graph must be acyclic, and the
offline shard builder (``shards``) and the training loader (``data``) never import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "dlightning"
LAYERS: dict[str, int] = {
    "errors": 0, "utils": 0, "contracts": 0, "resources": 0,
    "media": 1, "models": 1, "losses": 1, "degradation": 1, "shards": 1, "data": 1, "metrics": 1,
    "training": 2, "inference": 2, "export": 2, "tracking": 2, "launch": 2, "evaluation": 2,
    "config": 3, "resume_check": 3, "train": 3, "validate": 3, "demo": 3, "evaluate": 3,
    "cli": 4, "__main__": 4,
}
INDEPENDENT = {("data", "shards"), ("shards", "data")}


def _component(module: str) -> str | None:
    """``dlightning.models.lora`` -> ``models``; None for modules outside the package."""
    parts = module.split(".")
    if parts[0] != "dlightning":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every dlightning module imported by ``path`` (absolute and relative), with its line number."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return [(line, m) for line, m in found if m.split(".")[0] == "dlightning"]


def _edges() -> list[tuple[str, str, str]]:
    """(importing file, its component, imported component) for every import inside the package."""
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        own = rel.parts[0].removesuffix(".py")
        for line, module in _imports(path):
            other = _component(module)
            if other is not None and other != "__init__" and other != own:
                edges.append((f"{rel}:{line}", own, other))
    return edges


def test_every_component_has_a_layer() -> None:
    components = {p.name.removesuffix(".py") for p in PACKAGE.iterdir()
                  if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").is_file())) and p.name != "__init__.py"}
    assert components - set(LAYERS) == set(), "give each new component a layer here and in the README"


def test_no_import_from_a_higher_layer() -> None:
    upward = [f"{where}: {own} (layer {LAYERS[own]}) imports {other} (layer {LAYERS[other]})"
              for where, own, other in _edges() if LAYERS[other] > LAYERS[own]]
    assert not upward, "\n".join(upward)


def test_shard_builder_and_loader_are_independent() -> None:
    crossing = [f"{where}: {own} imports {other}" for where, own, other in _edges() if (own, other) in INDEPENDENT]
    assert not crossing, "\n".join(crossing)


def test_component_graph_is_acyclic() -> None:
    graph: dict[str, set[str]] = {}
    for _, own, other in _edges():
        graph.setdefault(own, set()).add(other)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        if state.get(node) == 1:
            pytest.fail(f"import cycle between components: {' -> '.join([*trail, node])}")
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*trail, node])
        state[node] = 2

    for start in sorted(graph):
        visit(start, [])


def test_standalone_modules_import_nothing_of_the_package() -> None:
    """``models/standalone/`` (layer 1) is copied into every export, which runs without dlightning."""
    folder = PACKAGE / "models" / "standalone"
    found = [f"{path.name}:{line} imports {module}" for path in sorted(folder.glob("*.py"))
             for line, module in _imports(path) if not module.startswith("dlightning.models.standalone")]
    assert not found, "\n".join(found)


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The checker itself works: a relative and an absolute upward import are both found."""
    probe = PACKAGE / "models" / "_layering_probe.py"
    probe.write_text("from dlightning.train import fit\nfrom ..config import RootConfig\n", encoding="utf-8")
    try:
        found = {other for where, own, other in _edges() if "_layering_probe" in where}
    finally:
        probe.unlink()
    assert found == {"train", "config"}
