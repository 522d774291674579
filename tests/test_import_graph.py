"""No import cycle among the modules of `workers` and `producer`: each layer can be read on its own.

The graph is read from the source (ast), so it sees every import, including those inside functions
(which Python only runs later, and where a cycle hides until a code path runs it) and those under
TYPE_CHECKING (a cycle there is still a cycle in the design).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("workers", "producer")


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every module of the project's packages."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Dotted names an import statement may refer to (a `from x import y` may name module x.y)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
        base = ".".join([*anchor, *([base] if base else [])])
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports, anywhere in its body."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets: set[str] = set()
        for node in ast.walk(tree):
            for target in _imported(node, name, path.name == "__init__.py"):
                # `import workers.app` also runs workers/__init__.py, but that runs nothing of ours.
                if target in modules and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_workers_and_producer_have_no_import_cycle() -> None:
    graph = import_graph(project_modules())
    assert len(graph) > 20  # the walk found the project
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_workers_never_import_producer() -> None:
    # the layering: producers depend on what workers speak, never the other way round
    graph = import_graph(project_modules())
    upward = {m: sorted(t for t in targets if t.startswith("producer")) for m, targets in graph.items()}
    assert {m: t for m, t in upward.items() if m.startswith("workers") and t} == {}


def test_the_walk_sees_a_cycle_hidden_in_a_function(tmp_path: Path) -> None:
    # given two modules that import each other, one of them only inside a function
    (tmp_path / "workers").mkdir()
    (tmp_path / "producer").mkdir()
    (tmp_path / "workers" / "__init__.py").write_text("")
    (tmp_path / "producer" / "__init__.py").write_text("")
    (tmp_path / "workers" / "a.py").write_text("from workers import b\n")
    (tmp_path / "workers" / "b.py").write_text("def f():\n    from .a import thing\n")
    (tmp_path / "producer" / "c.py").write_text("import workers.a\n")
    # then the walk finds the cycle, and the producer module that merely uses it is not part of it
    cycle = find_cycle(import_graph(project_modules(tmp_path)))
    assert cycle == ["workers.a", "workers.b", "workers.a"]
