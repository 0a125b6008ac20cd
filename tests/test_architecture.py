"""The shape of the code: no import circles among the project's modules (every import counts, also one inside
a function or under ``TYPE_CHECKING``: a lazy import hides a circle, it does not remove it), and the layers
of ``fl`` kept apart (the strategies never read a run config)."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO_ROOT

FOLDERS = {"kernels": "fed_plora.kernels", "plora": "fed_plora.plora", "fl": "fed_plora.fl"}


def module_name(path: Path) -> str:
    folder = path.relative_to(REPO_ROOT).parts[0]
    parts = path.relative_to(REPO_ROOT / folder).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join((FOLDERS[folder], *parts))


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for folder in FOLDERS for p in (REPO_ROOT / folder).rglob("*.py")}


def imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (``from x import y`` counts ``x.y`` when that
    is a module, else ``x``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            origin = ".".join([*base, *([node.module] if node.module else [])])
            targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else origin for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports(name, path, modules) for name, path in modules.items()}


def test_the_import_graph_is_read_as_python_reads_it():
    """The graph sees relative, absolute, lazy and submodule imports (else the next test proves nothing)."""
    graph = import_graph()
    assert "fed_plora.fl.strategies" in graph["fed_plora.fl.config.sections"]
    assert "fed_plora.fl.strategies.lowrank" in graph["fed_plora.fl.strategies.flexlora"]
    assert "fed_plora.fl.measures.costs" in graph["fed_plora.fl.rounds.run_server"]  # from ..measures import costs
    assert "fed_plora.fl.run.experiment" in graph["fed_plora.fl.cli"]  # imported inside a function
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_strategies_and_data_never_import_the_run_config():
    """A method is a strategy on plain tensors and a dataset is data: neither reads a run's config (the config
    reads them: each method's options, each task's fields)."""
    graph = import_graph()
    lower = [m for m in graph if m.startswith(("fed_plora.fl.strategies", "fed_plora.fl.data"))]
    assert lower
    for module in lower:
        config = [m for m in graph[module] if m == "fed_plora.fl.config" or m.startswith("fed_plora.fl.config.")]
        assert not config, (module, config)
