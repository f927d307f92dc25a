"""The package's imports point down its layers and form no circle (docs/architecture.md).

Every import counts: module level, under ``TYPE_CHECKING`` and inside functions, since each is a
dependency someone has to understand before changing the imported module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fedmr"

# lowest first; a room may import from its own layer or below, never above
LAYERS = [
    {"errors", "fileio", "seeding", "imports", "maths", "allocator", "machine"},
    {"training"},
    {"algorithms", "models", "data", "partition", "callbacks"},
    {"config"},
    {"results"},
    {"engine", "export", "landscape"},
    {"api", "cli", "study", "flower", "fedmr"},  # "fedmr": the package's own __init__
]
LAYER = {room: rank for rank, rooms in enumerate(LAYERS) for room in rooms}


def module_names() -> dict[str, Path]:
    names = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The fedmr modules ``module`` imports, anywhere in its file."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
        for target in targets:
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != module:
                found.add(target)
                # importing a.b.c runs the packages a.b first: a dependency on them too, but for one's own
                parts = target.split(".")
                for i in range(2, len(parts)):
                    parent = ".".join(parts[:i])
                    if parent in known and parent != module and not module.startswith(parent + "."):
                        found.add(parent)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = module_names()
    return {m: imports_of(m, p, known) for m, p in known.items()}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "fedmr"


def test_the_graph_sees_the_package(graph):
    assert "fedmr.engine.simulator" in graph and "fedmr.engine.experiment" in graph["fedmr.engine.simulator"]
    assert "fedmr.imports" in graph["fedmr.models"]  # a function-local import counts too
    assert "fedmr.engine.experiment" in graph["fedmr.engine.recorder"]  # and one under TYPE_CHECKING


def test_no_import_circles(graph):
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == [], "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_room_has_a_layer(graph):
    assert {room(m) for m in graph} <= set(LAYER), {room(m) for m in graph} - set(LAYER)


def test_imports_point_down_the_layers(graph):
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if LAYER[room(d)] > LAYER[room(m)])
    assert upward == []


def test_flower_apps_set_up_experiments_without_the_simulator(graph):
    flower = {m: deps for m, deps in graph.items() if room(m) == "flower"}
    assert flower and not any("fedmr.engine.simulator" in deps for deps in flower.values())
