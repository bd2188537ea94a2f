"""Network filters follow a VM between two real libvirtd hosts (``host_pair``): defined on
the target before the domain arrives (libvirt refuses a domain whose filter is missing),
bound to the NIC there with the same addresses, gone from the source after the move; a
target that cannot define them keeps the VM where it was. Disk-less guests (SeaBIOS
only) move live in a moment; the traffic after a move is proven with a booted guest in
test_network_guard.py."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator

import libvirt
import pytest

from tests.conftest import MIB
from tests.errors import assert_error
from tests.faults import FaultyDriver
from tests.hypervisor.guest_net import guest_network
from tests.hypervisor.migrate_env import INSTALLATION, MigrateEnv, migrate_env
from vmapi.services.nodes.hosts import DRIVER_KEY

pytestmark = [pytest.mark.hypervisor]


@pytest.fixture(scope="module")
def env(host_pair, guest_image, pg_server, tmp_path_factory) -> Iterator[MigrateEnv]:
    store = tmp_path_factory.mktemp("images")
    with (
        migrate_env(pg_server, host_pair, guest_image.path, store) as made,
        guest_network(("198.51.100.1/24", "2001:db8:100::1/64")) as net,
    ):
        for node in made.nodes.values():  # both hosts' NICs on the test's bridge
            body = {"interface_mode": "bridge", "bridge": net.bridge}
            assert made.api.update(f"node/{node['id']}", json=body).status_code == 200
        yield made
        for vm in made.api.get("vm").json["data"]:
            assert made.api.delete(f"vm/{vm}").status_code == 200


def filters(env: MigrateEnv, on: str) -> list[str]:
    conn = libvirt.open(env.host(on).uri)
    try:
        return sorted(f for f in conn.listNWFilters() if f.startswith(f"{INSTALLATION}-"))
    finally:
        conn.close()


def bound(env: MigrateEnv, on: str) -> dict[str, dict[str, list[str]]]:
    """The filters bound to running NICs on host ``on`` and their parameters."""
    conn = libvirt.open(env.host(on).uri)
    try:
        found = {}
        for binding in conn.listAllNWFilterBindings():
            root = ET.fromstring(binding.XMLDesc())
            params: dict[str, list[str]] = {}
            for param in root.findall("filterref/parameter"):
                params.setdefault(param.get("name"), []).append(param.get("value"))
            found[binding.filterName()] = params
        return found
    finally:
        conn.close()


def disk_less(env: MigrateEnv, on: str) -> dict:
    body = {"cores": 1, "ram": 128 * MIB, "virt_method": {"id": env.method},
            "node": {"id": env.nodes[on]["id"]}}  # fmt: skip
    made = env.api.post("vm", json=body)
    assert made.status_code == 201, made.json
    return made.json["data"]


def test_a_live_move_takes_the_filters_along_and_leaves_none_behind(env):
    vm = disk_less(env, "a")
    port = f"{INSTALLATION}-nic-{vm['interfaces'][0]['id']}"
    before = bound(env, "a")[port]
    assert port in filters(env, "a") and filters(env, "b") == []
    moved = env.api.post(f"vm/{vm['id']}/migrate", json={"node": {"id": env.nodes["b"]["id"]}})
    assert moved.status_code == 200, moved.json
    assert bound(env, "b")[port] == before  # the same addresses hold on the target
    assert port in filters(env, "b")
    assert filters(env, "a") == [] and port not in bound(env, "a")
    back = env.api.post(f"vm/{vm['id']}/migrate", json={"node": {"id": env.nodes["a"]["id"]}})
    assert back.status_code == 200, back.json
    assert filters(env, "b") == [] and bound(env, "a")[port] == before
    assert env.api.delete(f"vm/{vm['id']}").status_code == 200
    assert filters(env, "a") == []


@pytest.fixture
def faulty(env: MigrateEnv) -> Iterator[FaultyDriver]:
    real = env.app.extensions[DRIVER_KEY]
    env.app.extensions[DRIVER_KEY] = wrapped = FaultyDriver(real)
    yield wrapped
    env.app.extensions[DRIVER_KEY] = real


def test_a_target_that_cannot_define_the_filters_keeps_the_vm_where_it_was(env, faulty):
    vm = disk_less(env, "a")
    port = f"{INSTALLATION}-nic-{vm['interfaces'][0]['id']}"
    faulty.fail("define_filter", uri=env.host("b").uri)
    error = assert_error(
        env.api.post(f"vm/{vm['id']}/migrate", json={"node": {"id": env.nodes["b"]["id"]}}),
        502, "vm/hypervisor_error",
    )  # fmt: skip
    assert error["data"]["step"] == "defining the network filters"
    assert env.domains("a") == {f"{INSTALLATION}-vm-{vm['id']}": "running"}
    assert env.domains("b") == {}
    assert port in bound(env, "a") and filters(env, "b") == []
    assert env.api.delete(f"vm/{vm['id']}").status_code == 200
