"""/storage on libvirt's test driver: volumes in pools, disks in the persistent definition.

The test driver makes pools and volumes but cannot attach to a running domain, resize a
volume or set I/O limits live; those run on a real libvirtd (tests/hypervisor).
"""

import xml.etree.ElementTree as ET

import pytest
import sqlalchemy as sa

from tests.api.test_boot import hold, make_image
from tests.conftest import GIB, MIB, vm_body
from tests.errors import assert_error
from tests.faults import FaultyDriver
from tests.image_files import ImageFiles
from vmapi.extensions import db
from vmapi.hypervisor import HypervisorError, VolumeNotFound
from vmapi.models import StorageType
from vmapi.services.nodes.hosts import DRIVER_KEY

pytestmark = pytest.mark.embedded

INACTIVE = 2  # VIR_DOMAIN_XML_INACTIVE


@pytest.fixture
def vm(api, vm_host, test_method, installation):
    node = vm_host()
    made = api.post("vm", json=vm_body(test_method)).json["data"]
    return {**made, "uri": node["libvirt_uri"], "node_id": node["id"], "installation": installation}


def volume(vm, storage_id):
    """The libvirt name of a volume: it carries the installation's id."""
    return f"{vm['installation']}-storage-{storage_id}"


def disks(driver, vm):
    conn = driver.connections.get(vm["uri"], 5)
    root = ET.fromstring(conn.lookupByName(vm["domain_name"]).XMLDesc(INACTIVE))
    return {d.find("target").get("dev"): d for d in root.findall("devices/disk")}


def storage_body(for_vm, **fields):
    return {"size": GIB, "vm": {"id": for_vm["id"]}, "storage_type": {"id": 1}, **fields}


def test_create_makes_a_volume_and_a_disk(api, vm, driver):
    response = api.post(
        "storage",
        json=storage_body(
            vm, cache_option={"id": 1}, read_iops_limit=500, write_bps_limit=10 * MIB
        ),
    )
    assert response.status_code == 201, response.json
    storage = response.json["data"]
    assert storage == {"id": 1, "size": GIB, "vm": {"id": vm["id"]}, "storage_type": {"id": 1},
                       "cache_option": {"id": 1}, "write_iops_limit": None, "read_iops_limit": 500,
                       "write_bps_limit": 10 * MIB, "read_bps_limit": None, "image": None,
                       "boot": False}  # fmt: skip
    assert "storage pool vmapi at /" in response.json["message"]  # an admin's answer
    assert "next start" in response.json["message"]  # the test driver cannot attach live
    path, capacity = driver.volume(vm["uri"], "vmapi", volume(vm, 1))
    assert capacity == GIB
    disk = disks(driver, vm)["vdb"]
    assert disk.find("source").get("file") == path
    assert disk.find("driver").attrib == {"name": "qemu", "type": "qcow2", "cache": "none"}
    assert disk.find("target").get("bus") == "virtio"
    assert disk.find("iotune/read_iops_sec").text == "500"
    assert disk.find("iotune/write_bytes_sec").text == str(10 * MIB)


def test_targets_do_not_clash_and_raw_format(api, vm, driver):
    a = api.post("storage", json=storage_body(vm)).json["data"]
    b = api.post("storage", json=storage_body(vm, storage_type={"id": 2})).json["data"]
    assert set(disks(driver, vm)) == {"vdb", "vdc"}
    assert disks(driver, vm)["vdc"].find("driver").get("type") == "raw"
    api.delete(f"storage/{a['id']}")
    api.post("storage", json=storage_body(vm))
    assert set(disks(driver, vm)) == {"vdb", "vdc"}  # vdb is free again and reused
    assert b["id"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [({"size": GIB + 1}, "size"), ({"size": 0}, "size"), ({"size": 2**50}, "size"),
     ({"read_iops_limit": -1}, "read_iops_limit"), ({"storage_type": {"id": 99}}, "storage_type"),
     ({"cache_option": {"id": 99}}, "cache_option"), ({"vm": {"id": 99}}, "vm")],
)  # fmt: skip
def test_create_validation(api, vm, field, fields, driver):
    error = assert_error(
        api.post("storage", json=storage_body(vm, **fields)), 400, "general/validation"
    )
    assert field in error["data"]
    assert api.get("storage").json["data"] == {} and disks(driver, vm) == {}


def test_shrink_is_refused(api, vm):
    storage = api.post("storage", json=storage_body(vm)).json["data"]
    error = assert_error(
        api.update(f"storage/{storage['id']}", json={"size": GIB // 2}),
        400,
        "storage/shrink_forbidden",
    )
    assert error["data"] == {"size": GIB}


def test_grow_that_the_pool_cannot_do_changes_nothing(api, vm, driver):
    storage = api.post("storage", json=storage_body(vm)).json["data"]
    error = assert_error(
        api.update(f"storage/{storage['id']}", json={"size": 2 * GIB}), 502, "vm/hypervisor_error"
    )
    assert "not supported" in error["message"]  # the test driver cannot resize volumes
    assert api.get(f"storage/{storage['id']}").json["data"]["size"] == GIB


def test_limits_and_cache_are_persistent(api, vm, driver):
    storage = api.post("storage", json=storage_body(vm)).json["data"]
    response = api.update(
        f"storage/{storage['id']}", json={"write_iops_limit": 50, "cache_option": {"id": 3}}
    )
    assert response.status_code == 200, response.json
    assert "cache mode" in response.json["message"] and "next start" in response.json["message"]
    disk = disks(driver, vm)["vdb"]
    assert disk.find("iotune/write_iops_sec").text == "50"
    assert disk.find("driver").get("cache") == "writeback"
    api.update(f"storage/{storage['id']}", json={"write_iops_limit": None})
    assert disks(driver, vm)["vdb"].find("iotune") is None


def test_move_between_vms_of_one_node_and_not_across(api, vm, vm_host, test_method, driver):
    other = api.post("vm", json=vm_body(test_method, node={"id": vm["node_id"]})).json["data"]
    other = {**other, "uri": vm["uri"]}
    storage = api.post("storage", json=storage_body(vm)).json["data"]
    moved = api.update(f"storage/{storage['id']}", json={"vm": {"id": other["id"]}})
    assert moved.status_code == 200, moved.json
    assert disks(driver, vm) == {} and set(disks(driver, other)) == {"vdb"}
    elsewhere = vm_host()
    far = api.post("vm", json=vm_body(test_method, node={"id": elsewhere["id"]})).json["data"]
    assert_error(
        api.update(f"storage/{storage['id']}", json={"vm": {"id": far["id"]}}),
        409,
        "storage/node_mismatch",
    )
    assert set(disks(driver, other)) == {"vdb"}


def test_delete_removes_disk_volume_and_row(api, vm, driver):
    storage = api.post("storage", json=storage_body(vm)).json["data"]
    response = api.delete(f"storage/{storage['id']}")
    assert response.status_code == 200 and response.json["data"] == storage
    assert disks(driver, vm) == {}
    with pytest.raises(VolumeNotFound):
        driver.volume(vm["uri"], "vmapi", volume(vm, 1))
    assert_error(api.get(f"storage/{storage['id']}"), 404, "storage/not_found")


def test_vm_with_storage_needs_cascade(api, vm, driver):
    a = api.post("storage", json=storage_body(vm)).json["data"]
    b = api.post("storage", json=storage_body(vm)).json["data"]
    error = assert_error(api.delete(f"vm/{vm['id']}"), 409, "vm/has_storage")
    assert error["data"] == {"storage": [a["id"], b["id"]]}
    assert_error(api.delete(f"vm/{vm['id']}?cascade=disks"), 400, "general/validation")
    assert api.delete(f"vm/{vm['id']}?cascade=storage").status_code == 200
    assert api.get("storage").json["data"] == {}
    for ident in (a["id"], b["id"]):
        with pytest.raises(VolumeNotFound):
            driver.volume(vm["uri"], "vmapi", volume(vm, ident))


def test_customers_only_for_their_own_vms(api, customer_api, vm_host, test_method):
    vm_host()
    seven, eight = customer_api(7), customer_api(8)
    mine = seven.post("vm", json=vm_body(test_method)).json["data"]
    theirs = eight.post("vm", json=vm_body(test_method)).json["data"]
    assert seven.post("storage", json=storage_body(mine)).status_code == 201
    error = assert_error(
        seven.post("storage", json=storage_body(theirs)), 400, "general/validation"
    )
    assert error["data"] == {"vm": [f"No vm with id {theirs['id']}."]}  # as if it did not exist
    their_storage = eight.post("storage", json=storage_body(theirs)).json["data"]
    assert_error(seven.get(f"storage/{their_storage['id']}"), 404, "storage/not_found")
    assert_error(seven.delete(f"storage/{their_storage['id']}"), 404, "storage/not_found")
    assert len(seven.get("storage").json["data"]) == 1
    assert_error(
        seven.update(f"storage/{their_storage['id']}", json={"size": 2 * GIB}),
        404,
        "storage/not_found",
    )


# ---------------------------------------------------------------------- failures


@pytest.fixture
def faults(app):
    app.extensions[DRIVER_KEY] = FaultyDriver(app.extensions[DRIVER_KEY])
    return app.extensions[DRIVER_KEY]


@pytest.mark.parametrize(
    ("method", "status"), [("ensure_pool", 502), ("create_volume", 502), ("define", 502)]
)
def test_create_failure_leaves_no_volume_disk_or_row(api, vm, faults, method, status):
    faults.fail(method, "error" if status == 502 else "timeout")
    assert api.post("storage", json=storage_body(vm)).status_code == status
    assert api.get("storage").json["data"] == {}
    assert disks(faults.real, vm) == {}
    with pytest.raises(HypervisorError, match="not found"):  # no volume (or not even a pool)
        faults.real.volume(vm["uri"], "vmapi", volume(vm, 1))


def test_failed_volume_delete_keeps_row_and_disk(api, vm, faults):
    storage = api.post("storage", json=storage_body(vm)).json["data"]
    faults.fail("delete_volume", "timeout")
    assert_error(api.delete(f"storage/{storage['id']}"), 504, "vm/hypervisor_timeout")
    assert api.get(f"storage/{storage['id']}").status_code == 200
    assert set(disks(faults.real, vm)) == {"vdb"}
    assert faults.real.volume(vm["uri"], "vmapi", volume(vm, 1))[1] == GIB


def test_failed_attach_deletes_the_fresh_volume(api, vm, faults):
    faults.fail("attach_disk_live")  # the running domain refuses for a reason of its own
    error = assert_error(api.post("storage", json=storage_body(vm)), 502, "vm/hypervisor_error")
    assert error["data"]["step"] == "attaching the disk"
    assert api.get("storage").json["data"] == {}
    assert disks(faults.real, vm) == {}
    with pytest.raises(VolumeNotFound):
        faults.real.volume(vm["uri"], "vmapi", volume(vm, 1))


def test_failed_detach_leaves_everything_as_it_was(api, vm, faults):
    storage = api.post("storage", json=storage_body(vm)).json["data"]
    faults.fail("detach_disk_live", "timeout")
    error = assert_error(api.delete(f"storage/{storage['id']}"), 504, "vm/hypervisor_timeout")
    assert error["data"]["step"] == "detaching the disk"
    assert api.get(f"storage/{storage['id']}").status_code == 200
    assert set(disks(faults.real, vm)) == {"vdb"}
    assert faults.real.volume(vm["uri"], "vmapi", volume(vm, 1))[1] == GIB


# ---------------------------------------------------------------------- where volumes are


def test_a_storage_type_in_use_keeps_its_pool_and_format(api, vm):
    a = api.post("storage", json=storage_body(vm)).json["data"]
    b = api.post("storage", json=storage_body(vm)).json["data"]
    for change in ({"pool": "0"}, {"format": "raw"}, {"pool": "elsewhere", "format": "raw"}):
        error = assert_error(api.update("storage_type/1", json=change), 409, "storage_type/in_use")
        assert error["data"] == {"storage": [a["id"], b["id"]], "fields": [*change]}
        assert f"storage {a['id']}, {b['id']}" in error["message"]
    assert api.get("storage_type/1").json["data"]["pool"] == "vmapi"
    # what volumes do not depend on may change, and the same value is no change
    same = api.update("storage_type/1", json={"pool": "vmapi", "description": "local qcow2"})
    assert same.status_code == 200, same.json
    for storage in (a, b):
        assert api.delete(f"storage/{storage['id']}").status_code == 200
    moved = api.update("storage_type/1", json={"pool": "0"})  # no volume uses it now
    assert moved.status_code == 200 and moved.json["data"]["pool"] == "0"


def test_a_volume_is_found_where_its_row_says(app, api, vm, driver):
    """A storage type whose pool changed anyway (a database from before the rule) does not
    strand the volumes made before: their rows keep their pool."""
    storage = api.post("storage", json=storage_body(vm)).json["data"]
    with app.app_context():
        db.session.execute(sa.update(StorageType).where(StorageType.id == 1).values(pool="0"))
        db.session.commit()
    grown = api.update(f"storage/{storage['id']}", json={"read_iops_limit": 7})
    assert grown.status_code == 200, grown.json
    assert api.delete(f"vm/{vm['id']}?cascade=storage").status_code == 200
    with pytest.raises(VolumeNotFound):
        driver.volume(vm["uri"], "vmapi", volume(vm, storage["id"]))
    assert api.get("storage").json["data"] == {} and api.get("vm").json["data"] == {}


def test_cascade_delete_stopped_part_way_leaves_vm_domain_and_the_rest(api, vm, faults):
    ids = [api.post("storage", json=storage_body(vm)).json["data"]["id"] for _ in range(3)]
    faults.fail("delete_volume", skip=1)  # the second volume cannot be deleted
    error = assert_error(api.delete(f"vm/{vm['id']}?cascade=storage"), 502, "vm/hypervisor_error")
    assert error["data"]["deleted_storage"] == ids[:1]
    assert error["data"]["storage"] == ids[1:]
    assert "Retry the delete" in error["message"]
    # the VM, its domain (defined without the deleted volume) and the rest belong together
    assert api.get(f"vm/{vm['id']}").status_code == 200
    assert sorted(int(i) for i in api.get("storage").json["data"]) == ids[1:]
    assert set(disks(faults.real, vm)) == {"vdc", "vdd"}
    with pytest.raises(VolumeNotFound):
        faults.real.volume(vm["uri"], "vmapi", volume(vm, ids[0]))
    for ident in ids[1:]:
        assert faults.real.volume(vm["uri"], "vmapi", volume(vm, ident))[1] == GIB
    assert api.delete(f"vm/{vm['id']}?cascade=storage").status_code == 200  # a retry finishes
    assert api.get("vm").json["data"] == {} and api.get("storage").json["data"] == {}
    assert faults.real.domains(vm["uri"]) == []


# ---------------------------------------------------------------------- from an image
# A node "holds" an image as in tests/api/test_boot.py (the test driver cannot copy one).
# Nor can the test driver clone a volume (the driver's clone runs on a connection of its
# own, and to a test:// node every connection is a new host): here the clone is made to
# fail, and what a volume made from an image holds, a larger one and the later steps'
# failures are tests/hypervisor/test_rebuild.py's.
CLONE = "copying the image into the volume"


@pytest.fixture
def image(app, api, tmp_path, vm):
    """An active raw image of 2 MiB, held on the VM's node."""
    made = make_image(api, ImageFiles(tmp_path / "files"))
    hold(app, {"id": vm["node_id"], "libvirt_uri": vm["uri"]}, made)
    return made


def from_image(for_vm, source, **fields):
    body = {"vm": {"id": for_vm["id"]}, "storage_type": {"id": 1}, "image": {"id": source["id"]}}
    return {**body, **fields}


def test_a_volume_from_an_image_is_undone_when_its_clone_fails(api, vm, image, faults):
    before = faults.real.volumes(vm["uri"], "vmapi")
    faults.fail("clone_volume")
    error = assert_error(api.post("storage", json=from_image(vm, image)), 502,
                         "vm/hypervisor_error")  # fmt: skip
    assert error["data"]["step"] == CLONE
    # from the image's copy into the new volume, in the storage type's pool
    [args] = [args for method, args in faults.called if method == "clone_volume"]
    assert args[:4] == ("vmapi", volume(vm, 1), "vmapi", f"{vm['installation']}-image-1")
    assert api.get("storage").json["data"] == {} and disks(faults.real, vm) == {}
    assert faults.real.volumes(vm["uri"], "vmapi") == before  # the image's copy stays


@pytest.mark.parametrize(
    ("fields", "field"),
    [({"size": MIB}, "size"), ({"storage_type": {"id": 2}}, "storage_type"),
     ({"image": {"id": 99}}, "image"), ({"image": None}, "size")],
)  # fmt: skip
def test_bad_volumes_from_images(api, vm, image, driver, fields, field):
    error = assert_error(api.post("storage", json=from_image(vm, image, **fields)), 400,
                         "general/validation")  # fmt: skip
    assert set(error["data"]) == {field}, error
    assert api.get("storage").json["data"] == {} and disks(driver, vm) == {}


def test_an_image_the_vm_s_owner_may_not_use_is_none(app, api, customer_api, vm_host, test_method,
                                                     tmp_path, faults):  # fmt: skip
    node = vm_host()
    files = ImageFiles(tmp_path / "files")
    queued = api.post("image", json={"name": "empty"}).json["data"]
    others = make_image(customer_api(8), files)
    own, public = make_image(customer_api(7), files), make_image(api, files)
    hold(app, node, own)
    hold(app, node, public)
    customer = customer_api(7)
    mine = customer.post("vm", json=vm_body(test_method)).json["data"]
    refused = customer.post("storage", json=from_image(mine, others))
    assert set(assert_error(refused, 400, "general/validation")["data"]) == {"image"}
    admin = api.post("storage", json=from_image(mine, others))  # the VM's owner's, not the token's
    assert set(assert_error(admin, 400, "general/validation")["data"]) == {"image"}
    error = assert_error(customer.post("storage", json=from_image(mine, queued)), 409,
                         "image/not_active")  # fmt: skip
    assert error["data"]["state"] == "queued"
    for usable in (own, public):  # accepted: the request goes as far as the clone
        faults.fail("clone_volume")
        error = assert_error(customer.post("storage", json=from_image(mine, usable)), 502,
                             "vm/hypervisor_error")  # fmt: skip
        assert error["data"]["step"] == CLONE


def test_the_image_of_a_volume_never_changes(api, vm, image):
    storage = api.post("storage", json=storage_body(vm)).json["data"]
    error = assert_error(api.update(f"storage/{storage['id']}", json={"image": {"id": image["id"]}}),
                         400, "general/validation")  # fmt: skip
    assert set(error["data"]) == {"image"}
    assert api.update(f"storage/{storage['id']}", json={"image": None}).status_code == 200


def test_without_the_image_on_the_node_the_test_driver_cannot_copy_it(api, vm, tmp_path, driver):
    image = make_image(api, ImageFiles(tmp_path / "files"))  # not held on the node
    error = assert_error(api.post("storage", json=from_image(vm, image)), 502,
                         "vm/hypervisor_error")  # fmt: skip
    assert error["data"]["step"] == "copying the image to the node"
    assert api.get("storage").json["data"] == {} and disks(driver, vm) == {}
