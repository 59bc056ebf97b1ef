"""The house's rules, read from the source: dependencies point one way (api -> daemon -> planning,
policies), engines/ stands on its own, the pure rooms pull in neither SQL nor HTTP, and no import
circle ties daemon/'s modules together (a lazy import inside a function counts: it is how circles hide);
and no module runs past 400 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2]
ROOMS = ("api", "daemon", "engines", "memory", "policies")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING" or \
        isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING"


def imports_of(path: Path) -> set[str]:
    """Every lessor module `path` imports, at the top or inside a function; not those only a type
    checker reads (under `if TYPE_CHECKING`)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                continue
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    target = ".".join([*base, child.module] if child.module else base)
                elif child.module and child.module.startswith("lessor."):
                    target = child.module.removeprefix("lessor.")
                else:
                    continue
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in child.names)  # `from . import x`
            elif isinstance(child, ast.Import):
                found.update(a.name.removeprefix("lessor.") for a in child.names if a.name.startswith("lessor."))
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def graph() -> dict[str, set[str]]:
    files = [p for room in ROOMS for p in (PACKAGE / room).rglob("*.py")]
    modules = {module_name(p): p for p in files}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


GRAPH = graph()


def in_room(module: str, room: str) -> bool:
    return module == room or module.startswith(room + ".")


def cycle(nodes: dict[str, set[str]]) -> list[str] | None:
    """One import circle among `nodes`, as the path around it, or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node], _ = 1, path.append(node)
        for nxt in sorted(nodes[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        state[node], _ = 2, path.pop()
        return None

    for start in sorted(nodes):
        if start not in state and (found := walk(start)):
            return found
    return None


def test_no_import_circle_inside_daemon():
    daemon = {m: {n for n in deps if in_room(n, "daemon")} for m, deps in GRAPH.items() if in_room(m, "daemon")}
    assert cycle(daemon) is None, " -> ".join(cycle(daemon) or [])


def test_the_circle_finder_finds_one():  # the test above cannot pass by finding nothing ever
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("low,high", [("engines", "daemon"), ("engines", "api"), ("daemon", "api"),
                                      ("policies", "daemon"), ("policies", "api"), ("policies", "engines"),
                                      ("memory", "daemon"), ("memory", "api"),
                                      ("daemon.planning", "daemon.ledger"), ("daemon.planning", "daemon.models"),
                                      ("daemon.planning", "daemon.traffic")])
def test_dependencies_point_one_way(low, high):
    wrong = sorted(f"{m} -> {n}" for m, deps in GRAPH.items() if in_room(m, low)
                   for n in deps if in_room(n, high))
    assert not wrong, f"{low} must not import {high}: " + "; ".join(wrong)


@pytest.mark.parametrize("pure", ["lessor.daemon.planning.planner", "lessor.daemon.planning.admission",
                                  "lessor.daemon.planning.profile", "lessor.policies", "lessor.daemon.leases"])
def test_the_pure_rooms_load_neither_sql_nor_http(pure):
    """In a fresh interpreter, so what this test process imported before does not count."""
    script = (f"import sys, {pure}\n"
              "loaded = sorted(m for m in ('sqlalchemy', 'aiohttp', 'asyncpg', 'aiosqlite') if m in sys.modules)\n"
              "print(','.join(loaded))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing {pure} loads {out}"


MAX_LINES = 400  # a module a person reads in one sitting (issue 35)


def test_every_module_reads_in_one_sitting():
    """The package's modules and bench's scripts; tests are not held to it (a tier's table of cases
    may run long)."""
    files = [p for room in (*ROOMS, "bench") for p in (PACKAGE / room).rglob("*.py")]
    long = sorted(f"{p.relative_to(PACKAGE)}: {n}" for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES)
    assert files and not long, f"over {MAX_LINES} lines, split by concept: " + "; ".join(long)
