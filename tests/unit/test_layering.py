"""The production packages' imports point one way and never run in a circle.

Read from the source with ``ast`` (every ``import`` statement, also those inside functions), so
a lazy import that closes a circle counts like a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pose2seg", "preprocessing", "workflows")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` statement of the file names (absolute imports only)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # ``from pkg import module`` imports the submodule too.
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def project_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    return {
        name: {m for m in imported_modules(path) if m in files and m != name}
        for name, path in files.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_circle_through_a_lazy_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imported_modules_reads_function_level_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from pose2seg.arch import build_model\n    import ray\n")
    assert {"pose2seg.arch", "pose2seg.arch.build_model", "ray"} <= imported_modules(source)


def test_no_import_circle_in_the_production_packages():
    graph = project_graph()
    assert "pose2seg.arch" in graph and "workflows.train_driver" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("pose2seg", ("ray", "mlflow", "preprocessing", "workflows")),
        ("preprocessing", ("workflows", "mlflow")),
    ],
)
def test_imports_point_one_way(package, forbidden):
    offenders = []
    for path in (REPO / package).rglob("*.py"):
        for name in imported_modules(path):
            if name.split(".")[0] in forbidden:
                offenders.append(f"{path.relative_to(REPO)} imports {name}")
    assert not offenders, offenders
