"""Facts about the shape of the package that grep or a walk of the imports can check."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import xpuserve

SRC = Path(xpuserve.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}
# The load generator and the planner's arithmetic, and the command line that parses their flags.
HEAVY_PLANNER = ("xpuserve.planner.calibrate", "xpuserve.planner.bench_model")  # they run the engine
LIGHT = ["xpuserve", "xpuserve.cli", *sorted(m for m in MODULES if m.startswith(("xpuserve.bench", "xpuserve.planner"))
                                          and m not in HEAVY_PLANNER)]


def imported(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """The xpuserve modules an import statement loads: `from xpuserve.a import b` is xpuserve.a.b
    where b is a module, else xpuserve.a."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    base = node.module or ""
    if node.level:
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        base = ".".join([package.rsplit(".", node.level - 1)[0]] + ([base] if base else []))
    names = [f"{base}.{a.name}" for a in node.names]
    return [n if n in MODULES else base for n in names if n in MODULES or base in MODULES]


def imports(module: str, module_level_only: bool) -> set[str]:
    """What `module` imports: at import time only (not inside functions, not under TYPE_CHECKING), or anywhere."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if module_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if module_level_only and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.update(imported(node, module))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(MODULES[module].read_text()))
    return found - {module}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def walk(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := walk(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := walk(start, [start])):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_walk_resolves_modules_and_names():
    assert "xpuserve.engine.llm_engine" in imports("xpuserve.llm", module_level_only=True)
    assert "xpuserve.distributed" in imports("xpuserve.engine.worker", module_level_only=True)
    assert "xpuserve.platforms" in imports("xpuserve.cli", module_level_only=False)


def test_no_import_cycle():
    graph = {m: imports(m, module_level_only=True) for m in MODULES}
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_distributed_imports_nothing_above_it():
    above = ("xpuserve.engine", "xpuserve.models", "xpuserve.weights")
    for module in (m for m in MODULES if m.startswith("xpuserve.distributed")):
        wrong = {i for i in imports(module, module_level_only=False) if i.startswith(above)}
        assert not wrong, f"{module} imports {sorted(wrong)}"


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_load_no_torch(module):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"import {module} loads {result.stdout.strip()}"


def test_server_talks_only_to_the_async_engine():
    for path in (SRC / "server").rglob("*.py"):
        assert ".engine.engine" not in path.read_text(), f"{path.name} reaches through AsyncEngine into LLMEngine"
