"""The OpenAPI document is valid OpenAPI 3 and matches the app's real routes."""

import re

import pytest
from openapi_spec_validator import validate

from vmapi.api.openapi_errors import ERROR_STATUSES
from vmapi.error_ids import (
    ACTION,
    CREATE,
    DELETE,
    LIST,
    READ,
    REGISTRY,
    RESOURCE_FAMILIES,
    UPDATE,
    answered_by,
)

pytestmark = pytest.mark.embedded


@pytest.fixture
def document(client):
    response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    return response.json


def test_document_is_valid_openapi_3(document):
    validate(document)
    assert document["openapi"].startswith("3.")


def _routes(app):
    """(path, method) pairs the app serves, in the document's spelling."""
    found = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule.replace("<api_version>", "v1")
        path = re.sub(r"<(?:[a-z]+(?:\([^)]*\))?:)?([a-z_]+)>", r"{\1}", path)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            found.add((path, "patch" if method == "UPDATE" else method.lower()))
    return found


def test_every_route_is_documented_and_nothing_else(app, document):
    documented = {
        (path, method)
        for path, ops in document["paths"].items()
        for method in ops
        if not method.startswith("x-")
    }
    assert documented == _routes(app)


def test_update_is_named_as_alias(document):
    for path, ops in document["paths"].items():
        if "patch" in ops:
            assert ops["patch"]["x-method-aliases"] == {"UPDATE": "patch"}, path


def test_security_and_open_endpoints(document):
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
    }
    assert document["paths"]["/health"]["get"]["security"] == []
    assert document["paths"]["/api/v1/openapi.json"]["get"]["security"] == []


def test_schemas_follow_the_marshmallow_fields(document):
    node = document["components"]["schemas"]["Node"]
    assert node["properties"]["allocated_cores"]["readOnly"] is True
    assert node["properties"]["node_state"]["required"] == ["id"]
    assert "fqdn" in node["required"]
    assert node["additionalProperties"] is False


def test_error_ids_are_documented(document):
    responses = document["paths"]["/api/v1/node"]["post"]["responses"]
    assert "node/unreachable" in responses["409"]["description"]
    assert "general/unsupported_media_type" in responses["415"]["description"]
    filters = {p["name"] for p in document["paths"]["/api/v1/node"]["get"]["parameters"]}
    assert {"limit", "after", "nest", "fqdn", "node_state.id", "cores"} <= filters


# The operation each documented method of a resource path is, in the registry's words.
_OPERATIONS = {
    "collection": {"get": LIST, "post": CREATE, "patch": UPDATE, "delete": DELETE},
    "item": {"get": READ, "patch": UPDATE, "delete": DELETE},
    "action": {"post": ACTION},
    # a sub-resource of an item (/image/{ident}/file): reading it, or replacing it
    "sub-resource": {"get": READ, "put": UPDATE},
}


def _resource_operations(document):
    """``(path, method, resource, operation, operation object)`` of every resource path."""
    for path, ops in document["paths"].items():
        parts = path.removeprefix("/api/v1/").split("/")
        if parts[0] not in RESOURCE_FAMILIES or (len(parts) > 1 and parts[1] != "{ident}"):
            continue  # the index, the document itself, the ENC
        kind = ("collection", "item", "action")[len(parts) - 1]
        for method, op in ops.items():
            if not method.startswith("x-"):
                where = "sub-resource" if kind == "action" and method != "post" else kind
                yield path, method, parts[0], _OPERATIONS[where][method], op


def test_every_operation_lists_the_registry_s_error_ids(document):
    seen = 0
    for path, method, resource, operation, op in _resource_operations(document):
        expected = {(error_id, status) for error_id, status, _ in answered_by(resource, operation)}
        listed = {
            (error_id, int(status))
            for status, response in op["responses"].items()
            for error_id in response.get("x-error-ids", [])
        }
        assert listed == expected, (path, method)
        for status, response in op["responses"].items():
            for error_id in response.get("x-error-ids", []):
                assert error_id in response["description"], (path, method, status)
        seen += 1
    assert seen > 60


def test_every_answered_id_is_in_the_document(document):
    documented = {
        error_id
        for ops in document["paths"].values()
        for op in ops.values()
        if isinstance(op, dict)
        for response in op.get("responses", {}).values()
        for error_id in response.get("x-error-ids", [])
    }
    answered = {i for i, entry in REGISTRY.items() if any(entry.where.values())}
    assert answered <= documented
    for resource, families in RESOURCE_FAMILIES.items():
        assert {family.of(resource) for family in families} <= documented, resource


def test_ids_raised_but_once_undocumented_are_documented(document):
    """vm/busy, vm/no_free_mac and general/idempotency_conflict were raised but missing."""
    vm = document["paths"]["/api/v1/vm"]
    assert "vm/no_free_mac" in vm["post"]["responses"]["409"]["x-error-ids"]
    assert "general/idempotency_conflict" in vm["post"]["responses"]["409"]["x-error-ids"]
    assert "general/idempotency_conflict" not in vm["patch"]["responses"]["409"]["x-error-ids"]
    storage_item = document["paths"]["/api/v1/storage/{ident}"]
    assert "vm/busy" in storage_item["delete"]["responses"]["409"]["x-error-ids"]
    assert (
        "vm/busy"
        in document["paths"]["/api/v1/interface"]["patch"]["responses"]["409"]["x-error-ids"]
    )
    # reads answer no write's ids
    assert "409" not in vm["get"]["responses"]


def test_every_status_of_the_registry_has_words():
    assert set(ERROR_STATUSES) == {entry.status for entry in REGISTRY.values()}
