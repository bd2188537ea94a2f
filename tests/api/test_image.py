"""/image, the catalog: every verb, the fields, and the role rules (the file is in
test_image_file.py)."""

from datetime import datetime

import pytest

from tests.errors import assert_error

pytestmark = pytest.mark.embedded

CHECKSUM = "ab" * 32


def make(api, **fields):
    response = api.post("image", json={"name": "debian-12", **fields})
    assert response.status_code == 201, response.json
    return response.json["data"]


def test_post_answers_a_queued_image(api, backend):
    image = make(api, description="Debian 12", min_ram=512 * 1024**2, checksum=CHECKSUM)
    assert image == {
        "id": image["id"],
        "name": "debian-12",
        "format": "qcow2",  # the default
        "size": None,
        "virtual_size": None,
        "checksum": CHECKSUM,
        "state": "queued",
        "customer_id": None,
        "min_ram": 512 * 1024**2,
        "description": "Debian 12",
        "created_at": image["created_at"],
        "kind": "upload",
        "source": None,
    }
    assert datetime.fromisoformat(image["created_at"]).tzinfo is not None
    assert api.get(f"image/{image['id']}").json["data"] == image
    assert make(api, format="raw")["format"] == "raw"


def test_list_filters_and_arrays(api):
    made = api.post("image", json=[{"name": "a", "format": "raw"}, {"name": "b"}]).json["data"]
    assert [x["name"] for x in made.values()] == ["a", "b"]
    raw = api.get("image?format=raw").json["data"]
    assert [x["name"] for x in raw.values()] == ["a"]
    assert len(api.get("image?state=queued").json["data"]) == 2
    assert api.get("image?state=active").json["data"] == {}
    assert_error(api.get("image?colour=red"), 400, "general/validation")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "x", "format": "vmdk"}, "format"),
        ({"name": "x", "checksum": "AB" * 32}, "checksum"),
        ({"name": "x", "checksum": "ab"}, "checksum"),
        ({"name": ""}, "name"),
        ({}, "name"),
        ({"name": "x", "state": "active"}, "state"),
        ({"name": "x", "size": 1}, "size"),
        ({"name": "x", "min_ram": -1}, "min_ram"),
        ({"name": "x", "file": "/etc/shadow"}, "file"),
    ],
)
def test_bad_fields(api, body, field):
    error = assert_error(api.post("image", json=body), 400, "general/validation")
    assert field in error["data"]
    assert api.get("image").json["data"] == {}


def test_update_changes_name_description_and_min_ram_only(api):
    image = make(api, checksum=CHECKSUM)
    changed = api.update(f"image/{image['id']}", json={"name": "deb", "min_ram": 0})
    assert changed.status_code == 200
    assert changed.json["data"]["name"] == "deb" and changed.json["data"]["min_ram"] == 0
    patched = api.patch("image", json={"id": image["id"], "description": "now"})
    assert patched.json["data"]["description"] == "now"
    for field, value in (("format", "raw"), ("checksum", "cd" * 32), ("customer_id", 7)):
        error = assert_error(
            api.update(f"image/{image['id']}", json={field: value}), 400, "image/immutable_field"
        )
        assert field in error["data"]
    current = api.get(f"image/{image['id']}").json["data"]
    assert (current["format"], current["checksum"], current["customer_id"]) == (
        "qcow2",
        CHECKSUM,
        None,
    )


def test_delete(api):
    image = make(api)
    assert api.delete(f"image/{image['id']}").json["data"] == image
    assert_error(api.get(f"image/{image['id']}"), 404, "image/not_found")
    assert_error(api.delete(f"image/{image['id']}"), 404, "image/not_found")
    other = make(api)
    assert api.delete("image", json={"id": other["id"]}).status_code == 200


def test_customers_see_public_images_and_their_own(api, customer_api):
    public = make(api, name="public")
    for_seven = make(api, name="for-seven", customer_id=7)
    seven, eight = customer_api(7), customer_api(8)
    own = make(seven, name="own")
    assert own["customer_id"] == 7  # forced
    assert make(seven, name="explicit", customer_id=7)["customer_id"] == 7
    listed = seven.get("image").json["data"]
    assert sorted(listed) == sorted(str(i) for i in (public["id"], for_seven["id"], own["id"],
                                                     own["id"] + 1))  # fmt: skip
    assert list(eight.get("image").json["data"]) == [str(public["id"])]
    assert eight.get(f"image/{public['id']}").status_code == 200
    for ident in (for_seven["id"], own["id"]):
        assert_error(eight.get(f"image/{ident}"), 404, "image/not_found")
        assert_error(eight.update(f"image/{ident}", json={"name": "x"}), 404, "image/not_found")
        assert_error(eight.delete(f"image/{ident}"), 404, "image/not_found")
        assert_error(eight.get(f"image/{ident}/file"), 404, "image/not_found")


def test_customers_make_images_only_for_themselves(api, customer_api):
    seven = customer_api(7)
    error = assert_error(
        seven.post("image", json={"name": "x", "customer_id": 8}),
        403,
        "general/authorization/forbidden",
    )
    assert "own customer id" in error["message"]
    assert api.get("image").json["data"] == {}


def test_customers_may_not_change_public_images(api, customer_api):
    public = make(api)
    seven = customer_api(7)
    for response in (
        seven.update(f"image/{public['id']}", json={"name": "mine"}),
        seven.delete(f"image/{public['id']}"),
        seven.call("PUT", f"image/{public['id']}/file", data=b"x",
                   headers={"Content-Type": "application/octet-stream"}),
    ):  # fmt: skip
        assert_error(response, 403, "general/authorization/forbidden")
    assert api.get(f"image/{public['id']}").json["data"] == public


def test_customers_change_their_own(api, customer_api):
    seven = customer_api(7)
    own = make(seven)
    assert seven.update(f"image/{own['id']}", json={"name": "mine"}).status_code == 200
    assert seven.delete(f"image/{own['id']}").status_code == 200


def test_customers_read_the_events_of_their_own_images(api, customer_api):
    seven, eight = customer_api(7), customer_api(8)
    own = make(seven)
    seven.update(f"image/{own['id']}", json={"name": "renamed"})
    make(api)  # public: an admin's event
    events = seven.get("event?resource=image").json["data"].values()
    assert [(e["object_id"], e["action"]) for e in events] == [
        (own["id"], "create"),
        (own["id"], "update"),
    ]
    assert eight.get("event?resource=image").json["data"] == {}
    # a refused change of its own image is its own event too
    seven.update(f"image/{own['id']}", json={"format": "raw"})
    outcomes = [e["outcome"] for e in seven.get("event?resource=image").json["data"].values()]
    assert outcomes[-1] == "image/immutable_field"


def test_file_route_takes_get_and_put_only(api):
    image = make(api)
    response = api.delete(f"image/{image['id']}/file")
    error = assert_error(response, 405, "general/method_not_allowed")
    assert set(error["data"]["allowed"]) >= {"GET", "PUT"}
