"""Fixtures of the console tests: disk-less QEMU VMs on the real libvirtd, made through the API.

Other test sessions use the same ``qemu:///system`` at the same time, so everything made
here is this session's own: domains carry a unique installation id (and only those are
removed), and VM ids start at a random high number so domain names (``vm-<id>``) cannot
collide with another session's.
"""

from __future__ import annotations

import random
import uuid
import xml.etree.ElementTree as ET

import libvirt
import pytest
import sqlalchemy as sa

from tests.conftest import MIB, node_body, unavailable
from tests.domains import tagged_domains
from vmapi.extensions import db

URI = "qemu:///system"
INSTALLATION = f"vmapi-c-{uuid.uuid4().hex[:8]}"  # at most 16 characters


# Fixtures are named by ``name=`` so that test modules can import them (under these
# function names) without shadowing: ``from tests.hypervisor.consoles import conn_fixture``.


@pytest.fixture(name="conn", scope="module")
def conn_fixture():
    try:
        connection = libvirt.open(URI)
    except libvirt.libvirtError as exc:
        unavailable(f"libvirtd does not answer on {URI}: {exc}")
    yield connection
    connection.close()


def remove_ours(conn: libvirt.virConnect) -> None:
    for dom in tagged_domains(conn, INSTALLATION):
        if dom.isActive():
            dom.destroy()
        dom.undefine()


@pytest.fixture(name="app_config")
def app_config_fixture():
    return {"INSTALLATION_ID": INSTALLATION, "LIBVIRT_TIMEOUT": 60.0, "SHUTDOWN_TIMEOUT": 1.0,
            "CONSOLE_TTL": 120, "VM_MAX_VCPUS": 1}  # fmt: skip


@pytest.fixture(name="qemu_node")
def qemu_node_fixture(app, api, conn, address_pools):
    """A node on the real libvirtd with the QEMU method (domain type qemu: TCG, no disk
    needed: SeaBIOS draws on the display); VM ids far from anyone else's."""
    with app.app_context():
        first = random.randrange(10**6, 10**9)
        db.session.execute(sa.select(sa.func.setval("vm_id_seq", first, False)))
        db.session.commit()
        db.session.remove()
    body = {"node": node_body(libvirt_uri=URI, interface_mode="user"),
            "virt_method": {"name": "QEMU"}}  # fmt: skip
    response = api.post("virt_node", json=body)
    assert response.status_code == 201, response.json
    vn = response.json["data"]
    yield {"node": vn["node"]["id"], "method": vn["virt_method"]["id"]}
    remove_ours(conn)


def make_vm(api, node, **fields) -> dict:
    body = {"cores": 1, "ram": 128 * MIB, "virt_method": {"id": node["method"]}, **fields}
    response = api.post("vm", json=body)
    assert response.status_code == 201, response.json
    return response.json["data"]


def vnc_graphics(conn: libvirt.virConnect, name: str, flags: int = 0) -> ET.Element:
    """The domain's <graphics type='vnc'> as libvirt shows it (with ``passwd`` under
    VIR_DOMAIN_XML_SECURE)."""
    root = ET.fromstring(conn.lookupByName(name).XMLDesc(flags))
    graphics = root.find("devices/graphics[@type='vnc']")
    assert graphics is not None, ET.tostring(root, encoding="unicode")
    return graphics
