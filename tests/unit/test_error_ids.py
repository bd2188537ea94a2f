"""The error-id registry holds every id the code answers, and docs/API.md shows it.

The code is read with ``ast``: no string that looks like an error id may appear outside
vmapi/error_ids.py, no f-string may build one, and every ``error_id=`` handed to an
exception names a registered id with the exception's own status.
"""

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import vmapi
from vmapi import error_ids
from vmapi.error_ids import (
    FAMILIES,
    REGISTRY,
    RESOURCE_FAMILIES,
    answered_by,
    holds,
    status_of,
)
from vmapi.error_table import markdown_table, replace_table
from vmapi.errors import ApiError

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "vmapi"
REGISTRY_FILE = PACKAGE / "error_ids.py"
AREAS = {"general", *RESOURCE_FAMILIES}
ID_SHAPE = re.compile(r"^([a-z0-9_]+)(/[a-z0-9_]+)+$")
# Strings shaped like an id that are not error ids, each with the reason.
NOT_ERROR_IDS = {
    # the metrics' outcome label of an error answer that carries no id (a replayed one)
    "general/unknown",
}


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p != REGISTRY_FILE)


def _looks_like_id(text: str) -> bool:
    match = ID_SHAPE.match(text)
    return bool(match) and match.group(1) in AREAS


def _builds_an_id(node: ast.JoinedStr) -> bool:
    """An f-string shaped ``area/what`` whose fixed parts name an area or an id's last
    part (``f"{self.resource}/in_use"``, ``f"general/http_{code}"``), not any path."""
    shape = "".join(p.value if isinstance(p, ast.Constant) else "{}" for p in node.values)
    if not re.match(r"^[a-z0-9_{}]+(/[a-z0-9_{}]+)+$", shape):
        return False
    parts = shape.split("/")
    known_ends = {i.rsplit("/", 1)[1] for i in REGISTRY} | {f.what for f in FAMILIES}
    return parts[0] in AREAS or parts[-1] in known_ends or parts[-1].startswith("http_")


def _all_modules() -> list:
    """Every module of vmapi, imported (so every ApiError subclass exists)."""
    names = [m.name for m in pkgutil.walk_packages(vmapi.__path__, "vmapi.")]
    return [importlib.import_module(name) for name in names]


def _exception_subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_exception_subclasses(sub)]
    return found


def test_no_error_id_is_written_as_a_literal_outside_the_registry():
    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and _looks_like_id(node.value)
                and node.value not in NOT_ERROR_IDS
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value}")
    assert found == [], "raise by the constant of vmapi/error_ids.py"


def test_no_error_id_is_built_by_an_f_string_outside_the_registry():
    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.JoinedStr) and _builds_an_id(node):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert found == [], "use the family functions of vmapi/error_ids.py"


def _value(node: ast.expr, module) -> object:
    """What ``node`` is in the module's namespace; None when it needs a local (a parameter,
    ``self.resource``): those ids come from the callers, which this scan sees."""
    if isinstance(node, ast.Call):
        if not all(isinstance(arg, ast.Constant) for arg in node.args):
            return None
        root = node.func
    else:
        root = node
    while isinstance(root, ast.Attribute):
        root = root.value
    if not (isinstance(root, ast.Name) and root.id in vars(module)):
        return None
    return eval(ast.unparse(node), vars(module))


def _raised_ids() -> list[tuple[str, int, object, str]]:
    """``(file, line, exception class, error id)`` of every ``error_id=`` the scan can
    resolve: constants and family calls with a literal resource."""
    found = []
    for path in _sources():
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        module = importlib.import_module(name)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            for keyword in node.keywords:
                error_id = _value(keyword.value, module) if keyword.arg == "error_id" else None
                if error_id is not None:
                    where = str(path.relative_to(ROOT))
                    found.append((where, node.lineno, _value(node.func, module), error_id))
    return found


def test_every_error_id_handed_to_an_exception_is_registered_with_its_status():
    raised = _raised_ids()
    assert len(raised) > 30  # the scan sees the raises (a broken scan would pass empty)
    for where, line, cls, error_id in raised:
        assert holds(error_id), f"{where}:{line} {error_id} is not in vmapi/error_ids.py"
        if isinstance(cls, type) and issubclass(cls, ApiError):
            assert status_of(error_id) == cls.status_code, f"{where}:{line} {error_id}"


def test_the_issue_s_missing_ids_are_registered_where_they_are_raised():
    assert REGISTRY["vm/busy"].answered_by("storage", "create")
    assert REGISTRY["vm/no_free_mac"].answered_by("vm", "create")
    assert REGISTRY["general/idempotency_conflict"].answered_by("vm", "create")
    assert not REGISTRY["general/idempotency_conflict"].answered_by("node", "create")


def test_every_exception_class_defaults_to_a_registered_id_with_its_status():
    _all_modules()
    classes = [ApiError, *_exception_subclasses(ApiError)]
    assert len(classes) > 10
    for cls in classes:
        assert cls.error_id in REGISTRY, cls
        assert REGISTRY[cls.error_id].status == cls.status_code, cls


def test_constants_are_named_after_their_ids():
    constants = {
        name: value
        for name, value in vars(error_ids).items()
        if name.isupper() and isinstance(value, str) and value in REGISTRY
    }
    assert set(constants.values()) == set(REGISTRY)
    for name, value in constants.items():
        assert name == value.upper().replace("/", "_"), name


def test_every_resource_is_registered_and_answers_not_found():
    from vmapi.api.resource import RESOURCES

    _all_modules()
    assert set(RESOURCES) == set(RESOURCE_FAMILIES)
    for name, res in RESOURCES.items():
        assert res.service.resource == name  # the families are built from this name
        assert error_ids.NOT_FOUND in RESOURCE_FAMILIES[name]
        assert res.idempotent == REGISTRY["general/idempotency_conflict"].answered_by(
            name, "create"
        )
    for entry in REGISTRY.values():
        assert set(entry.where) <= {error_ids.ANY_RESOURCE, *RESOURCE_FAMILIES}, entry.id


def _overrides(service: object, *methods: str) -> bool:
    from vmapi.services.crud import CrudService

    return any(getattr(type(service), m) is not getattr(CrudService, m) for m in methods)


def test_families_follow_the_models():
    """seeded rows -> protected; unique columns -> duplicate; foreign keys -> in_use; and
    where writes run through the generic checks, the converse too."""
    from sqlalchemy import UniqueConstraint

    from vmapi.api.resource import RESOURCES
    from vmapi.extensions import db

    _all_modules()
    for name, res in RESOURCES.items():
        table = res.service.model.__table__
        families = RESOURCE_FAMILIES[name]
        seeded = "seeded" in table.columns
        unique = any(c.unique for c in table.columns) or any(
            isinstance(c, UniqueConstraint) for c in table.constraints
        )
        linked = bool(table.foreign_keys) or any(
            fk.column.table is table for t in db.metadata.tables.values() for fk in t.foreign_keys
        )
        assert (error_ids.PROTECTED in families) == seeded, name
        if error_ids.DUPLICATE in families:
            assert unique, name
        if error_ids.IN_USE in families:
            assert linked, name
        generic = "POST" in res.collection_methods and not _overrides(
            res.service, "create_all", "update_all", "delete_all"
        )
        if generic:
            assert (error_ids.DUPLICATE in families) == unique, name
            assert (error_ids.IN_USE in families) == linked, name


def test_answered_by_orders_by_status_and_holds_every_family():
    answers = answered_by("node_state", "delete")
    assert answers == sorted(answers, key=lambda a: (a[1], a[0]))
    ids = {a[0] for a in answers}
    assert {"node_state/not_found", "node_state/in_use", "node_state/protected"} <= ids
    assert "node_state/duplicate" not in ids  # a delete makes nothing unique clash
    assert "general/body_too_large" in ids and "vm/busy" not in ids
    assert "node/unreachable" in {a[0] for a in answered_by("virt_node", "create")}
    assert holds("general/http_418") and not holds("vm/duplicate") and not holds("x/y")


def test_docs_api_md_holds_the_generated_table():
    text = (ROOT / "docs" / "API.md").read_text(encoding="utf-8")
    assert replace_table(text) == text, "run: python -m vmapi.error_table --write docs/API.md"
    for family in FAMILIES:
        assert f"`<resource>/{family.what}`" in markdown_table()


def test_every_error_id_docs_api_md_names_is_registered():
    text = (ROOT / "docs" / "API.md").read_text(encoding="utf-8")
    named = {m for m in re.findall(r"`([^`\s]+)`", text) if _looks_like_id(m)}
    assert len(named) > 20
    assert sorted(i for i in named if not holds(i)) == []
