"""API.md §1 verbs, arrays, lists, paging, filters and nest, on the catalog resources."""

import pytest

from tests.conftest import GIB, vm_body
from tests.errors import assert_error

pytestmark = pytest.mark.embedded


def names(api, resource="node_state"):
    return sorted(o["name"] for o in api.get(f"{resource}?limit=1000").json["data"].values())


def test_post_one(api):
    response = api.post("node_state", json={"name": "draining", "schedulable": False})
    assert response.status_code == 201
    assert response.json["data"] == {"id": 4, "name": "draining", "schedulable": False}


def test_post_ignores_id(api):
    response = api.post("node_state", json={"id": 77, "name": "draining"})
    assert response.status_code == 201
    assert response.json["data"]["id"] == 4
    assert response.json["data"]["schedulable"] is False  # the default


def test_post_array_answers_keyed_by_id(api):
    response = api.post("node_state", json=[{"name": "a"}, {"name": "b", "schedulable": True}])
    assert response.status_code == 201
    assert response.json["data"] == {
        "4": {"id": 4, "name": "a", "schedulable": False},
        "5": {"id": 5, "name": "b", "schedulable": True},
    }


def test_post_array_is_all_or_nothing(api):
    before = names(api)
    response = api.post("node_state", json=[{"name": "ok1"}, {"name": "ok2"}, {"name": "ok1"}])
    body = assert_error(response, 409, "node_state/duplicate")
    assert body["data"]["index"] == 2
    assert names(api) == before


def test_post_array_validation_names_index(api):
    response = api.post("node_state", json=[{"name": "ok"}, {"name": "bad name!"}])
    body = assert_error(response, 400, "general/validation")
    assert body["data"]["index"] == 1
    assert "name" in body["data"]
    assert "ok" not in names(api)


def test_array_limit(app, api):
    limit = app.config["MAX_BATCH"]
    body = [{"name": f"s{i}"} for i in range(limit + 1)]
    response = api.post("node_state", json=body)
    assert_error(response, 400, "general/validation")
    assert api.post("node_state", json=body[:limit]).status_code == 201


def test_empty_array(api):
    assert_error(api.post("node_state", json=[]), 400, "general/validation")


def test_array_of_non_objects(api):
    body = assert_error(api.post("node_state", json=[{"name": "a"}, 3]), 400, "general/validation")
    assert body["data"]["index"] == 1


def test_unknown_fields_are_rejected(api):
    body = assert_error(
        api.post("node_state", json={"name": "x", "color": "red"}), 400, "general/validation"
    )
    assert body["data"] == {"color": ["Unknown field."]}


def test_read_only_fields_are_rejected(api, make_node):
    node = make_node()
    body = assert_error(
        api.update(f"node/{node['id']}", json={"allocated_cores": 5}), 400, "general/validation"
    )
    assert "allocated_cores" in body["data"]


def test_required_fields(api):
    body = assert_error(api.post("virt_method", json={"name": "X"}), 400, "general/validation")
    assert body["data"] == {"domain_type": ["Missing data for required field."]}


def test_update_item_and_patch_item(api):
    created = api.post("node_state", json={"name": "a"}).json["data"]
    response = api.update(f"node_state/{created['id']}", json={"schedulable": True})
    assert response.status_code == 200
    assert response.json["data"]["schedulable"] is True
    response = api.patch(f"node_state/{created['id']}", json={"name": "b"})
    assert response.json["data"] == {"id": created["id"], "name": "b", "schedulable": True}


def test_update_item_id_must_match(api):
    created = api.post("node_state", json={"name": "a"}).json["data"]
    assert (
        api.update(
            f"node_state/{created['id']}", json={"id": created["id"], "name": "z"}
        ).status_code
        == 200
    )
    assert_error(
        api.update(f"node_state/{created['id']}", json={"id": 1, "name": "y"}),
        400,
        "general/validation",
    )


def test_update_collection_single_and_array(api):
    a, b = api.post("node_state", json=[{"name": "a"}, {"name": "b"}]).json["data"].values()
    response = api.update("node_state", json={"id": a["id"], "name": "a2"})
    assert response.status_code == 200
    assert response.json["data"]["name"] == "a2"
    response = api.update(
        "node_state", json=[{"id": a["id"], "schedulable": True}, {"id": b["id"], "name": "b2"}]
    )
    assert response.json["data"] == {
        str(a["id"]): {"id": a["id"], "name": "a2", "schedulable": True},
        str(b["id"]): {"id": b["id"], "name": "b2", "schedulable": False},
    }


def test_update_collection_all_or_nothing(api):
    a, b = api.post("node_state", json=[{"name": "a"}, {"name": "b"}]).json["data"].values()
    response = api.update(
        "node_state", json=[{"id": a["id"], "name": "a2"}, {"id": b["id"], "name": "a2"}]
    )
    body = assert_error(response, 409, "node_state/duplicate")
    assert body["data"]["index"] == 1
    assert "a2" not in names(api)


def test_update_collection_needs_id(api):
    body = assert_error(api.update("node_state", json={"name": "x"}), 400, "general/validation")
    assert "id" in body["data"]
    body = assert_error(
        api.update("node_state", json=[{"id": 1, "schedulable": True}, {"id": "2"}]),
        400,
        "general/validation",
    )
    assert body["data"]["index"] == 1


def test_update_missing_object(api):
    assert_error(
        api.update("node_state", json={"id": 999, "name": "x"}), 404, "node_state/not_found"
    )


def test_delete_item_returns_it(api):
    created = api.post("node_state", json={"name": "gone"}).json["data"]
    response = api.delete(f"node_state/{created['id']}")
    assert response.status_code == 200
    assert response.json["data"] == created
    assert_error(api.get(f"node_state/{created['id']}"), 404, "node_state/not_found")


def test_delete_collection_by_body(api):
    a, b, c = (
        api.post("node_state", json=[{"name": "a"}, {"name": "b"}, {"name": "c"}])
        .json["data"]
        .values()
    )
    response = api.delete("node_state", json={"id": a["id"]})
    assert response.json["data"] == a
    response = api.delete("node_state", json=[{"id": b["id"]}, {"id": c["id"]}])
    assert set(response.json["data"]) == {str(b["id"]), str(c["id"])}
    assert names(api) == ["maintenance", "offline", "running"]


def test_delete_collection_all_or_nothing(api):
    a = api.post("node_state", json={"name": "a"}).json["data"]
    body = assert_error(
        api.delete("node_state", json=[{"id": a["id"]}, {"id": 1}]), 409, "node_state/protected"
    )
    assert body["data"]["index"] == 1
    assert "a" in names(api)


def test_delete_body_shape(api):
    assert_error(api.delete("node_state", json={"id": "1"}), 400, "general/validation")
    assert_error(api.delete("node_state", json={"id": 1, "name": "x"}), 400, "general/validation")
    assert_error(api.delete("node_state"), 400, "general/validation")


def test_seeded_rows_are_protected(api):
    for resource, ident in [
        ("node_state", 1),
        ("vm_state", 2),
        ("virt_method", 1),
        ("storage_type", 1),
        ("cache_option", 1),
    ]:
        assert_error(api.delete(f"{resource}/{ident}"), 409, f"{resource}/protected")
    assert_error(api.update("vm_state/2", json={"name": "up"}), 409, "vm_state/protected")
    # other fields of seeded rows may change
    assert (
        api.update("node_state/2", json={"schedulable": True}).json["data"]["schedulable"] is True
    )


def test_in_use_names_the_referencing_ids(api, make_node):
    state = api.post("node_state", json={"name": "custom"}).json["data"]
    n1 = make_node(node_state={"id": state["id"]})
    n2 = make_node(node_state={"id": state["id"]})
    body = assert_error(api.delete(f"node_state/{state['id']}"), 409, "node_state/in_use")
    assert body["data"] == {"node": [n1["id"], n2["id"]]}


def test_duplicate_names_the_existing_id(api):
    body = assert_error(
        api.post("virt_method", json={"name": "KVM", "domain_type": "kvm"}),
        409,
        "virt_method/duplicate",
    )
    assert body["data"]["id"] == 1
    assert body["data"]["fields"] == ["name"]
    body = assert_error(
        api.post(
            "storage_type",
            json={
                "name": "new",
                "description": "raw volumes in the node's local pool",
                "pool": "p",
                "format": "raw",
            },
        ),
        409,
        "storage_type/duplicate",
    )
    assert body["data"]["fields"] == ["description"]


def test_reference_to_missing_object(api):
    body = assert_error(api.post("node", json={"fqdn": "a.example.com", "ipv4_addr_ext": "192.0.2.1/24",
        "ipv6_addr_ext": "2001:db8::1/64", "ipv4_gw_ext": "192.0.2.254", "ipv6_gw_ext": "2001:db8::ff",
        "node_state": {"id": 99}, "cores": 4, "ram": 2**30}), 400, "general/validation")  # fmt: skip
    assert body["data"] == {"node_state": ["No node_state with id 99."]}


def test_paging_with_link(api):
    api.post("node_state", json=[{"name": f"s{i:02d}"} for i in range(12)])  # ids 4..15
    seen = []
    url = "node_state?limit=5"
    pages = 0
    while url:
        response = api.get(url)
        assert response.status_code == 200
        page = response.json["data"]
        assert len(page) <= 5
        seen += [int(k) for k in page]
        link = response.headers.get("Link")
        url = link.split(";")[0].strip("<>").split("localhost")[1] if link else None
        if url:
            assert 'rel="next"' in link
        pages += 1
    assert seen == list(range(1, 16))
    assert pages == 3


def test_paging_after(api):
    response = api.get("vm_state?after=4")
    assert list(response.json["data"]) == ["5", "6"]
    assert "Link" not in response.headers
    assert list(api.get("vm_state?after=0&limit=2").json["data"]) == ["1", "2"]


def test_link_keeps_filters(api):
    api.post("node_state", json=[{"name": f"s{i}", "schedulable": True} for i in range(3)])
    response = api.get("node_state?schedulable=true&limit=2")
    assert "schedulable=true" in response.headers["Link"]
    assert "after=4" in response.headers["Link"]


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=1001", "limit=x", "after=-1", "after=x", "limit=1&limit=2"]
)
def test_bad_paging(api, query):
    assert_error(api.get(f"vm_state?{query}"), 400, "general/validation")


def test_filters_on_scalars_and_refs(api, make_node):
    state = api.post("node_state", json={"name": "custom"}).json["data"]
    n1 = make_node(node_state={"id": state["id"]}, location="fra1")
    make_node(location="fra1")
    assert list(api.get(f"node?node_state.id={state['id']}").json["data"]) == [str(n1["id"])]
    assert len(api.get("node?location=fra1").json["data"]) == 2
    assert list(api.get("node_state?schedulable=true").json["data"]) == ["1"]
    assert list(api.get("virt_method?name=QEMU").json["data"]) == ["2"]
    assert api.get("node?cores=16").status_code == 200


@pytest.mark.parametrize(
    "query", ["colour=red", "node_state=1", "schedulable=yes", "id.id=1", "name.id=1"]
)
def test_bad_filters(api, query):
    assert_error(api.get(f"node_state?{query}"), 400, "general/validation")


def test_sql_looking_filter_values_are_just_values(api):
    response = api.get("vm_state?name=running' OR '1'='1")
    assert response.status_code == 200
    assert response.json["data"] == {}


def test_nest(api, make_node):
    node = make_node()
    response = api.get(f"node/{node['id']}?nest=node_state")
    assert response.json["data"]["node_state"] == {"id": 1, "name": "running", "schedulable": True}
    listed = api.get("node?nest=node_state").json["data"]
    assert listed[str(node["id"])]["node_state"]["name"] == "running"


@pytest.mark.parametrize("nest", ["nest=colour", "nest=fqdn", "nest="])
def test_bad_nest(api, make_node, nest):
    node = make_node()
    assert_error(api.get(f"node/{node['id']}?{nest}"), 400, "general/validation")


def test_write_rejects_unknown_query_parameters(api):
    assert_error(api.post("node_state?force=true", json={"name": "x"}), 400, "general/validation")


@pytest.mark.parametrize("value", ["a\u0000b", "\ud800"])
def test_text_postgres_cannot_store_is_a_validation_error(api, value):
    assert_error(api.post("node_state", json={"name": value}), 400, "general/validation")
    assert_error(
        api.post("cache_option", json={"name": "none", "description": value}),
        400,
        "general/validation",
    )
    assert_error(api.get("node?location=a%00b"), 400, "general/validation")
    # werkzeug decodes invalid UTF-8 in a query as U+FFFD: harmless text, no match
    assert api.get("node?location=%ED%A0%80").status_code == 200


@pytest.mark.parametrize("ident", [{}, "x", None, [1], 99])
def test_id_on_post_is_ignored_whatever_it_is(api, ident):
    response = api.post("node_state", json={"id": ident, "name": "any"})
    assert response.status_code == 201
    assert response.json["data"]["id"] == 4


def test_every_reference_can_be_nested(api, vm_host, test_method):
    """API.md: any reference field may be nested, in a list and in a single GET (a field
    with no relationship behind it answered 500)."""
    from vmapi.api.resource import RESOURCES

    vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    assert api.post("storage", json={"size": GIB, "vm": {"id": vm["id"]},
                                     "storage_type": {"id": 1}}).status_code == 201  # fmt: skip
    for name, res in RESOURCES.items():
        for field in res.nestable:
            listed = api.get(f"{name}?nest={field}")
            assert listed.status_code == 200, (name, field, listed.json)
            for ident, obj in listed.json["data"].items():
                one = api.get(f"{name}/{ident}?nest={field}")
                assert one.status_code == 200 and one.json["data"] == obj, (name, field)
