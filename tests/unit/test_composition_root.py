"""One composition root (issue 35): daemon/runtime.py builds every part complete. Read from the
source: no module sets an attribute of another part after its construction (a part's own class
building its instance, in a classmethod, is its construction), and no part has an `attach_`
method to be wired through."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2]
# The names the parts go by where one holds another (a leading underscore aside).
PARTS = {"controller", "supervisor", "reconciler", "router", "traffic", "elastic", "ledger", "mqtt", "publisher",
         "history", "lingering", "meter", "fingerprinting", "bus", "holder", "probe", "settling", "device_locks"}


def _held_part(target: ast.expr) -> str | None:
    """`x.supervisor.attr`, `controller.attr`, `self._ledger.attr`: the part whose attribute is set."""
    if not isinstance(target, ast.Attribute):
        return None
    owner = target.value
    if isinstance(owner, ast.Name):
        name = owner.id
    elif isinstance(owner, ast.Attribute):
        name = owner.attr
    else:
        return None
    return name if name != "self" and name.lstrip("_") in PARTS else None


def _classmethods(tree: ast.AST) -> set[ast.AST]:
    return {node for cls in ast.walk(tree) if isinstance(cls, ast.ClassDef) for node in cls.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and any(isinstance(d, ast.Name) and d.id == "classmethod" for d in node.decorator_list)}


def wiring_after_construction(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    own = {node for method in _classmethods(tree) for node in ast.walk(method)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("attach"):
            found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: def {node.name}")
        if node in own:
            continue
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            for part in filter(None, map(_held_part, ast.walk(target))):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {ast.unparse(target)} (of the {part})")
    return found


def test_no_module_wires_a_part_after_its_construction():
    sources = [p for room in ("api", "daemon", "engines", "bench") for p in sorted((PACKAGE / room).rglob("*.py"))]
    assert len(sources) > 50
    found = [line for path in sources for line in wiring_after_construction(path)]
    assert not found, "parts wired after their construction; pass them to the constructor in daemon/runtime.py:\n" + \
        "\n".join(found)


def test_the_check_sees_what_it_is_for():
    """It would have caught the wiring that daemon/runtime.py and api/service.py did before."""
    sample = ast.parse("controller.traffic = traffic\ncontroller.supervisor._traffic = t\nself._x = 1\n"
                       "record.state = s\nself._supervisor.meter = m\n")
    found = [ast.unparse(t) for node in sample.body for t in node.targets if any(map(_held_part, ast.walk(t)))]
    assert found == ["controller.traffic", "controller.supervisor._traffic", "self._supervisor.meter"]
