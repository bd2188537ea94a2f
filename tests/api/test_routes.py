"""The route table (vmapi/api/routes.py): every documented operation has one named
handler, ``flask routes`` shows them, the table's "who may call it" is what the handlers
check, and the methods a URL does not take still answer 405 and OPTIONS as before."""

from __future__ import annotations

import re

import pytest
from flask.cli import routes_command

from tests.conftest import make_token
from tests.errors import assert_error
from vmapi.api.openapi import document_for
from vmapi.api.resource import ADMIN_ONLY, ALL_ROLES
from vmapi.api.routes import API_PREFIX, API_ROUTES, NO_TOKEN, ROUTES


def _document_path(rule: str) -> str:
    path = rule.replace("<api_version>", "v1")
    return re.sub(r"<(?:[a-z]+(?:\([^)]*\))?:)?([a-z_]+)>", r"{\1}", path)


def _endpoints(app) -> dict[tuple[str, str], list[str]]:
    """(document path, lower-case method) -> the endpoints that take it."""
    found: dict[tuple[str, str], list[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            found.setdefault((_document_path(rule.rule), method.lower()), []).append(rule.endpoint)
    return found


def test_every_documented_operation_has_exactly_one_named_endpoint(app):
    with app.app_context():
        document = document_for(app)
    documented = {
        (path, method)
        for path, operations in document["paths"].items()
        for method in operations
        if not method.startswith("x-")
    }
    endpoints = _endpoints(app)
    served = {(path, "patch" if method == "update" else method) for path, method in endpoints}
    assert served == documented
    for (path, method), names in endpoints.items():
        assert len(names) == 1, (path, method, names)
        if method == "patch":  # UPDATE is PATCH: the same handler
            assert endpoints[(path, "update")] == names, path
        _resource, name = names[0].split(".")
        view = app.view_functions[names[0]]
        assert name == view.__name__.removesuffix("_view"), names[0]
        assert name not in {"collection", "item", "file", "view"}, names[0]  # says what it does


def test_flask_routes_lists_the_handlers(app):
    result = app.test_cli_runner().invoke(routes_command, [])
    assert result.exit_code == 0, result.output
    rows = {tuple(line.split()) for line in result.output.splitlines()}
    api = API_PREFIX
    assert ("vm.create_vm", "POST", f"{api}/vm") in rows
    assert ("vm.migrate_vm", "POST", f"{api}/vm/<id:ident>/migrate") in rows
    assert ("vm.rebuild_vm", "POST", f"{api}/vm/<id:ident>/rebuild") in rows
    assert ("vm.open_console", "POST", f"{api}/vm/<id:ident>/console") in rows
    assert ("image.upload_image_file", "PUT", f"{api}/image/<id:ident>/file") in rows
    assert ("image.download_image_file", "GET", f"{api}/image/<id:ident>/file") in rows
    assert ("node.create", "POST", f"{api}/node") in rows
    assert ("node.update", "PATCH,", "UPDATE", f"{api}/node/<id:ident>") in rows
    assert ("event.list", "GET", f"{api}/event") in rows


def _url(path: str) -> str:
    return re.sub(r"<id:ident>", "999999", path).replace("<fqdn>", "nowhere.example.com")


ROWS = [(spec, roles) for spec, _handler, roles in ROUTES] + [
    (f"{spec.split(' ', 1)[0]} {API_PREFIX.replace('<api_version>', 'v1')}{spec.split(' ', 1)[1]}",
     roles)
    for spec, _handler, roles in API_ROUTES
]  # fmt: skip


def test_the_table_says_who_may_call_each_route(app, client):
    """No token: 401 unless the row needs none. A customer: 403 exactly on the admins'
    rows. An admin: never refused."""
    customer = {"Authorization": f"Bearer {make_token(app, 'customer', 7)}"}
    admin = {"Authorization": f"Bearer {make_token(app, 'admin')}"}
    for spec, roles in ROWS:
        assert roles in (NO_TOKEN, ADMIN_ONLY, ALL_ROLES), spec
        method, path = spec.split(" ", 1)
        url = _url(path)
        anonymous = client.open(url, method=method).status_code
        assert (anonymous == 401) == (roles != NO_TOKEN), (spec, anonymous)
        if roles == NO_TOKEN:
            continue
        refused = client.open(url, method=method, headers=customer).status_code
        assert (refused == 403) == (roles == ADMIN_ONLY), (spec, refused)
        assert client.open(url, method=method, headers=admin).status_code not in (401, 403), spec


@pytest.mark.parametrize(
    ("path", "methods"),
    [
        ("vm_state/1", {"DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "UPDATE"}),
        ("vm", {"DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "UPDATE"}),
        ("interface", {"GET", "HEAD", "OPTIONS", "PATCH", "UPDATE"}),
        ("event/1", {"GET", "HEAD", "OPTIONS"}),
        ("image/1/file", {"GET", "HEAD", "OPTIONS", "PUT"}),
        ("vm/1/migrate", {"OPTIONS", "POST"}),
    ],
)
def test_a_url_answers_405_and_options_with_all_its_methods(api, path, methods):
    refused = api.call("TRACE", path)
    body = assert_error(refused, 405, "general/method_not_allowed")
    assert body["data"]["allowed"] == sorted(methods)
    assert refused.headers["Allow"] == ", ".join(sorted(methods))
    options = api.call("OPTIONS", path)
    assert options.status_code == 200
    assert set(options.headers["Allow"].split(", ")) == methods


def test_head_answers_like_get_without_a_body(api):
    got, head = api.get("vm_state"), api.call("HEAD", "vm_state")
    assert head.status_code == got.status_code == 200
    assert head.data == b"" and head.headers["Content-Type"] == got.headers["Content-Type"]


def test_a_refused_action_is_recorded_under_its_name(app, api, customer_api):
    """The audit trail and vmapi_changes_total name an action by its route (``migrate``),
    not by its method (POST would read as ``create``)."""
    refused = customer_api(7).post("vm/999999/migrate", json={})
    assert_error(refused, 403, "general/authorization/forbidden")
    events = api.get("event?resource=vm").json["data"].values()
    assert [(e["action"], e["outcome"]) for e in events] == [
        ("migrate", "general/authorization/forbidden")
    ]


@pytest.mark.parametrize("ident", ["0", "0" * 19, str(2**63), "9" * 19, "1" * 20])
@pytest.mark.parametrize(
    ("path", "methods"),
    [
        ("vm_state/{}", ["GET", "PATCH", "UPDATE", "DELETE"]),
        ("vm/{}/migrate", ["POST"]),
        ("image/{}/file", ["GET", "PUT"]),
    ],
)
def test_an_id_out_of_range_is_no_route_whatever_the_method(api, path, methods, ident):
    """404, not a 405 naming the URL's other methods: each method has its own rule, and
    the id is refused before any rule is tried."""
    for method in methods:
        assert_error(api.call(method, path.format(ident), json={}), 404, "general/not_found")


def test_the_largest_id_reaches_its_handler(api):
    largest = str(2**63 - 1)
    assert_error(api.delete(f"vm_state/{largest}"), 404, "vm_state/not_found")
    assert_error(api.delete(f"vm_state/{'0' * 13}999999"), 404, "vm_state/not_found")
