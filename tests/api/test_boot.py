"""Boot from an image on libvirt's test driver: the checks, roles, root disk rules, the
scheduler's preference and the undo of every step the test driver can run.

The test driver has no volume upload, so it cannot copy an image to a node: a node
"holds" an image here because the test put its base volume there with the real driver
(``create_volume``) and recorded it, as a copy would. The copy itself, the overlay's
bytes and a guest that boots are tested on a real libvirtd (tests/hypervisor/test_boot.py).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from tests.conftest import GIB, MIB, vm_body
from tests.errors import assert_error
from tests.faults import FaultyDriver
from tests.image_files import OCTET, ImageFiles
from vmapi.extensions import db
from vmapi.models import ImageCopy
from vmapi.services.names import image_volume_name
from vmapi.services.nodes.hosts import DRIVER_KEY

pytestmark = pytest.mark.embedded

POOL = "vmapi"  # the seeded local-qcow2 type's


@pytest.fixture
def files(tmp_path):
    return ImageFiles(tmp_path / "files")


@pytest.fixture
def faults(app):
    real = app.extensions[DRIVER_KEY]
    app.extensions[DRIVER_KEY] = FaultyDriver(real)
    return app.extensions[DRIVER_KEY]


def make_image(api, files, size=2 * MIB, **fields):
    body = {"name": "tiny", "format": "raw", **fields}
    image = api.post("image", json=body)
    assert image.status_code == 201, image.json
    ident = image.json["data"]["id"]
    sent = api.call("PUT", f"image/{ident}/file", data=files.raw(size), headers=OCTET)
    assert sent.status_code == 200, sent.json
    return sent.json["data"]


@pytest.fixture
def image(api, files):
    """An active raw image of 2 MiB (virtual size 2 MiB)."""
    return make_image(api, files)


def hold(app, node, image):
    """Put the image's base volume on the node, as a copy would (see the module's text)."""
    driver = app.extensions[DRIVER_KEY]
    driver = getattr(driver, "real", driver)
    uri = node["libvirt_uri"]
    with app.app_context():
        name = image_volume_name(image["id"])
        driver.ensure_pool(uri, POOL, f"/{POOL}")
        path = driver.create_volume(uri, POOL, name, image["virtual_size"], "raw")
        db.session.add(ImageCopy(image_id=image["id"], node_id=node["id"], pool=POOL,
                                 volume_name=name, path=path))  # fmt: skip
        db.session.commit()
        db.session.remove()


def volumes(driver, node):
    driver = getattr(driver, "real", driver)
    try:
        return driver.volumes(node["libvirt_uri"], POOL)
    except Exception:  # no pool yet: nothing in it
        return []


def boot_body(method, image, **fields):
    return vm_body(method, image={"id": image["id"]}, **fields)


def test_a_vm_boots_from_an_image_its_node_holds(app, api, vm_host, test_method, image, driver,
                                                 installation):  # fmt: skip
    node = vm_host()
    hold(app, node, image)
    made = api.post("vm", json=boot_body(test_method, image, root_size=3 * MIB + 1))
    assert made.status_code == 201, made.json
    vm = made.json["data"]
    assert vm["image"] == {"id": image["id"]}
    assert "root_size" not in vm  # write-only: the root disk's /storage object has it
    [root] = api.get(f"storage?vm.id={vm['id']}").json["data"].values()
    assert root["boot"] is True and root["image"] == {"id": image["id"]}
    assert root["size"] == 4 * MIB  # rounded up to a whole MiB
    assert root["storage_type"] == {"id": 1}  # the seeded local-qcow2
    # the overlay is in the pool beside the copy, named like every volume
    assert volumes(driver, node) == sorted(
        [f"{installation}-image-{image['id']}", f"{installation}-storage-{root['id']}"]
    )
    domain = driver.connections.get(node["libvirt_uri"], 5).lookupByName(vm["domain_name"])
    disk = ET.fromstring(domain.XMLDesc(2)).find("devices/disk")  # the first disk
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}
    assert disk.find("driver").get("type") == "qcow2"
    assert disk.find("source").get("file").endswith(f"/{installation}-storage-{root['id']}")
    assert ET.fromstring(domain.XMLDesc(2)).find("os/boot").get("dev") == "hd"
    assert api.get(f"vm/{vm['id']}?nest=image").json["data"]["image"]["id"] == image["id"]
    assert api.get(f"storage/{root['id']}?nest=image").json["data"]["image"]["name"] == "tiny"


def test_root_size_defaults_to_the_virtual_size(app, api, vm_host, test_method, files):
    image = make_image(api, files, size=3 * MIB + 512)  # not a whole MiB
    node = vm_host()
    hold(app, node, image)
    vm = api.post("vm", json=boot_body(test_method, image)).json["data"]
    [root] = api.get(f"storage?vm.id={vm['id']}").json["data"].values()
    assert root["size"] == 4 * MIB


def state(api, driver, *nodes):
    """What a failed create could leave behind: rows, claims, volumes, domains."""
    real = getattr(driver, "real", driver)
    return {
        "vms": sorted(api.get("vm").json["data"]),
        "storage": sorted(api.get("storage").json["data"]),
        "allocated": [api.get(f"node/{n['id']}").json["data"]["allocated_ram"] for n in nodes],
        "volumes": [volumes(driver, n) for n in nodes],
        "domains": [sorted(d.name for d in real.domains(n["libvirt_uri"])) for n in nodes],
    }


def test_bad_images_and_sizes(api, customer_api, files, vm_host, test_method, image):
    vm_host()
    own = make_image(customer_api(8), files, min_ram=2 * 1024 * MIB)
    queued = api.post("image", json={"name": "empty"}).json["data"]
    error = assert_error(api.post("vm", json=boot_body(test_method, {"id": 999999})), 404,
                         "vm/image_not_found")  # fmt: skip
    assert error["data"] == {"image": {"id": 999999}}
    # another customer's image: as if it did not exist, also for an admin acting for one
    assert_error(customer_api(7).post("vm", json=boot_body(test_method, own)), 404,
                 "vm/image_not_found")  # fmt: skip
    assert_error(api.post("vm", json=boot_body(test_method, own, customer_id=7)), 404,
                 "vm/image_not_found")  # fmt: skip
    error = assert_error(api.post("vm", json=boot_body(test_method, queued)), 409,
                         "image/not_active")  # fmt: skip
    assert error["data"]["state"] == "queued"
    too_small = assert_error(
        api.post("vm", json=boot_body(test_method, image, root_size=MIB)), 400,
        "general/validation",
    )  # fmt: skip
    assert set(too_small["data"]) == {"root_size"}
    big = api.post("vm", json=boot_body(test_method, image, root_size=2**50))
    assert set(assert_error(big, 400, "general/validation")["data"]) == {"root_size"}
    low_ram = customer_api(8).post("vm", json=boot_body(test_method, own, ram=GIB))
    assert "min_ram" in assert_error(low_ram, 400, "general/validation")["data"]["ram"][0]
    lone = api.post("vm", json=vm_body(test_method, root_size=GIB))
    assert set(assert_error(lone, 400, "general/validation")["data"]) == {"root_size"}
    assert api.get("vm").json["data"] == {}


def test_customers_boot_public_images_and_their_own(app, api, customer_api, files, vm_host,
                                                    test_method, image):  # fmt: skip
    node = vm_host()
    own = make_image(customer_api(7), files)
    hold(app, node, image)
    hold(app, node, own)
    customer = customer_api(7)
    for source in (image, own):
        made = customer.post("vm", json=boot_body(test_method, source))
        assert made.status_code == 201, made.json
        [root] = customer.get(f"storage?vm.id={made.json['data']['id']}").json["data"].values()
        assert root["boot"] and root["image"] == {"id": source["id"]}
    assert len(customer_api(8).get("storage").json["data"]) == 0


def test_image_and_root_size_never_change(app, api, vm_host, test_method, image):
    node = vm_host()
    hold(app, node, image)
    vm = api.post("vm", json=boot_body(test_method, image)).json["data"]
    for change in ({"image": None}, {"image": {"id": image["id"]}}, {"root_size": 8 * MIB}):
        error = assert_error(api.update(f"vm/{vm['id']}", json=change), 400,
                             "vm/immutable_field")  # fmt: skip
        assert set(error["data"]) == set(change)


def test_a_root_disk_never_moves_nor_goes_alone(app, api, vm_host, test_method, image, driver,
                                                installation):  # fmt: skip
    node = vm_host()
    hold(app, node, image)
    vm = api.post("vm", json=boot_body(test_method, image)).json["data"]
    other = api.post("vm", json=vm_body(test_method)).json["data"]
    [root] = api.get(f"storage?vm.id={vm['id']}").json["data"].values()
    error = assert_error(api.update(f"storage/{root['id']}", json={"vm": {"id": other["id"]}}),
                         409, "storage/root_disk")  # fmt: skip
    assert error["data"] == {"storage": {"id": root["id"]}, "vm": {"id": vm["id"]}}
    assert_error(api.delete(f"storage/{root['id']}"), 409, "storage/root_disk")
    data = api.post("storage", json={"size": MIB, "vm": {"id": vm["id"]},
                                     "storage_type": {"id": 1}}).json["data"]  # fmt: skip
    # a data volume still needs ?cascade; the root disk is not one of them
    error = assert_error(api.delete(f"vm/{vm['id']}"), 409, "vm/has_storage")
    assert error["data"] == {"storage": [data["id"]]}
    assert api.delete(f"storage/{data['id']}").status_code == 200
    assert api.delete(f"vm/{vm['id']}").status_code == 200  # no cascade: the root disk goes
    assert api.get(f"storage/{root['id']}").status_code == 404
    assert volumes(driver, node) == [f"{installation}-image-{image['id']}"]  # the copy stays


def test_an_image_in_use_is_not_deleted_and_its_copies_go_with_it(app, api, vm_host,
                                                                 test_method, image, driver):  # fmt: skip
    node = vm_host()
    hold(app, node, image)
    ids = [api.post("vm", json=boot_body(test_method, image)).json["data"]["id"] for _ in "ab"]
    error = assert_error(api.delete(f"image/{image['id']}"), 409, "image/in_use")
    assert error["data"] == {"vm": ids}
    for ident in ids:
        assert api.delete(f"vm/{ident}").status_code == 200
    deleted = api.delete(f"image/{image['id']}")
    assert deleted.status_code == 200, deleted.json
    assert volumes(driver, node) == []
    with app.app_context():
        assert db.session.query(ImageCopy).count() == 0
        db.session.remove()


def test_the_root_disk_counts_in_the_storage_quota(app, api, customer_api, vm_host, test_method,
                                                   image, driver):  # fmt: skip
    node = vm_host()
    hold(app, node, image)
    assert api.post("quota", json={"customer_id": 7, "max_storage": 3 * MIB}).status_code == 201
    customer = customer_api(7)
    error = assert_error(customer.post("vm", json=boot_body(test_method, image, root_size=4 * MIB)),
                         403, "vm/quota_exceeded")  # fmt: skip
    assert error["data"]["quota"] == "max_storage" and error["data"]["requested"] == 4 * MIB
    before = state(api, driver, node)
    assert customer.post("vm", json=boot_body(test_method, image)).status_code == 201  # 2 MiB
    extra = customer.post("vm", json=boot_body(test_method, image))  # 2 + 2 > 3 MiB
    assert_error(extra, 403, "vm/quota_exceeded")
    assert len(api.get("vm").json["data"]) == 1 and before["vms"] == []


def test_nodes_that_hold_the_image_win_ties_only(app, api, vm_host, test_method, image):
    first, second = vm_host(), vm_host()  # equal: the weigher ties
    hold(app, second, image)
    assert api.post("vm", json=vm_body(test_method)).json["data"]["node"] == {"id": first["id"]}
    assert api.delete("vm", json={"id": 1}).status_code == 200
    booted = api.post("vm", json=boot_body(test_method, image)).json["data"]
    assert booted["node"] == {"id": second["id"]}  # the tie goes to the node with the copy
    # now the second has less free RAM: spread prefers the first, copy or not
    again = api.post("vm", json=boot_body(test_method, image))
    assert again.status_code == 502  # the first has no copy, and the test driver cannot copy
    assert again.json["data"]["node"] == {"id": first["id"]}


def test_without_a_copy_the_test_driver_cannot_boot_and_nothing_is_left(api, vm_host, test_method,
                                                                         image, driver):  # fmt: skip
    node = vm_host()
    before = state(api, driver, node)
    error = assert_error(api.post("vm", json=boot_body(test_method, image)), 502,
                         "vm/hypervisor_error")  # fmt: skip
    assert error["data"]["step"] == "copying the image to the node"
    assert state(api, driver, node) == before


@pytest.mark.parametrize(
    ("method", "step"),
    [
        ("create_overlay", "creating the root disk"),
        ("define", "defining the domain"),
        ("start", "starting the domain"),
        ("domain", "reading the domain's state"),
    ],
)
def test_each_later_step_s_failure_leaves_only_the_copy(app, api, vm_host, test_method, image,
                                                        faults, method, step):  # fmt: skip
    node = vm_host()
    hold(app, node, image)
    before = state(api, faults, node)
    faults.fail(method)
    error = assert_error(api.post("vm", json=boot_body(test_method, image)), 502,
                         "vm/hypervisor_error")  # fmt: skip
    assert error["data"]["step"] == step
    assert state(api, faults, node) == before  # the copy was there before: it stays


def test_reconcile_counts_copies_as_owned(app, api, vm_host, test_method, image, runner):
    node = vm_host()
    hold(app, node, image)
    api.post("vm", json=boot_body(test_method, image))
    result = runner.invoke(args=["vmapi", "reconcile"])
    assert "unowned_volume" not in result.output, result.output
    assert result.exit_code == 0, result.output
