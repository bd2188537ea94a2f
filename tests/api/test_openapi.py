"""The OpenAPI document is valid OpenAPI 3 and matches the app's real routes."""

import re

import pytest
from openapi_spec_validator import validate

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
