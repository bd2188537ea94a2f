"""Fixtures of the hypervisor tier: a real libvirtd with QEMU on qemu:///system.

Domains made here carry a test installation id (and their names with it); leftovers of
an interrupted run are removed first.
"""

import libvirt
import pytest

from tests.conftest import node_body, unavailable
from tests.domains import tagged_domains
from tests.hypervisor.qemu_host import INSTALLATION, MARKER, URI, kvm_works


@pytest.fixture(scope="module")
def conn():
    try:
        connection = libvirt.open(URI)
    except libvirt.libvirtError as exc:
        unavailable(f"libvirtd does not answer on {URI}: {exc}")
    yield connection
    connection.close()


def remove_test_domains(conn):
    for dom in tagged_domains(conn, MARKER):
        if dom.isActive():
            dom.destroy()
        dom.undefine()


@pytest.fixture
def app_config():
    return {"INSTALLATION_ID": INSTALLATION, "LIBVIRT_TIMEOUT": 60.0, "SHUTDOWN_TIMEOUT": 1.0,
            "DETACH_TIMEOUT": 2.0}  # fmt: skip


@pytest.fixture
def qemu_node(api, conn, address_pools):
    remove_test_domains(conn)
    method = "KVM" if kvm_works() else "QEMU"
    # user networking needs nothing on the host; ethernet (a tap) is tested below
    body = {
        "node": node_body(libvirt_uri=URI, interface_mode="user"),
        "virt_method": {"name": method},
    }
    response = api.post("virt_node", json=body)
    assert response.status_code == 201, response.json
    vn = response.json["data"]
    yield {
        "node": api.get(f"node/{vn['node']['id']}").json["data"],
        "method": vn["virt_method"]["id"],
        "kind": method,
    }
    remove_test_domains(conn)
