"""The package's floors: imports run downward only, and no two modules import each other.

Read from the source with `ast` (every import statement, at module level or inside a function),
so the check covers imports that only run on some code paths. The floor order is data: a room
(subpackage or top-level module) may import its own modules and rooms on lower floors only.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "megatron_most"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

FLOORS = (
    ("options", "rejects"),
    ("platform",),
    ("moe", "audio"),
    ("model",),
    ("data", "convert"),
    ("training", "inference"),
    ("eval",),
)
"""Bottom to top. `tools/` (thin CLIs) sit above all of them and are not part of the package."""

FLOOR_OF = {room: level for level, rooms in enumerate(FLOORS) for room in rooms}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room_of(module: str) -> str | None:
    """`megatron_most.moe.router` -> "moe"; the package root itself has no room."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Modules of this package imported anywhere in `path` (relative imports resolved).
    `from pkg import name` imports the module pkg.name when there is one, else pkg itself."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {name for name in found if name in modules and name != module}


def graph() -> dict[str, set[str]]:
    """module -> modules of the package it imports."""
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {module: imports_of(path, set(files)) for module, path in files.items()}


def upward_imports(edges) -> list[str]:
    bad = []
    for module, targets in edges.items():
        here = room_of(module)
        for target in targets:
            there = room_of(target)
            if here is None or there is None or here == there:
                continue
            assert here in FLOOR_OF and there in FLOOR_OF, f"room {here!r} or {there!r} missing from FLOORS"
            if FLOOR_OF[there] >= FLOOR_OF[here]:
                bad.append(f"{module} (floor {FLOOR_OF[here]}) imports {target} (floor {FLOOR_OF[there]})")
    return sorted(bad)


def cycles(edges) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def package_cycles(edges) -> list[list[str]]:
    """Cycles between rooms (a package loop hidden behind distinct modules)."""
    rooms = {}
    for module, targets in edges.items():
        here = room_of(module)
        if here is None:
            continue
        rooms.setdefault(here, set()).update(room_of(t) for t in targets if room_of(t) not in (None, here))
    return cycles(rooms)


def test_every_room_has_a_floor():
    rooms = {room_of(module_name(p)) for p in ROOT.rglob("*.py")} - {None}
    assert rooms <= set(FLOOR_OF), f"rooms without a floor: {sorted(rooms - set(FLOOR_OF))}"


def test_imports_run_downward():
    bad = upward_imports(graph())
    assert not bad, "imports from a lower floor to a higher one or sideways:\n" + "\n".join(bad)


def test_no_import_cycles():
    edges = graph()
    assert not cycles(edges), f"modules importing each other: {cycles(edges)}"
    assert not package_cycles(edges), f"rooms importing each other: {package_cycles(edges)}"


def test_the_checks_can_fail():
    """The checker itself finds an upward import, a sideways one and a cycle in a made-up graph."""
    edges = {
        "megatron_most.platform.x": {"megatron_most.model.y"},
        "megatron_most.model.y": {"megatron_most.platform.x"},
        "megatron_most.data.z": {"megatron_most.convert.w"},
        "megatron_most.convert.w": set(),
    }
    assert len(upward_imports(edges)) == 2
    assert cycles(edges) == [["megatron_most.model.y", "megatron_most.platform.x"]]
