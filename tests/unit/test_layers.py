"""The package's architecture as a test: layers as folders, imports only downward, no import cycle.

The imports are read with `ast`, those inside functions and `if TYPE_CHECKING:` blocks included: a
type-only import that goes up is still a corridor a reader has to walk.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "supervisor"

# Bottom to top. A module may import from its own folder and from the folders of lower layers only;
# folders of one layer (the daemon and supervisorctl) do not import each other.
LAYERS: list[set[str]] = [
    {"supervisor", "supervisor.errors"},
    {"supervisor.install"},  # the installation's version and integrity: the commands ask it first
    {"supervisor.config"},
    {"supervisor.protocol"},
    {"supervisor.system"},
    {"supervisor.process"},
    {"supervisor.model"},
    {"supervisor.daemon", "supervisor.ctl"},
    {"supervisor.servers"},  # the worker side (test_the_worker_side_needs_nothing_of_the_supervisor)
    {"supervisor.demo"},  # the programs a worker runs: they need nothing of the supervisor
]
WORKER_SIDE = {"supervisor.servers", "supervisor.demo"}  # what a worker runs imports only supervisor.servers


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["supervisor", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = modules()


def room(module: str) -> str:
    """The folder (or top-level module) a module belongs to, as LAYERS names it."""
    parts = module.split(".")
    if len(parts) == 1:
        return "supervisor"
    if f"supervisor.{parts[1]}" in MODULES and len(parts) == 2 and not (PACKAGE / parts[1]).is_dir():
        return module  # a top-level module: errors, install, demo
    return f"supervisor.{parts[1]}"


def rank(module: str) -> int:
    name = room(module)
    for n, layer in enumerate(LAYERS):
        if name in layer:
            return n
    raise AssertionError(f"{module}: its folder {name} is in no layer of LAYERS")


def imports(module: str) -> set[str]:
    """The package's modules that `module` imports, wherever the import statement stands."""
    tree = ast.parse(MODULES[module].read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                     for alias in node.names]
        else:
            continue
        out |= {name for name in names if name in MODULES and name != module}
    return out


GRAPH = {module: imports(module) for module in MODULES}


def test_every_module_is_in_a_layer() -> None:
    for module in MODULES:
        rank(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_only(module: str) -> None:
    upward = sorted(target for target in GRAPH[module]
                    if rank(target) > rank(module) or (rank(target) == rank(module) and room(target) != room(module)))
    assert not upward, f"{module} imports from a higher or sibling layer: {', '.join(upward)}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if room(m) in WORKER_SIDE))
def test_the_worker_side_needs_nothing_of_the_supervisor(module: str) -> None:
    """A worker's code (the demo, the runners) imports nothing of the daemon's layers: a worker runs
    under any service manager, and the runners' imports stay small."""
    outside = sorted(target for target in GRAPH[module] if room(target) != "supervisor.servers")
    assert not outside, f"{module} imports from the supervisor: {', '.join(outside)}"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan), and every module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            members = []
            while True:
                w = stack.pop()
                members.append(w)
                if w == v:
                    break
            if len(members) > 1 or v in graph[v]:
                found.append(sorted(members))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle() -> None:
    assert cycles(GRAPH) == []


def test_the_cycle_finder_finds_one() -> None:
    """So that the test above can fail."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
