"""The project's modules import each other without cycles, and packages import one way.

The graph is built by parsing every module with `ast`, so every import counts:
under ``if TYPE_CHECKING:``, inside functions, relative ones. One node per module;
a package is the node of its ``__init__``. Edges:

* ``import a.b.c`` and ``from a.b import c`` (``c`` a submodule) point at ``a.b.c``;
  ``from a.b import name`` (``name`` not a submodule) points at ``a.b``'s ``__init__``.
* The parent packages Python initialises on the way to ``a.b.c`` are NOT edges: every
  submodule would otherwise "import" its own package, and a package ``__init__`` that
  re-exports its submodules (``coordinator/strategies``, ``bus``) would be a cycle by
  construction, though no name of the ``__init__`` is used.
* So the rule that stays is the one that bites: a package's ``__init__`` may import its
  submodules, and then no submodule may take a name from that ``__init__`` (it would
  read a half-initialised module, depending on import order); it imports the sibling
  module that defines the name instead. That case is a cycle here and fails.

The direction rules are docs/architecture.md's "The packages and who may import whom"
(the coordinator loads a task plugin by its import path at run time with importlib,
which is no import statement, so it is not an edge).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bus", "coordinator", "client_agent", "trainer_worker", "serialization", "replay",
            "bench")
# package -> the packages of ours it must never import (docs/architecture.md); bench/ is
# not shipped, so no shipped package may import it
FORBIDDEN = {
    "serialization": set(PACKAGES) - {"serialization"},
    "bus": set(PACKAGES) - {"bus", "serialization"},
    "trainer_worker": {"bus", "coordinator", "client_agent", "bench"},
    "coordinator": {"client_agent", "trainer_worker", "bench"},
    "client_agent": {"coordinator", "bench"},
    "replay": {"client_agent", "trainer_worker", "bench"},
}


def _modules() -> dict[str, Path]:
    """Every module of the project's packages, by dotted name (a package is its __init__)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Dotted names an import statement reaches for (not yet resolved to our modules)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = module.split(".")
        anchor = anchor if is_package else anchor[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, base] if base else anchor)
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is one of our modules."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _edges(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    is_package = path.name == "__init__.py"
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        names = _imported(node, module, is_package)
        if isinstance(node, ast.ImportFrom):
            # `from a.b import x`: x itself when it is a submodule, else a.b's __init__
            subs = [n for n in names[:-1] if n in modules]
            names = subs if len(subs) == len(names) - 1 else [*subs, names[-1]]
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != module:
                edges.add(target)
    return edges


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports, every import statement counted."""
    modules = _modules()
    return {name: _edges(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each distinct shortest cycle through some module, as [a, b, ..., a]."""
    cycles: list[list[str]] = []
    seen: set[frozenset[str]] = set()
    for start in sorted(graph):
        cycle = _cycle_through(start, graph)
        if cycle is not None and frozenset(cycle) not in seen:
            seen.add(frozenset(cycle))
            cycles.append(cycle)
    return cycles


def _cycle_through(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    """The shortest import path from `start` back to itself (breadth first), or None."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        v = frontier.pop(0)
        for w in sorted(graph.get(v, ())):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                frontier.append(w)
    return None


def test_the_graph_sees_every_kind_of_import() -> None:
    """TYPE_CHECKING imports, imports inside functions and re-exports are edges."""
    graph = import_graph()
    assert "coordinator.strategies.base" in graph["coordinator.strategies"]  # re-export
    assert "bus.embedded" in graph["coordinator.cli"]  # inside a function
    assert len(graph) > 80


def test_a_type_checking_import_cycle_is_found(tmp_path: Path) -> None:
    """A cycle closed only by an `if TYPE_CHECKING:` import is reported, named."""
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert find_cycles(graph) == [["p.a", "p.b", "p.c", "p.a"]]
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p.a import X\n"
    (tmp_path / "b.py").write_text(source)
    modules = {"p.a": tmp_path / "a.py", "p.b": tmp_path / "b.py"}
    assert _edges("p.b", tmp_path / "b.py", modules) == {"p.a"}


def test_no_module_imports_itself_through_others() -> None:
    """No import cycle among the project's modules (type-checking and local imports count)."""
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_packages_import_one_way() -> None:
    """serialization imports none of ours, bus only serialization, trainer_worker never the
    bus, coordinator or agent, the coordinator never the agent or the trainer."""
    wrong = []
    for module, targets in import_graph().items():
        package = module.split(".")[0]
        for target in sorted(targets):
            if target.split(".")[0] in FORBIDDEN.get(package, set()):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "; ".join(wrong)
