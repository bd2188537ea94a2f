"""A VM whose cloud-init seed is recorded on its row, on libvirt's test driver: the seed disk
in the domain (read-only ``vdz``, never handed to /storage), DELETE and reconcile, and the
rebuild's undo when the host refuses the upload.

The test driver makes volumes but has no upload stream, which is how vmapi makes a seed
(and its refusal is a real one, of the real driver: the failure path below). So the seed
is put in place the way the create path leaves it, a volume in the seed pool named on
the row; the uploads themselves run on a real libvirtd (tests/hypervisor/test_seed_api.py).
"""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET

import pytest
import sqlalchemy as sa

from tests.api.test_boot import hold, make_image
from tests.conftest import GIB, vm_body
from tests.errors import assert_error
from tests.faults import FaultyDriver
from tests.image_files import ImageFiles
from vmapi.extensions import db
from vmapi.hypervisor import VolumeNotFound
from vmapi.models import Vm
from vmapi.services.nodes.hosts import DRIVER_KEY

pytestmark = pytest.mark.embedded

INACTIVE = 2  # VIR_DOMAIN_XML_INACTIVE
POOL = "vmapi"  # the pool of the seeded local-qcow2 type


def _wire(*fields: bytes) -> bytes:
    return b"".join(len(f).to_bytes(4, "big") + f for f in fields)


#: an Ed25519 public key (32 bytes of key material, as ssh-keygen writes one)
ED25519_KEY = "ssh-ed25519 " + base64.b64encode(_wire(b"ssh-ed25519", bytes(range(32)))).decode()


@pytest.fixture
def seeded(app, api, vm_host, test_method, driver):
    """A running VM with a seed volume recorded on its row."""
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method, hostname="first")).json["data"]
    uri = node["libvirt_uri"]
    driver.ensure_pool(uri, POOL, "/var/lib/libvirt/images/vmapi/vmapi")
    name = f"{vm['domain_name']}-seed-0123456789abcdef"
    path = driver.create_volume(uri, POOL, name, 65536, "raw")
    with app.app_context():
        db.session.execute(
            sa.update(Vm)
            .where(Vm.id == vm["id"])
            .values(seed_pool=POOL, seed_volume=name, seed_path=path)
        )
        db.session.commit()
    # the domain is defined from the row: now with the seed
    assert api.update(f"vm/{vm['id']}", json={"cores": 1}).status_code == 200
    return {**vm, "uri": uri, "seed": name, "seed_path": path, "node_id": node["id"]}


def disks(driver, vm):
    conn = driver.connections.get(vm["uri"], 5)
    root = ET.fromstring(conn.lookupByName(vm["domain_name"]).XMLDesc(INACTIVE))
    return {d.find("target").get("dev"): d for d in root.findall("devices/disk")}


def row(app, vm_id):
    with app.app_context():
        found = db.session.get(Vm, vm_id)
        db.session.expunge_all()
        return found


def test_the_domain_has_the_seed_read_only_on_vdz(api, seeded, driver):
    resized = api.update(f"vm/{seeded['id']}", json={"cores": 3})  # a redefinition
    assert resized.status_code == 200, resized.json
    seed = disks(driver, seeded)["vdz"]
    assert seed.find("source").get("file") == seeded["seed_path"]
    assert seed.find("readonly") is not None
    assert seed.find("driver").get("type") == "raw"
    assert seed.find("target").get("bus") == "virtio"
    # data volumes take vdb onwards and leave the seed alone
    body = {"size": GIB, "vm": {"id": seeded["id"]}, "storage_type": {"id": 1}}
    assert api.post("storage", json=body).status_code == 201
    assert sorted(disks(driver, seeded)) == ["vdb", "vdz"]


def test_storage_never_hands_out_the_seeds_target(api, seeded, driver):
    body = {"size": GIB, "vm": {"id": seeded["id"]}, "storage_type": {"id": 1}}
    made = api.post("storage", json=[body] * 24)  # vdb .. vdy
    assert made.status_code == 201, made.json
    targets = disks(driver, seeded)
    assert len(targets) == 25 and targets["vdz"].find("source").get("file") == seeded["seed_path"]
    assert_error(api.post("storage", json=body), 409, "storage/no_free_target")


def test_an_update_that_leaves_the_seed_as_it_is_uploads_nothing(app, api, seeded, driver):
    faults = FaultyDriver(driver)
    app.extensions[DRIVER_KEY] = faults
    assert (
        api.update(f"vm/{seeded['id']}", json={"cores": 3, "hostname": "first"}).status_code == 200
    )
    assert "upload_volume" not in faults.calls
    assert row(app, seeded["id"]).seed_volume == seeded["seed"]


@pytest.mark.parametrize("change", ["hostname", "ssh_keys", "user_data"])
def test_a_seed_the_host_cannot_upload_changes_nothing(app, api, seeded, driver, change):
    values = {"hostname": "second", "ssh_keys": [], "user_data": "#cloud-config\n"}
    if change == "ssh_keys":  # a real change: the VM has none yet
        values["ssh_keys"] = [ED25519_KEY]
    before = row(app, seeded["id"])
    error = assert_error(
        api.update(f"vm/{seeded['id']}", json={"cores": 3, change: values[change]}),
        502,
        "vm/hypervisor_error",
    )
    # the test driver cannot take the upload: a real refusal, at the seed's step
    assert error["data"]["step"] == "uploading the cloud-init seed"
    after = row(app, seeded["id"])
    for key in ("cores", "hostname", "ssh_keys", "user_data", "seed_volume", "seed_path"):
        assert getattr(after, key) == getattr(before, key), key
    assert disks(driver, seeded)["vdz"].find("source").get("file") == seeded["seed_path"]
    assert driver.volumes(seeded["uri"], POOL) == [seeded["seed"]]


def test_moving_addresses_the_host_cannot_seed_changes_nothing(app, api, seeded, driver):
    iface = api.get(f"interface/{seeded['interfaces'][0]['id']}").json["data"]
    free = next(
        a for a in api.get("ipv4?limit=1000").json["data"].values() if a["interface"] is None
    )
    error = assert_error(
        api.update(f"interface/{iface['id']}", json={"ipv4": [{"id": free["id"]}]}),
        502,
        "vm/hypervisor_error",
    )
    assert error["data"]["step"] == "uploading the cloud-init seed"
    assert api.get(f"interface/{iface['id']}").json["data"]["ipv4"] == iface["ipv4"]
    assert api.get(f"ipv4/{free['id']}").json["data"]["interface"] is None
    assert row(app, seeded["id"]).seed_volume == seeded["seed"]


def test_delete_removes_the_seed(api, seeded, driver):
    assert api.delete(f"vm/{seeded['id']}").status_code == 200
    assert driver.volumes(seeded["uri"], POOL) == []
    with pytest.raises(VolumeNotFound):
        driver.volume(seeded["uri"], POOL, seeded["seed"])


def test_a_delete_whose_seed_cannot_go_keeps_the_vm_and_a_retry_finishes(app, api, seeded, driver):
    faults = FaultyDriver(driver)
    app.extensions[DRIVER_KEY] = faults
    faults.fail("delete_volume")
    error = assert_error(api.delete(f"vm/{seeded['id']}"), 502, "vm/hypervisor_error")
    assert error["data"]["step"] == "deleting the cloud-init seed"
    assert api.get(f"vm/{seeded['id']}").status_code == 200  # the row stays, naming the seed
    assert driver.volumes(seeded["uri"], POOL) == [seeded["seed"]]
    retried = api.delete(f"vm/{seeded['id']}")
    assert retried.status_code == 200, retried.json
    assert driver.volumes(seeded["uri"], POOL) == []


def reconcile(runner, fix=False):
    result = runner.invoke(args=["vmapi", "reconcile", *(["--fix"] if fix else [])])
    return result.exit_code, result.output


def test_reconcile_counts_the_seed_as_owned(runner, seeded, driver):
    assert reconcile(runner) == (0, "0 finding(s), 0 fixed, 0 left\n")
    # a seed this database no longer names (one a request could not delete) is reported
    driver.create_volume(seeded["uri"], POOL, f"{seeded['domain_name']}-seed-00", 65536, "raw")
    code, output = reconcile(runner, fix=True)
    assert code == 1 and output.count("unowned_volume") == 1, output
    assert f"{POOL}/{seeded['domain_name']}-seed-00" in output
    assert len(driver.volumes(seeded["uri"], POOL)) == 2  # reported, never deleted


def test_reconcile_cleans_a_stale_building_vm_with_its_seed(app, runner, seeded, driver):
    # what a request that died after the seed's upload leaves: a building row naming it
    with app.app_context():
        db.session.execute(sa.update(Vm).where(Vm.id == seeded["id"]).values(vm_state_id=1))
        db.session.commit()
    app.config["BUILD_TIMEOUT"] = 0  # every building row is stale
    code, output = reconcile(runner, fix=True)
    assert code == 0 and "stale_building" in output, output
    assert driver.volumes(seeded["uri"], POOL) == []
    assert driver.domains(seeded["uri"]) == []


def test_a_test_driver_vm_from_an_image_gets_no_seed(app, api, vm_host, test_method, driver,
                                                     tmp_path):  # fmt: skip
    """A seed is for a guest that reads disks: libvirt's test driver runs none (nor do
    containers), so its VMs get none, image or not (services/vms/cloud_init.py NO_GUEST_DISKS)."""
    image = make_image(api, ImageFiles(tmp_path / "files"))
    node = vm_host()
    hold(app, node, image)
    made = api.post("vm", json=vm_body(test_method, image={"id": image["id"]}, hostname="h1"))
    assert made.status_code == 201, made.json
    vm = {**made.json["data"], "uri": node["libvirt_uri"]}
    assert row(app, vm["id"]).seed_volume is None
    assert sorted(disks(driver, vm)) == ["vda"]  # the root disk, no seed
    # nor does a change of what it would carry make one
    assert api.update(f"vm/{vm['id']}", json={"hostname": "h2"}).status_code == 200
    assert row(app, vm["id"]).seed_volume is None and sorted(disks(driver, vm)) == ["vda"]
