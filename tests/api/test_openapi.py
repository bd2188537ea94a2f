"""The OpenAPI document is valid OpenAPI 3 and matches the app's real routes."""

import re

import pytest
import yaml
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate

from tests.conftest import vm_body
from vmapi.api.openapi import document_for
from vmapi.api.openapi_errors import ERROR_STATUSES
from vmapi.app import create_app
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


def _body(document, path, method="post"):
    schema = document["paths"][path][method]["requestBody"]["content"]["application/json"]
    return schema["schema"]["oneOf"]


def test_schemas_follow_the_marshmallow_fields(document):
    node = document["components"]["schemas"]["Node"]
    assert node["properties"]["allocated_cores"]["readOnly"] is True
    assert node["additionalProperties"] is False
    # an answer's reference is {"id": N}, or with nest= the whole object
    assert node["properties"]["node_state"]["anyOf"][1] == {
        "$ref": "#/components/schemas/NodeState"
    }
    create = _body(document, "/api/v1/node")[0]
    assert create["properties"]["node_state"]["required"] == ["id"]
    assert "fqdn" in create["required"] and "allocated_cores" not in create["properties"]
    assert create["additionalProperties"] is False


def test_fields_are_described_as_validated(document):
    """What the server refuses is not promised: patterns, formats, bounds, multiples."""
    vm = _body(document, "/api/v1/vm")[0]["properties"]
    assert vm["ram"]["multipleOf"] == 1024 * 1024 and vm["ram"]["minimum"] == 64 * 1024 * 1024
    assert "vm_state" not in vm  # a new VM is always started
    change = _body(document, "/api/v1/vm", "patch")[0]["properties"]
    assert {"uuid", "node", "virt_method"}.isdisjoint(change)  # vm/immutable_field
    assert change["id"]["minimum"] == 1
    node = _body(document, "/api/v1/node")[0]["properties"]
    assert re.fullmatch(node["fqdn"]["pattern"], "node1.example.com")
    assert not re.fullmatch(node["fqdn"]["pattern"], "node1")
    assert re.fullmatch(node["libvirt_uri"]["pattern"], "qemu+ssh://root@hv1.example.com/system")
    assert not re.fullmatch(node["libvirt_uri"]["pattern"], "qemu+ext:///system?command=/bin/x")
    assert node["ipv4_gw_ext"]["format"] == "ipv4"
    # an IPv4 POST is an address or a whole network, an IPv6 one an address or a pool
    ipv4 = _body(document, "/api/v1/ipv4")
    assert [sorted(shape["required"]) for shape in ipv4[0]["oneOf"]] == [
        ["address", "gateway", "prefix"],
        ["gateway", "network"],
    ]
    ipv6 = _body(document, "/api/v1/ipv6")
    assert "address" in ipv6[0]["required"] and "network" in ipv6[1]["required"]
    assert not re.fullmatch(ipv6[1]["properties"]["network"]["pattern"], "2001:db8::/127")


def test_free_text_excludes_what_postgresql_cannot_store(document):
    """Every string the document lets a client send has a pattern that refuses NUL, or an
    enum or format that never holds one."""
    strings = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "string" and not node.get("readOnly"):
                strings.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path, ops in document["paths"].items():
        if path.startswith("/api/v1/") and "{fqdn}" not in path:
            for op in ops.values():
                walk(op.get("parameters", []))
                walk(op.get("requestBody", {}))
    assert len(strings) > 50
    for schema in strings:
        if "enum" in schema or "format" in schema:
            continue
        assert not re.search(schema["pattern"], "a\x00b"), schema


def test_query_parameters_are_described_as_validated(document):
    vm = {p["name"]: p for p in document["paths"]["/api/v1/vm"]["get"]["parameters"]}
    nest = vm["nest"]
    assert (nest["style"], nest["explode"]) == ("form", False)
    assert nest["schema"]["minItems"] == 1  # nest= (empty) is refused
    assert set(nest["schema"]["items"]["enum"]) == {"node", "virt_method", "vm_state",
                                                    "interfaces", "image", "server_group"}  # fmt: skip
    vlan = {p["name"] for p in document["paths"]["/api/v1/vlan"]["get"]["parameters"]}
    assert "nest" not in vlan  # nothing to nest there
    delete = document["paths"]["/api/v1/vm/{ident}"]["delete"]["parameters"]
    assert {p["name"]: p["schema"] for p in delete}["cascade"]["enum"] == ["storage"]
    patch = document["paths"]["/api/v1/vm/{ident}"]["patch"]["parameters"]
    assert {p["name"]: p["schema"] for p in patch}["force"]["type"] == "boolean"


@pytest.mark.parametrize(
    "app_config",
    [{"MAX_BATCH": 7, "PAGE_MAX_LIMIT": 50, "PAGE_DEFAULT_LIMIT": 5, "STORAGE_MAX_SIZE": 2**30}],
)
def test_limits_come_from_the_app_config(app, document):
    limit = document["paths"]["/api/v1/node"]["get"]["parameters"][0]["schema"]
    assert (limit["maximum"], limit["default"]) == (50, 5)
    assert _body(document, "/api/v1/node")[1]["maxItems"] == 7
    assert _body(document, "/api/v1/storage")[0]["properties"]["size"]["maximum"] == 2**30
    other = create_app({"DATABASE_URL": "sqlite://"})  # its own document, default limits
    assert _body(document_for(other), "/api/v1/node")[1]["maxItems"] == 100


def test_the_enc_answer_is_the_documented_object(api, document, vm_host, test_method):
    node = vm_host()
    assert api.post("vm", json=vm_body(test_method)).status_code == 201
    response = api.get(f"node/{node['fqdn']}/enc")
    content = document["paths"]["/api/v1/node/{fqdn}/enc"]["get"]["responses"]["200"]
    OAS30Validator(content["content"]["application/yaml"]["schema"]).validate(
        yaml.safe_load(response.get_data(as_text=True))
    )


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
