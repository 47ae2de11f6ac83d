"""The import graph keeps the layout of DESIGN.md section 1: no cycles, no HTTP below the edge, arrows one way.

Every module of adapters_core and server is parsed with `ast`; every import statement counts, also those
inside functions and `if TYPE_CHECKING:` blocks, so a lazy import cannot hide a cycle or an upward arrow.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("adapters_core", "server")
HTTP_LIBRARIES = ("fastapi", "starlette")
HTTP_ALLOWED = ("server.http", "server.cli")

# server's rooms, highest first; a module may import its own room or any room below it, never one above
ROOM_RANK = {"cli": 5, "http": 4, "scheduling": 3, "execution": 2, "registry": 1, "base": 0}
BASE_MODULES = frozenset({"server", "server.settings", "server.metrics", "server.errors"})


@dataclass(frozen=True)
class Import:
    """One imported module name as written (absolute), where it was written, and the names taken from it."""

    module: str
    line: int
    names: tuple[str, ...] = ()


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the two packages."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports_of(module: str, path: Path) -> Iterator[Import]:
    """Every import in the file, relative ones resolved against the module's package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if is_package(path) else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield Import(target, node.lineno, tuple(a.name for a in node.names))


def edges_of(imp: Import, modules: Mapping[str, Path]) -> set[str]:
    """The project modules an import makes its module depend on: `from pkg import sub` is an edge to the
    submodule pkg.sub, `from pkg import name` (not a submodule) and `import pkg` an edge to the package."""
    out: set[str] = set()
    for name in imp.names:
        if f"{imp.module}.{name}" in modules:
            out.add(f"{imp.module}.{name}")
        elif imp.module in modules:
            out.add(imp.module)
    if not imp.names and imp.module in modules:
        out.add(imp.module)
    return out


@dataclass(frozen=True)
class Graph:
    modules: dict[str, Path]
    edges: dict[str, set[str]]  # module -> project modules it imports
    imports: dict[str, list[Import]]  # module -> everything it imports (also third-party)


def build_graph() -> Graph:
    modules = module_files()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    imports: dict[str, list[Import]] = {}
    for module, path in modules.items():
        imports[module] = list(imports_of(module, path))
        for imp in imports[module]:
            edges[module] |= edges_of(imp, modules) - {module}
    return Graph(modules, edges, imports)


def strongly_connected(nodes: list[str], edges: Mapping[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative, so deep graphs cannot hit the recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def cycle_path(component: list[str], edges: Mapping[str, set[str]]) -> list[str]:
    """One concrete cycle through the component's first module (breadth-first, so a shortest one)."""
    start = component[0]
    members = set(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt: list[str] = []
        for node in frontier:
            for child in sorted(edges[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if child not in came_from:
                    came_from[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {component}")


def cycles(graph: Graph, package: str) -> list[str]:
    nodes = sorted(m for m in graph.modules if m == package or m.startswith(package + "."))
    sub = {m: {t for t in graph.edges[m] if t in nodes} for m in nodes}
    return [
        f"{len(c)} modules ({', '.join(c)}), e.g. " + " -> ".join(cycle_path(c, sub))
        for c in strongly_connected(nodes, sub) if len(c) > 1
    ]


def room_of(module: str) -> str:
    if module in BASE_MODULES:
        return "base"
    if module == "server.cli":
        return "cli"
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in ROOM_RANK and parts[1] not in ("cli", "base"):
        return parts[1]
    raise AssertionError(f"{module} is in no room of DESIGN.md section 1 (http, scheduling, execution, registry) "
                         "and is not settings, metrics, errors or cli")


@pytest.fixture(scope="module")
def graph() -> Graph:
    g = build_graph()
    assert "server.http.app" in g.modules and "adapters_core.composition" in g.modules, sorted(g.modules)
    return g


# -- the checker itself --------------------------------------------------------------------------------
def test_the_cycle_finder_reports_a_path() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    components = strongly_connected(sorted(edges), edges)
    assert sorted(c for c in components if len(c) > 1) == [["a", "b", "c"]]
    assert cycle_path(["a", "b", "c"], edges) == ["a", "b", "c", "a"]


def test_imports_inside_functions_and_relative_ones_count(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .a import thing\n")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import b\n"
        "def f():\n    from pkg.c import x\n    import pkg\n"
    )
    modules = {"pkg": pkg / "__init__.py", "pkg.a": pkg / "a.py", "pkg.b": pkg / "b.py", "pkg.c": pkg / "c.py"}
    found = set().union(*(edges_of(i, modules) for i in imports_of("pkg.a", modules["pkg.a"])))
    assert found == {"pkg.b", "pkg.c", "pkg"}
    assert set().union(*(edges_of(i, modules) for i in imports_of("pkg", modules["pkg"]))) == {"pkg.a"}


# -- the rules -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("package", [
    "server",
    "adapters_core",
])
def test_no_import_cycles(graph: Graph, package: str) -> None:
    found = cycles(graph, package)
    assert not found, "import cycles:\n" + "\n".join(found)


def test_http_libraries_only_at_the_http_edge(graph: Graph) -> None:
    bad = [
        f"{graph.modules[m].relative_to(ROOT)}:{imp.line} imports {imp.module}"
        for m, imps in graph.imports.items()
        if not any(m == allowed or m.startswith(allowed + ".") for allowed in HTTP_ALLOWED)
        for imp in imps
        if imp.module.split(".")[0] in HTTP_LIBRARIES
    ]
    assert not bad, "\n".join(bad)


def test_adapters_core_never_imports_server(graph: Graph) -> None:
    bad = [
        f"{graph.modules[m].relative_to(ROOT)}:{imp.line} imports {imp.module}"
        for m, imps in graph.imports.items() if m.startswith("adapters_core")
        for imp in imps if imp.module.split(".")[0] == "server"
    ]
    assert not bad, "\n".join(bad)


def test_server_rooms_import_only_downwards(graph: Graph) -> None:
    """http -> scheduling -> execution -> registry -> settings/metrics/errors, never back."""
    bad = []
    for module in sorted(m for m in graph.modules if m.split(".")[0] == "server"):
        here = room_of(module)
        for target in sorted(graph.edges[module]):
            if not target.startswith("server"):
                continue
            there = room_of(target)
            if ROOM_RANK[there] > ROOM_RANK[here]:
                bad.append(f"{module} ({here}) imports {target} ({there})")
    assert not bad, "\n".join(bad)


CORE_ABOVE = {
    "adapters_core.methods": ("adapters_core.models", "adapters_core.model", "adapters_core.heads"),
    "adapters_core.models": ("adapters_core.model", "adapters_core.heads"),
    "adapters_core.model": ("adapters_core.heads",),
    "adapters_core.formats": ("adapters_core.methods", "adapters_core.models", "adapters_core.model", "adapters_core.heads"),
}


def test_adapters_core_layers_import_only_downwards(graph: Graph) -> None:
    """heads -> model -> models/ -> methods/: a method room never imports an architecture file, the mixin or
    the heads; architecture declarations never import the mixin or the heads."""
    def within(module: str, package: str) -> bool:
        return module == package or module.startswith(package + ".")

    bad = [
        f"{module} imports {target}"
        for module in sorted(graph.modules)
        for layer, above in CORE_ABOVE.items() if within(module, layer)
        for target in sorted(graph.edges[module]) if any(within(target, a) for a in above)
    ]
    assert not bad, "\n".join(bad)
