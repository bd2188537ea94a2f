"""API.md §1: the envelope on every response, representations, bodies, versions."""

import json

import msgpack
import pytest

from tests.errors import assert_error

pytestmark = pytest.mark.embedded


def test_success_envelope(api):
    response = api.get("vm_state")
    assert response.status_code == 200
    assert response.json["status"] == "success"
    assert set(response.json["data"]) == {"1", "2", "3", "4", "5", "6"}


@pytest.mark.parametrize("version", ["v1", "v1.0", "v1.0.0"])
def test_versions_are_equivalent(api, version):
    response = api.get(f"/api/{version}/vm_state/2")
    assert response.status_code == 200
    assert response.json["data"] == {"id": 2, "name": "running"}


@pytest.mark.parametrize("path", ["/api/v2/vm_state", "/api/v1.1/vm_state", "/api/v2/nothing/here"])
def test_unsupported_version(api, path):
    assert_error(api.get(path), 404, "general/version/unsupported")


@pytest.mark.parametrize("path", ["/api/vx/vm_state", "/api/1.0/vm_state", "/api/v1.a/whatever"])
def test_malformed_version(api, path):
    assert_error(api.get(path), 400, "general/version/malformed")


def test_unknown_route_is_enveloped(api):
    assert_error(api.get("/api/v1/no_such_resource"), 404, "general/not_found")
    assert_error(api.get("/nowhere"), 404, "general/not_found")


@pytest.mark.parametrize(
    "path",
    [
        "vm_state/abc",
        "vm_state/-1",
        "vm_state/0",
        "vm_state/1.5",
        "vm_state/99999999999999999999",
        "vm_state/..%2f..%2fetc",
    ],
)
def test_bad_ids_are_404(api, path):
    assert_error(api.get(path), 404, "general/not_found")


def test_missing_object_is_404_with_resource_id(api):
    body = assert_error(api.get("vm_state/999"), 404, "vm_state/not_found")
    assert "999" in body["message"]


def test_405_is_enveloped_and_lists_methods(api):
    response = api.post("vm_state/1", json={"name": "x"})
    body = assert_error(response, 405, "general/method_not_allowed")
    assert "UPDATE" in body["data"]["allowed"]
    assert "UPDATE" in response.headers["Allow"]


def test_500_hides_the_traceback_and_names_a_request_id(app, api, caplog):
    @app.get("/boom")
    def boom():
        raise RuntimeError("secret internals")

    response = api.get("/boom")
    body = assert_error(response, 500, "general/internal")
    text = response.get_data(as_text=True)
    assert "secret internals" not in text and "Traceback" not in text
    request_id = body["data"]["request_id"]
    assert request_id == response.headers["X-Request-Id"]
    assert request_id in caplog.text and "secret internals" in caplog.text


def test_request_id_is_echoed(api):
    response = api.get("vm_state", headers={"X-Request-Id": "abc-123"})
    assert response.headers["X-Request-Id"] == "abc-123"
    assert len(api.get("vm_state").headers["X-Request-Id"]) == 32


def test_msgpack_out(api):
    for accept in ("application/msgpack", "application/x-msgpack"):
        response = api.get("vm_state/1", headers={"Accept": accept})
        assert response.status_code == 200
        assert response.mimetype == accept
        assert msgpack.unpackb(response.data) == {
            "status": "success",
            "data": {"id": 1, "name": "building"},
        }


def test_msgpack_errors_too(api):
    response = api.get("vm_state/999", headers={"Accept": "application/msgpack"})
    assert msgpack.unpackb(response.data)["error_id"] == "vm_state/not_found"


def test_msgpack_in(api):
    body = msgpack.packb({"name": "rescue"})
    response = api.post("vm_state", data=body, headers={"Content-Type": "application/msgpack"})
    assert response.status_code == 201
    assert response.json["data"]["name"] == "rescue"


def test_html_out_links_related_objects(api, make_node):
    node = make_node()
    response = api.get(f"node/{node['id']}", headers={"Accept": "text/html"})
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    assert node["fqdn"] in html
    assert '<a href="/api/v1/node_state/1">' in html
    listing = api.get("node", headers={"Accept": "text/html,*/*;q=0.8"}).get_data(as_text=True)
    assert f'<a href="/api/v1/node/{node["id"]}">' in listing


def test_html_escapes_data(api):
    api.post("virt_method", json={"name": "x", "domain_type": "test"})
    response = api.get("vm_state/999", headers={"Accept": "text/html"})
    assert response.status_code == 404
    assert "<script" not in response.get_data(as_text=True)


def test_json_is_default_for_any(api):
    response = api.get("vm_state", headers={"Accept": "*/*"})
    assert response.mimetype == "application/json"


def test_unsupported_media_type(api):
    response = api.post(
        "vm_state", data="name=x", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert_error(response, 415, "general/unsupported_media_type")
    response = api.post("vm_state", data=b'{"name": "x"}', headers={"Content-Type": ""})
    assert_error(response, 415, "general/unsupported_media_type")


@pytest.mark.parametrize(
    ("data", "ctype"),
    [
        (b'{"name": ', "application/json"),
        (b"\xff\xfe{}", "application/json"),  # not UTF-8
        (b'{"name": NaN}', "application/json"),
        (b"\xc1", "application/msgpack"),  # reserved byte
        (msgpack.packb({"name": b"bytes"}), "application/msgpack"),
        (msgpack.packb({1: "x"}, strict_types=False), "application/msgpack"),
    ],
)
def test_malformed_body(api, data, ctype):
    response = api.post("vm_state", data=data, headers={"Content-Type": ctype})
    assert_error(response, 400, "general/malformed_body")
    assert api.get("vm_state").json["data"].keys() == {"1", "2", "3", "4", "5", "6"}


def test_body_too_large(app, api):
    limit = app.config["MAX_CONTENT_LENGTH"]
    big = json.dumps({"name": "x" * (limit + 10)})
    assert_error(
        api.post("vm_state", data=big, content_type="application/json"),
        413,
        "general/body_too_large",
    )


@pytest.mark.parametrize("app_config", [{"MAX_BODY": 100}])
def test_body_limit_is_configurable(api, app_config):
    body = json.dumps({"name": "a" * 120})
    assert_error(
        api.post("vm_state", data=body, content_type="application/json"),
        413,
        "general/body_too_large",
    )
    assert api.post("vm_state", json={"name": "short"}).status_code == 201


def test_missing_body(api):
    assert_error(api.post("vm_state"), 400, "general/validation")


@pytest.mark.parametrize("body", ["just a string", 42, None, [1, 2]])
def test_body_of_wrong_shape(api, body):
    response = api.post("vm_state", data=json.dumps(body), content_type="application/json")
    assert_error(response, 400, "general/validation")


def test_health(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json == {"status": "success", "data": {"database": "ok"}}
