"""No import inside a function body unless it breaks a real import cycle, and then the
import line says which (``# cycle: a -> b -> a``). An import hidden in a function hides
a dependency: the module graph should say everything (``if TYPE_CHECKING:`` blocks are
at module level and fine)."""

from __future__ import annotations

import ast
from pathlib import Path

import vmapi

ROOT = Path(vmapi.__file__).parent


def hidden_imports(path: Path, root: Path = ROOT) -> list[str]:
    """``path:line`` of every import inside a function body without a ``# cycle:`` comment
    on its line."""
    source = path.read_text()
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source, str(path))):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.Import | ast.ImportFrom):
                span = lines[inner.lineno - 1 : (inner.end_lineno or inner.lineno)]
                if not any("# cycle:" in line for line in span):
                    found.append(f"{path.relative_to(root.parent)}:{inner.lineno}")
    return sorted(set(found), key=lambda hit: int(hit.rsplit(":", 1)[1]))


def test_no_import_inside_a_function_without_a_cycle_comment():
    paths = sorted(ROOT.rglob("*.py"))
    hidden = [hit for path in paths for hit in hidden_imports(path)]
    assert hidden == []


def test_the_check_sees_an_import_in_a_function(tmp_path):
    module = tmp_path / "vmapi_probe.py"
    module.write_text(
        "import os\n\n"
        "def f():\n    import json\n    return json\n\n"
        "def g():\n    import sys  # cycle: a -> b -> a\n    return sys\n"
    )
    found = hidden_imports(module, tmp_path)
    assert found == [f"{tmp_path.name}/vmapi_probe.py:4"]
