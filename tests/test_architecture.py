"""The layers stay one-way: core -> pipeline -> trainer -> eval -> app, and no module imports
itself back through others. Read from the source with ``ast``, so a violation fails here
before it can hide behind a lazy import."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "pipeline", "trainer", "eval", "app")  # each may import only those before it
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["cosettle", *parts])


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The cosettle modules ``path`` imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    modules = source_modules()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def layer_of(module: str) -> int:
    return LAYERS.index(module.split(".")[1])


def test_layers_import_only_downwards():
    bad = [f"{m} imports {d}" for m, deps in graph().items() for d in deps if layer_of(d) > layer_of(m)]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_checks_see_real_imports():
    """The graph is not trivially empty: known edges of each layer are found."""
    g = graph()
    assert "cosettle.core.provenance" in g["cosettle.pipeline.store"]
    assert "cosettle.trainer.objective" in g["cosettle.trainer.objectives.cosettle"]  # relative import
    assert "cosettle.eval.frame.analysis_report" in g["cosettle.eval.tasks.metrics"]  # from package import module
    assert "cosettle.eval.task" in g["cosettle.app.sweep_file"]


@pytest.mark.parametrize("folder", [*LAYERS, "tests", "bench"])
def test_no_file_over_400_lines(folder):
    long = [f"{p.relative_to(ROOT)}: {n}" for p in (ROOT / folder).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"over {MAX_LINES} lines: " + ", ".join(long)
