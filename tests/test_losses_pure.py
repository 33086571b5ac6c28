"""docs/architecture.md, "Losses": losses/ and ops.py import only torch (and a little stdlib)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "alignkit"
FILES = sorted((ROOT / "losses").glob("*.py")) + [ROOT / "ops.py"]
ALLOWED = {"torch", "math", "typing", "dataclasses", "__future__", "alignkit.ops"}


def _allowed(name: str) -> bool:
    return name in ALLOWED or name.startswith("torch.")


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                yield node.lineno, "." * node.level + (node.module or "")
            else:
                yield node.lineno, node.module
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            yield node.lineno, "__import__(...)"


def test_files_found():
    names = {p.name for p in FILES}
    assert {"ops.py", "reward.py", "dpo.py", "rrhf.py", "ppo.py"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_only_torch_imports(path):
    bad = [f"{path.name}:{line}: import {name}" for line, name in _imports(path) if not _allowed(name)]
    assert not bad, "losses/ and ops.py may import only torch:\n" + "\n".join(bad)
