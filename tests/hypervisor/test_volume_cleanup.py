"""Volumes on a real libvirtd (issue 12): found where their rows say, a storage type in use
keeps its pool, a cascade delete that fails part-way leaves things that belong together,
names taken on the host are 409, and reconcile sees volumes nobody owns.

Disk-less domains (firmware, no OS) and a dir pool of this module's own; failures are
injected by wrapping the real driver (tests/faults.py).
"""

import pathlib
import xml.etree.ElementTree as ET

import libvirt
import pytest
import sqlalchemy as sa

from tests.conftest import MIB
from tests.faults import FaultyDriver
from tests.hypervisor import boot_env
from tests.hypervisor.qemu_host import INSTALLATION, create
from vmapi.extensions import db
from vmapi.hypervisor import DomainSpec
from vmapi.models import StorageType
from vmapi.services.nodes.hosts import DRIVER_KEY

pytestmark = [pytest.mark.hypervisor]

POOL = "vmapi-names-test"
INACTIVE = libvirt.VIR_DOMAIN_XML_INACTIVE


def remove_pool(conn):
    boot_env.remove_pool(conn, POOL)


@pytest.fixture
def storage_type(api, conn):
    remove_pool(conn)
    body = {"name": "names-qcow2", "description": "names test", "pool": POOL, "format": "qcow2"}
    response = api.post("storage_type", json=body)
    assert response.status_code == 201, response.json
    yield response.json["data"]["id"]
    remove_pool(conn)


def add_storage(api, vm, storage_type):
    body = {"size": 64 * MIB, "vm": {"id": vm["id"]}, "storage_type": {"id": storage_type}}
    response = api.post("storage", json=body)
    assert response.status_code == 201, response.json
    return response.json["data"]["id"]


def volume_names(conn):
    pool = conn.storagePoolLookupByName(POOL)
    pool.refresh(0)
    return sorted(vol.name() for vol in pool.listAllVolumes())


def name(storage_id):
    return f"{INSTALLATION}-storage-{storage_id}"


def disk_sources(dom):
    root = ET.fromstring(dom.XMLDesc(INACTIVE))
    return sorted(d.find("source").get("file") for d in root.findall("devices/disk"))


def test_volumes_are_found_where_their_rows_say(app, api, qemu_node, conn, storage_type):
    vm = create(api, qemu_node, cores=1, ram=256 * MIB)
    ids = [add_storage(api, vm, storage_type) for _ in range(2)]
    assert volume_names(conn) == sorted(name(i) for i in ids)
    # the pool and format of a type in use cannot change: 409 naming the storage
    response = api.update(f"storage_type/{storage_type}", json={"pool": "0"})
    assert response.status_code == 409 and response.json["error_id"] == "storage_type/in_use"
    assert response.json["data"]["storage"] == ids
    # a type changed anyway (a database from before the rule): the rows still know
    with app.app_context():
        db.session.execute(
            sa.update(StorageType).where(StorageType.id == storage_type).values(pool="0")
        )
        db.session.commit()
    response = api.delete(f"vm/{vm['id']}?cascade=storage")
    assert response.status_code == 200, response.json
    assert volume_names(conn) == []
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName(vm["domain_name"])
    assert api.get("storage").json["data"] == {}


def test_cascade_delete_failing_part_way_keeps_what_belongs_together(
    app, api, qemu_node, conn, storage_type
):
    vm = create(api, qemu_node, cores=1, ram=256 * MIB)
    ids = [add_storage(api, vm, storage_type) for _ in range(3)]
    dom = conn.lookupByName(vm["domain_name"])
    paths = disk_sources(dom)
    faults = app.extensions[DRIVER_KEY] = FaultyDriver(app.extensions[DRIVER_KEY])
    faults.fail("delete_volume", skip=1)  # the second volume will not go
    response = api.delete(f"vm/{vm['id']}?cascade=storage")
    assert response.status_code == 502 and response.json["error_id"] == "vm/hypervisor_error"
    data = response.json["data"]
    assert (data["deleted_storage"], data["storage"]) == (ids[:1], ids[1:])
    # the VM row, its domain and the storage left agree: the domain (powered off) is
    # defined with exactly the volumes that still exist and still have rows
    assert api.get(f"vm/{vm['id']}").json["data"]["vm_state"] == {"id": 4}  # shutoff
    assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    assert sorted(int(i) for i in api.get("storage").json["data"]) == ids[1:]
    assert volume_names(conn) == sorted(name(i) for i in ids[1:])
    assert disk_sources(dom) == paths[1:]
    assert api.update(f"vm/{vm['id']}", json={"vm_state": {"id": 2}}).status_code == 200
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING  # it still starts
    # a retry finishes
    response = api.delete(f"vm/{vm['id']}?cascade=storage")
    assert response.status_code == 200, response.json
    assert volume_names(conn) == []
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName(vm["domain_name"])
    node = api.get(f"node/{qemu_node['node']['id']}").json["data"]
    assert node["allocated_cores"] == 0


def test_names_taken_on_the_host_are_409(api, qemu_node, conn, storage_type, runner, driver):
    vm = create(api, qemu_node, cores=1, ram=256 * MIB)
    # the next VM's and the next volume's names, taken by things that are not ours
    first = add_storage(api, vm, storage_type)
    taken = name(first + 1)
    driver.create_volume("qemu:///system", POOL, taken, MIB, "raw")  # a stranger's
    response = api.post("storage", json={"size": 64 * MIB, "vm": {"id": vm["id"]},
                                         "storage_type": {"id": storage_type}})  # fmt: skip
    assert response.status_code == 409 and response.json["error_id"] == "storage/name_taken"
    assert "flask vmapi reconcile" in response.json["message"]
    assert taken in volume_names(conn)  # left alone
    next_vm = f"{INSTALLATION}-vm-{vm['id'] + 1}"
    spec = DomainSpec(name=next_vm, uuid="0a1b2c3d-0000-4000-8000-0000000000aa",
                      domain_type="qemu", vcpus=1, max_vcpus=1, memory=256 * MIB,
                      max_memory=256 * MIB, vm_id=1, installation="someone-else")  # fmt: skip
    driver.define("qemu:///system", spec)
    try:
        response = api.post("vm", json={"cores": 1, "ram": 256 * MIB,
                                        "virt_method": {"id": qemu_node["method"]}})  # fmt: skip
        assert response.status_code == 409 and response.json["error_id"] == "vm/name_taken"
        assert conn.lookupByName(next_vm).UUIDString() == "0a1b2c3d-0000-4000-8000-0000000000aa"
        # reconcile shows both, and touches neither
        result = runner.invoke(args=["vmapi", "reconcile", "--fix"])
        assert result.exit_code == 1
        assert f"foreign_domain  {next_vm}" in result.output
        assert f"unowned_volume  {POOL}/{taken}" in result.output
        assert taken in volume_names(conn)
    finally:
        conn.lookupByName(next_vm).undefine()


def test_reconcile_reports_a_file_left_in_a_pool(api, qemu_node, conn, storage_type, runner):
    vm = create(api, qemu_node, cores=1, ram=256 * MIB)
    add_storage(api, vm, storage_type)
    directory = ET.fromstring(conn.storagePoolLookupByName(POOL).XMLDesc(0)).find("target/path")
    stray = pathlib.Path(directory.text) / "left-behind.qcow2"
    stray.write_bytes(b"")  # made outside libvirt: the pool learns of it on refresh
    result = runner.invoke(args=["vmapi", "reconcile"])
    assert result.exit_code == 1
    assert f"unowned_volume  {POOL}/left-behind.qcow2" in result.output
    assert result.output.count("unowned_volume") == 1  # the volume a row owns is no finding
    stray.unlink()
    assert runner.invoke(args=["vmapi", "reconcile"]).exit_code == 0
