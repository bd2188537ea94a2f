"""Hostile input: always a 4xx envelope with the right error id, and nothing changes."""

import pytest

from tests.errors import assert_error

pytestmark = pytest.mark.embedded


def unchanged(api):
    return api.get("node_state").json["data"].keys() == {"1", "2", "3"}


@pytest.mark.parametrize(
    "raw",
    [
        "[" * 100_000 + "]" * 100_000,  # nesting deeper than any parser's recursion
        '{"a":' * 50_000 + "1" + "}" * 50_000,
        '{"name": "x", "name": "y"}',  # a key twice is ambiguous: refused, not guessed
    ],
)
def test_deeply_nested_or_odd_json(api, raw):
    response = api.post("node_state", data=raw, content_type="application/json")
    assert 400 <= response.status_code < 500, response.get_data(as_text=True)[:200]
    assert response.json["status"] == "error"
    assert api.get("node_state").status_code == 200


def test_deeply_nested_msgpack(api):
    raw = b"\x91" * 100_000 + b"\x00"
    assert_error(
        api.post("node_state", data=raw, headers={"Content-Type": "application/msgpack"}),
        400,
        "general/malformed_body",
    )
    assert unchanged(api)


@pytest.mark.parametrize(
    "body",
    [
        {"name": {"nested": ["garbage", {"deeper": None}]}},
        {"name": ["a", "b"]},
        {"name": 12345678901234567890123},
        {"name": "x", "schedulable": {"$ne": None}},
        {"name": "x'; DROP TABLE node_state; --"},
    ],
)
def test_garbage_fields(api, body):
    response = api.post("node_state", json=body)
    if response.status_code == 201:  # a SQL-looking name is just a (refused) name
        pytest.fail(f"accepted {body}")
    assert_error(response, 400, "general/validation")
    assert unchanged(api)


@pytest.mark.parametrize("value", [2**64, -(2**64), 1e308, 1.5, True, "2", [], {}])
def test_numbers_where_integers_go(api, make_node, value):
    node = make_node()
    assert_error(api.update(f"node/{node['id']}", json={"cores": value}), 400, "general/validation")
    assert api.get(f"node/{node['id']}").json["data"]["cores"] == node["cores"]


@pytest.mark.parametrize(
    "path",
    [
        "node_state/1%00",
        "node_state/%2e%2e/vm",
        "node_state/1;2",
        "node_state/0x1",
        "node_state/\uff11",  # a fullwidth digit one
    ],
)
def test_path_tricks(api, path):
    response = api.get(path)
    assert response.status_code in (400, 404)
    assert response.json["status"] == "error"


def test_array_over_the_limit_changes_nothing(api):
    assert_error(
        api.post("node_state", json=[{"name": f"n{i}"} for i in range(101)]),
        400,
        "general/validation",
    )
    assert unchanged(api)


@pytest.mark.parametrize("given", ["<script>alert(1)</script>", "a" * 129, "ünï", "a b"])
def test_odd_request_ids_are_replaced(api, given):
    response = api.get("node_state", headers={"X-Request-Id": given})
    assert response.headers["X-Request-Id"] != given and len(response.headers["X-Request-Id"]) == 32


def test_huge_token_header(client):
    response = client.get(
        "/api/v1/node_state", headers={"Authorization": "Bearer " + "a" * 100_000}
    )
    assert_error(response, 401, "general/authentication/failed")


@pytest.mark.parametrize(
    "query",
    [
        "limit=" + "9" * 5000,
        "after=" + "9" * 30,
        "cores=1e400",
        "node_state.id=-1",
        "nest=" + ",".join(["node_state"] * 1000),
    ],
)
def test_hostile_query_strings(api, make_node, query):
    make_node()
    response = api.get(f"node?{query}")
    assert response.status_code in (200, 400), response.json
    if response.status_code == 400:
        assert response.json["error_id"] == "general/validation"
