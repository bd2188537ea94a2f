"""The error edge stays in one room: the error hierarchy (vmapi/errors.py) and the id
registry sit below every layer, and only vmapi/api/errors.py knows Flask's side of them."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "vmapi"


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    return found + [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]


@pytest.mark.parametrize("path", ["vmapi/errors.py", "vmapi/error_ids.py"])
def test_the_error_hierarchy_knows_no_flask(path):
    """errors.py (and the registry) sit below every layer: no Flask, no werkzeug, no wire
    formats, no api package (that is where vmapi/api/errors.py writes the envelope)."""
    banned = ("flask", "werkzeug", "sqlalchemy", "vmapi.representations", "vmapi.api")
    assert [m for m in _imports(ROOT / path) if m.startswith(banned)] == []


def test_openapi_does_not_import_the_package_root():
    assert "vmapi" not in _imports(PACKAGE / "api" / "openapi.py")  # __version__: vmapi.release


def test_flask_error_handlers_live_only_in_the_api_package():
    outside = [
        str(p.relative_to(ROOT))
        for p in PACKAGE.rglob("*.py")
        if "errorhandler" in p.read_text(encoding="utf-8") and p.parent.name != "api"
    ]
    assert outside == []
    handlers = [
        str(p.relative_to(ROOT))
        for p in (PACKAGE / "api").glob("*.py")
        if ".errorhandler(" in p.read_text(encoding="utf-8")
    ]
    assert handlers == ["vmapi/api/errors.py"]


def test_the_version_is_the_release_s():
    import vmapi
    from vmapi.api.openapi import openapi_document
    from vmapi.config import DEFAULTS
    from vmapi.release import __version__

    assert vmapi.__version__ == __version__
    config = {key: default for key, (default, _doc) in DEFAULTS.items()}
    assert openapi_document(config)["info"]["version"] == __version__
