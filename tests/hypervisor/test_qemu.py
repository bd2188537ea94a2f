"""The hypervisor tier: a real libvirtd with QEMU (KVM when it works), checked with libvirt.

``make test`` starts libvirtd when it is down (scripts/ensure-libvirtd.sh). Domains made
here carry a test installation id; leftovers of an interrupted run are removed first.
"""

import subprocess
import xml.etree.ElementTree as ET

import libvirt
import pytest

from tests.conftest import GIB, MIB
from tests.hypervisor.qemu_host import INSTALLATION, create
from vmapi.services.names import device_tag

pytestmark = [pytest.mark.hypervisor]


def test_node_capacity_comes_from_libvirt(qemu_node, conn):
    _model, memory_mib, cpus, *_ = conn.getInfo()
    assert qemu_node["node"]["cores"] == cpus
    assert qemu_node["node"]["ram"] == memory_mib * MIB


def test_seed_example_runs_with_2_vcpus_and_1_gib(api, qemu_node, conn):
    vm = create(api, qemu_node)
    dom = conn.lookupByName(vm["domain_name"])
    state, max_mem, memory, vcpus, _ = dom.info()
    assert state == libvirt.VIR_DOMAIN_RUNNING
    assert vcpus == 2
    assert max_mem == memory == GIB // 1024
    assert dom.UUIDString() == vm["uuid"]
    assert dom.OSType() == "hvm"
    xml = dom.XMLDesc(0)
    assert f"type='{'kvm' if qemu_node['kind'] == 'KVM' else 'qemu'}'" in xml
    assert f"<vmapi:installation>{INSTALLATION}</vmapi:installation>" in xml


def test_cputime_limit_is_the_vcpu_quota(api, qemu_node, conn):
    vm = create(api, qemu_node, cputime_limit=50000)
    params = conn.lookupByName(vm["domain_name"]).schedulerParameters()
    assert (params["vcpu_period"], params["vcpu_quota"]) == (100000, 50000)
    response = api.update(f"vm/{vm['id']}", json={"cputime_limit": 25000})
    assert "message" not in response.json  # QEMU changes it live
    params = conn.lookupByName(vm["domain_name"]).schedulerParameters()
    assert params["vcpu_quota"] == 25000
    api.update(f"vm/{vm['id']}", json={"cputime_limit": None})
    params = conn.lookupByName(vm["domain_name"]).schedulerParameters()
    assert params["vcpu_quota"] in (-1, 17592186044415)  # unlimited, as this QEMU spells it
    assert "<cputune>" not in conn.lookupByName(vm["domain_name"]).XMLDesc(
        libvirt.VIR_DOMAIN_XML_INACTIVE
    )


def test_lifecycle_transitions(api, qemu_node, conn):
    vm = create(api, qemu_node)
    dom = conn.lookupByName(vm["domain_name"])

    def update(state_id, query=""):
        response = api.update(f"vm/{vm['id']}{query}", json={"vm_state": {"id": state_id}})
        assert response.status_code == 200, response.json
        return response.json

    update(3)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    update(2)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    # firmware without an OS ignores the ACPI power button: the API says so
    answer = update(4)
    assert "force=true" in answer["message"]
    assert answer["data"]["vm_state"] == {"id": 2}
    assert update(4, "?force=true")["data"]["vm_state"] == {"id": 4}
    assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    update(2)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert api.post(f"vm/{vm['id']}/reboot").status_code == 200
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING


def test_resize_live_and_persistent(api, qemu_node, conn):
    vm = create(api, qemu_node)
    response = api.update(f"vm/{vm['id']}", json={"cores": 3, "ram": 512 * MIB})
    assert response.status_code == 200, response.json
    dom = conn.lookupByName(vm["domain_name"])
    assert dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE) == 3
    assert dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_CONFIG) == 3
    inactive = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert "<currentMemory unit='KiB'>524288</currentMemory>" in inactive
    node = api.get(f"node/{qemu_node['node']['id']}").json["data"]
    assert (node["allocated_cores"], node["allocated_ram"]) == (3, 512 * MIB)


def test_delete_leaves_no_domain(api, qemu_node, conn):
    vm = create(api, qemu_node)
    assert api.delete(f"vm/{vm['id']}").status_code == 200
    with pytest.raises(libvirt.libvirtError) as info:
        conn.lookupByName(vm["domain_name"])
    assert info.value.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
    node = api.get(f"node/{qemu_node['node']['id']}").json["data"]
    assert (node["allocated_cores"], node["allocated_ram"]) == (0, 0)


def test_reconcile_sees_a_real_host_clean(api, qemu_node, runner):
    create(api, qemu_node)
    result = runner.invoke(args=["vmapi", "reconcile"])
    assert result.exit_code == 0, result.output


def test_software_emulation_domain(api, qemu_node, conn):
    """The QEMU method (domain type qemu, no KVM) on the same host."""
    response = api.post(
        "virt_node", json={"node": {"id": qemu_node["node"]["id"]}, "virt_method": {"name": "QEMU"}}
    )
    method = (
        response.json["data"]["virt_method"]["id"]
        if response.status_code == 201
        else qemu_node["method"]
    )
    vm = create(api, {**qemu_node, "method": method}, cores=1, ram=256 * MIB)
    dom = conn.lookupByName(vm["domain_name"])
    assert "type='qemu'" in dom.XMLDesc(0)
    assert dom.info()[0] == libvirt.VIR_DOMAIN_RUNNING


@pytest.mark.parametrize("mode", ["user", "ethernet"])
def test_nic_with_the_mac_the_api_reports(api, qemu_node, conn, mode):
    api.update(f"node/{qemu_node['node']['id']}", json={"interface_mode": mode})
    vm = create(api, qemu_node)
    iface = api.get(f"interface/{vm['interfaces'][0]['id']}").json["data"]
    dom = conn.lookupByName(vm["domain_name"])
    assert dom.info()[0] == libvirt.VIR_DOMAIN_RUNNING
    nics = ET.fromstring(dom.XMLDesc(0)).findall("devices/interface")
    assert [(n.get("type"), n.find("mac").get("address")) for n in nics] == [(mode, iface["mac"])]
    tap = f"vm{device_tag(INSTALLATION)}-{iface['mac'][-8:].replace(':', '')}"
    if mode == "ethernet":
        assert nics[0].find("target").get("dev") == tap
        link = subprocess.run(["ip", "-o", "link", "show", tap], capture_output=True, text=True)
        assert link.returncode == 0 and iface["mac"][3:] in link.stdout  # the host side of the tap
    meta = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, "urn:vmapi:domain:1", 0)
    v4 = api.get(f"ipv4/{iface['ipv4'][0]['id']}").json["data"]
    assert f'ipv4="{v4["address"]}/{v4["prefix"]}"' in meta
    api.delete(f"vm/{vm['id']}")
    if mode == "ethernet":
        gone = subprocess.run(["ip", "link", "show", tap], capture_output=True)
        assert gone.returncode != 0


# ---------------------------------------------------------------------- storage

TEST_POOL = "vmapi-test"


def remove_test_pool(conn):
    try:
        pool = conn.storagePoolLookupByName(TEST_POOL)
    except libvirt.libvirtError:
        return
    if pool.isActive():
        pool.refresh(0)
        for vol in pool.listAllVolumes():
            vol.delete(0)
        pool.destroy()
    pool.undefine()


@pytest.fixture
def storage_types(api, conn):
    remove_test_pool(conn)
    made = {}
    for fmt in ("qcow2", "raw"):
        body = {
            "name": f"test-{fmt}",
            "description": f"test {fmt}",
            "pool": TEST_POOL,
            "format": fmt,
        }
        made[fmt] = api.post("storage_type", json=body).json["data"]["id"]
    yield made
    remove_test_pool(conn)


def disk(xml, dev):
    """The <disk> of the domain XML with that target device, or None."""
    found = [
        d for d in ET.fromstring(xml).findall("devices/disk") if d.find("target").get("dev") == dev
    ]
    return found[0] if found else None


def volume(conn, storage_id):
    return conn.storagePoolLookupByName(TEST_POOL).storageVolLookupByName(
        f"{INSTALLATION}-storage-{storage_id}"
    )


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_volume_attached_live_with_cache_and_iotune(api, qemu_node, conn, storage_types, fmt):
    vm = create(api, qemu_node)
    body = {"size": GIB, "vm": {"id": vm["id"]}, "storage_type": {"id": storage_types[fmt]},
            "cache_option": {"id": 1}, "read_iops_limit": 300, "write_bps_limit": 20 * MIB}  # fmt: skip
    response = api.post("storage", json=body)
    assert response.status_code == 201, response.json
    storage = response.json["data"]
    assert "next start" not in response.json.get("message", "")  # attached live
    vol = volume(conn, storage["id"])
    assert vol.info()[1] == GIB
    assert f"<format type='{fmt}'/>" in vol.XMLDesc(0)
    dom = conn.lookupByName(vm["domain_name"])
    live_disk = disk(dom.XMLDesc(0), "vdb")
    assert live_disk.find("driver").get("cache") == "none"
    assert live_disk.find("driver").get("type") == fmt
    assert live_disk.find("source").get("file") == vol.path()
    tune = dom.blockIoTune("vdb", libvirt.VIR_DOMAIN_AFFECT_LIVE)
    assert (tune["read_iops_sec"], tune["write_bytes_sec"]) == (300, 20 * MIB)

    grown = api.update(f"storage/{storage['id']}", json={"size": 2 * GIB, "read_iops_limit": 100})
    assert grown.status_code == 200, grown.json
    assert volume(conn, storage["id"]).info()[1] == 2 * GIB
    assert dom.blockInfo("vdb")[0] == 2 * GIB  # the running guest sees the new size
    assert dom.blockIoTune("vdb", libvirt.VIR_DOMAIN_AFFECT_LIVE)["read_iops_sec"] == 100

    # firmware without an OS never releases a hot-plugged disk: refused, nothing changed
    refused = api.delete(f"storage/{storage['id']}")
    assert refused.status_code == 409 and refused.json["error_id"] == "storage/detach_failed"
    assert disk(dom.XMLDesc(0), "vdb") is not None
    assert disk(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), "vdb") is not None
    assert volume(conn, storage["id"]).info()[1] == 2 * GIB
    # with the VM off, the disk leaves the definition and the volume goes
    api.update(f"vm/{vm['id']}?force=true", json={"vm_state": {"id": 4}})
    assert api.delete(f"storage/{storage['id']}").status_code == 200
    assert disk(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), "vdb") is None
    with pytest.raises(libvirt.libvirtError):
        volume(conn, storage["id"])


def test_cascade_delete_leaves_no_domain_and_no_volume(api, qemu_node, conn, storage_types):
    vm = create(api, qemu_node)
    ids = [api.post("storage", json={"size": 256 * MIB, "vm": {"id": vm["id"]},
                                     "storage_type": {"id": storage_types["qcow2"]}}).json["data"]["id"]
           for _ in range(2)]  # fmt: skip
    assert api.delete(f"vm/{vm['id']}").status_code == 409
    assert api.delete(f"vm/{vm['id']}?cascade=storage").status_code == 200
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName(vm["domain_name"])
    for storage_id in ids:
        with pytest.raises(libvirt.libvirtError):
            volume(conn, storage_id)
