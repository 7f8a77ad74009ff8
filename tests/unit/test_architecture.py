"""Issue 12 acceptance, checked on the source: no import cycle in the package; the store is the only door to
the database; one function builds the runtime for every command that runs jobs; one module moves jobs on
decisions; the policy and the pure schedule modules import no I/O."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "orchestrator"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _imports(path: Path, *, module_level: bool) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if module_level else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_no_import_cycle_between_modules() -> None:
    mods = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        graph[name] = {t for t in _imports(path, module_level=True) if t in mods and t != name}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append([*stack[stack.index(v) :], v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for m in sorted(mods):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_only_the_store_talks_to_the_database() -> None:
    offenders = []
    for name, path in _modules().items():
        if name.startswith("orchestrator.store"):
            continue
        for imp in _imports(path, module_level=False):
            if imp.startswith(("sqlalchemy", "asyncpg", "sqlite3", "aiosqlite", "orchestrator.store.models")):
                offenders.append(f"{name} imports {imp}")
    assert not offenders, offenders


def test_pure_modules_import_no_io() -> None:
    io = ("aiohttp", "sqlalchemy", "asyncpg", "sqlite3", "orchestrator.store", "orchestrator.cloud.client")
    for name, path in _modules().items():
        if name.startswith(("orchestrator.policy", "orchestrator.schedule")) or name in (
            "orchestrator.states",
            "orchestrator.outcomes",
            "orchestrator.preflight",
            "orchestrator.versions",
        ):
            bad = [i for i in _imports(path, module_level=False) if i.startswith(io)]
            assert not bad, f"{name}: {bad}"


def _calls(path: Path, attr: str) -> int:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    n = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == attr) or (
                isinstance(f, ast.Name) and f.id == attr
            ):
                n += 1
    return n


def test_one_composition_root_and_one_place_that_moves_jobs() -> None:
    mods = _modules()
    builders = {n for n, p in mods.items() if _calls(p, "Runtime")}
    assert builders == {"orchestrator.app.runtime"}, builders
    movers = {
        n
        for n, p in mods.items()
        if not n.startswith("orchestrator.store") and (_calls(p, "record_answer") or _calls(p, "move"))
    }
    assert movers == {"orchestrator.moves"}, movers
    # every command that runs jobs goes through build_runtime
    users = {n for n, p in mods.items() if _calls(p, "build_runtime")}
    assert "orchestrator.app.runs" in users
