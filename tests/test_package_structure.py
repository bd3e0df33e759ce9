"""The package's shape: no import cycle (every import statement counts, also inside functions), and training loops
made of functions a reader can hold at once."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "src" / "cat_hf"
#: The loops read top to bottom; none of their functions is longer than this many lines.
LOOP_FILES = ("pretrain.py", "finetune.py")
MAX_LOOP_FUNCTION_LINES = 80


def _module_name(path: Path, package_dir: Path) -> str:
    parts = path.relative_to(package_dir.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """{module: modules of the package it imports}, over every `import` / `from ... import` statement."""
    files = {_module_name(p, package_dir): p for p in package_dir.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from a import b`: the module a.b when there is one, else a itself
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in files else source
                           for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # `import cat_hf.x.y` where y is a name: the module x
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in graph[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while component[-1:] != [module]:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "cat_hf.training" in graph and "cat_hf.checkpoints" in graph["cat_hf.training"]  # the graph is real
    assert "cat_hf.teachers.weights" in graph["cat_hf.teachers"]  # subpackages count
    assert import_cycles(graph) == []


def test_a_cycle_is_found(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import f\n")
    (package / "b.py").write_text("def f():\n    from pkg import a\n")  # a function-level import counts too
    (package / "c.py").write_text("from . import a\n")
    cycles = import_cycles(import_graph(package))
    assert cycles == [["pkg.a", "pkg.b"]]


def test_the_loops_are_made_of_short_functions():
    too_long = []
    for file_name in LOOP_FILES:
        tree = ast.parse((PACKAGE_DIR / file_name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LOOP_FUNCTION_LINES:
                    too_long.append(f"{file_name}:{node.lineno} {node.name} ({lines} lines)")
    assert too_long == []
