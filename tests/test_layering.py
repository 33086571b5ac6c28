"""The folder tree states the architecture (docs/architecture.md, "Layers"): every module imports
only from its own floor or below, and no two modules import each other, directly or round a
longer circle. Imports inside functions count too: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import alignkit

ROOT = Path(alignkit.__file__).parent

# floor of each top-level part of the package (a module name without its .py, or a subpackage)
FLOORS = {
    "ops": 0, "precision": 0, "config": 0, "files": 0, "chat": 6,
    "losses": 1, "data": 1,
    "models": 2,
    "rewards": 3, "rollout": 3,
    "tasks": 4, "engine": 4,
    "eval": 5,
    "algorithms": 6, "report": 6,
    "cli": 7, "__main__": 7, "__init__": 7,
}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> the alignkit modules it imports (relative imports resolved)."""
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        name = _module(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        out = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name.startswith("alignkit."))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                if target.startswith("alignkit."):
                    out.add(target)
                    # `from alignkit.x import y` may import the submodule alignkit.x.y
                    out.update(f"{target}.{a.name}" for a in node.names if (ROOT.parent / f"{target}.{a.name}".replace(".", "/")).with_suffix(".py").exists())
    return {m: {t for t in ts if t != m} for m, ts in graph.items()}


def _floor(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    assert part in FLOORS, f"{module}: alignkit/{part} has no floor in FLOORS (add it where it belongs in the layers)"
    return FLOORS[part]


def test_every_top_level_part_has_a_floor():
    parts = {p.stem if p.is_file() else p.name for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert parts <= set(FLOORS), f"parts of alignkit without a floor: {sorted(parts - set(FLOORS))}"


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} (floor {_floor(m)}) imports {t} (floor {_floor(t)})"
                  for m, targets in graph.items() for t in targets if _floor(t) > _floor(m))


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every import cycle between modules that a depth-first search meets, as 'a -> b -> a'."""
    cycles, state, stack = set(), {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                cycles.add(" -> ".join(stack[stack.index(t):] + [t]))
            elif t in graph and t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return sorted(cycles)


def test_imports_point_down():
    upward = _upward(_imports())
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_no_import_cycles():
    cycles = _cycles(_imports())
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checks_find_what_they_look_for():
    """On a made-up graph: an engine module importing an algorithm points up; a circle of three
    modules is one cycle; the real graph holds the edges the checks walk (relative imports too)."""
    graph = {"alignkit.engine.trainer": {"alignkit.algorithms.sft"}, "alignkit.algorithms.sft": {"alignkit.models.load"},
             "alignkit.models.load": {"alignkit.data.chat"}, "alignkit.data.chat": set(),
             "alignkit.rewards.a": {"alignkit.rollout.b"}, "alignkit.rollout.b": {"alignkit.rewards.c"},
             "alignkit.rewards.c": {"alignkit.rewards.a"}}
    assert _upward(graph) == ["alignkit.engine.trainer (floor 4) imports alignkit.algorithms.sft (floor 6)"]
    assert _cycles(graph) == ["alignkit.rewards.a -> alignkit.rollout.b -> alignkit.rewards.c -> alignkit.rewards.a"]
    real = _imports()
    assert "alignkit.data.chat" in real["alignkit.data.packing"]
    assert "alignkit.data.io" in real["alignkit.data.formats"]  # `from .io import ...`
