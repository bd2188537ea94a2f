"""A VM with a volume on RBD moved live between two real libvirtd hosts (``host_pair``)
through the API, on the session's one-node Ceph cluster (``ceph``).

The volume's type is rbd, so shared: the move makes nothing for it on the target but
the Ceph user's secret and the rbd pool (QEMU there needs the secret), finds the image by
one ``rbd info`` of the API host (the target's rbd pool is never listed), copies no byte
of it (the image in the cluster is the same one, by its id, and the cluster holds no
other), and the guest keeps ticking with the disk as a network disk on the target.
Deleting the VM with its storage takes the image from the cluster. An image gone from
the cluster stops a (cold) move before anything moves.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import libvirt
import pytest

from tests.conftest import MIB
from tests.errors import assert_error
from tests.faults import FaultyDriver
from tests.hypervisor.ceph_cluster import CephCluster
from tests.hypervisor.migrate_env import (
    INSTALLATION,
    MigrateEnv,
    boots,
    migrate_env,
    ticks,
    wait_for_ticks,
)
from vmapi.services.nodes.hosts import DRIVER_KEY

pytestmark = [pytest.mark.hypervisor]

RBD_POOL = "vmapi-ceph"


def clean(env: MigrateEnv, ceph: CephCluster) -> None:
    """The rbd pool and the Ceph user's secret off both hosts, this installation's images
    out of the cluster."""
    for host in env.hosts.hosts:
        conn = libvirt.open(host.uri)
        try:
            for pool in conn.listAllStoragePools():
                if pool.name() == RBD_POOL:
                    if pool.isActive():
                        pool.destroy()
                    pool.undefine()
            for secret in conn.listAllSecrets():
                if secret.usageID() == f"client.{ceph.user}":
                    secret.undefine()
        finally:
            conn.close()
    for image in ceph.rbd_images():
        if image.startswith(f"{INSTALLATION}-"):
            ceph.run("rbd", "rm", f"{ceph.pool}/{image}")


@pytest.fixture(scope="module")
def env(host_pair, guest_image, pg_server, tmp_path_factory, ceph):
    store = tmp_path_factory.mktemp("images")
    keys = tmp_path_factory.mktemp("ceph-keys")
    (keys / f"client.{ceph.user}.key").write_text(ceph.key + "\n")
    made = None
    try:
        with migrate_env(pg_server, host_pair, guest_image.path, store) as made:
            made.app.config["CEPH_KEY_DIR"] = str(keys)
            yield made
    finally:
        if made is not None:  # after the domains went: a guest still holding an image
            clean(made, ceph)  # (a test that failed half-way) would keep it from going


@pytest.fixture(scope="module")
def rbd_type(env, ceph) -> dict:
    body = {"name": "ceph", "description": "Ceph RBD", "pool": RBD_POOL, "format": "raw",
            "backend": "rbd", "ceph_monitors": [f"{h}:{p}" for h, p in ceph.monitors],
            "ceph_pool": ceph.pool, "ceph_user": ceph.user}  # fmt: skip
    made = env.api.post("storage_type", json=body)
    assert made.status_code == 201, made.json
    return made.json["data"]


def state_of(env: MigrateEnv, name: str) -> tuple[dict[str, str], list[str]]:
    """Host ``name``'s ceph secrets (usage -> UUID) and storage pools."""
    conn = libvirt.open(env.host(name).uri)
    try:
        found = {s.usageID(): s.UUIDString() for s in conn.listAllSecrets()}
        return found, [p.name() for p in conn.listAllStoragePools()]
    finally:
        conn.close()


def network_disk(env: MigrateEnv, name: str, domain: str, target: str) -> ET.Element:
    conn = libvirt.open(env.host(name).uri)
    try:
        xml = ET.fromstring(conn.lookupByName(domain).XMLDesc(0))
    finally:
        conn.close()
    [disk] = [d for d in xml.iterfind("devices/disk") if d.find("target").get("dev") == target]
    return disk


def test_a_live_move_copies_no_rbd_volume(env, ceph, rbd_type):
    vm = env.create("a")
    read = env.console(vm["id"])
    wait_for_ticks(read, 2)
    made = env.api.post("storage", json={"size": 64 * MIB, "vm": {"id": vm["id"]},
                                         "storage_type": {"id": rbd_type["id"]}})  # fmt: skip
    assert made.status_code == 201, made.json
    storage = made.json["data"]["id"]
    image = f"{INSTALLATION}-storage-{storage}"
    [(path,)] = env.sql("SELECT path FROM storage WHERE id = :id", id=storage)
    assert path == f"{ceph.pool}/{image}"
    identity = ceph.rbd_info(image)["id"]
    images = ceph.rbd_images()
    secrets, pools = state_of(env, "b")
    assert f"client.{ceph.user}" not in secrets and RBD_POOL not in pools

    last = ticks(read())[-1]
    real = env.app.extensions[DRIVER_KEY]
    env.app.extensions[DRIVER_KEY] = counting = FaultyDriver(real)  # (fails nothing)
    try:
        moved = env.api.post(f"vm/{vm['id']}/migrate",
                             json={"node": {"id": env.nodes["b"]["id"]}})  # fmt: skip
    finally:
        env.app.extensions[DRIVER_KEY] = real
    assert moved.status_code == 200, moved.json
    # the image was found by the API host's Ceph client: no node listed its rbd pool
    listed = [args[0] for name, args in counting.called if name in ("volumes", "volume")]
    assert RBD_POOL not in listed
    # the target was given the secret (the same UUID) and the pool, nothing else
    secrets, pools = state_of(env, "b")
    assert secrets[f"client.{ceph.user}"] == rbd_type["ceph_secret_uuid"]
    assert RBD_POOL in pools
    assert image not in env.volumes("b")  # no file made for it in b's own pool
    # the same image, not a copy: its id in the cluster is the one it had, and no other
    assert ceph.rbd_info(image)["id"] == identity and ceph.rbd_images() == images
    [(node, after)] = env.sql("SELECT node_id, path FROM storage WHERE id = :id", id=storage)
    assert (node, after) == (env.nodes["b"]["id"], path)
    # the guest runs on b with the network disk, and never restarted
    assert env.domains("b")[vm["domain_name"]] == "running"
    assert vm["domain_name"] not in env.domains("a")
    vdb = network_disk(env, "b", vm["domain_name"], "vdb")
    assert vdb.get("type") == "network" and vdb.find("source").get("name") == path
    text = wait_for_ticks(read, 2, after=last)
    assert boots(text) <= 1

    gone = env.api.delete(f"vm/{vm['id']}?cascade=storage")
    assert gone.status_code == 200, gone.json
    assert image not in ceph.rbd_images()


def test_a_move_stops_when_the_image_is_not_in_the_cluster(env, ceph, rbd_type):
    body = {"cores": 1, "ram": 128 * MIB, "virt_method": {"id": env.method},
            "node": {"id": env.nodes["a"]["id"]}}  # fmt: skip
    vm = env.api.post("vm", json=body).json["data"]  # no image: it moves cold, once off
    off = env.api.update(f"vm/{vm['id']}?force=true", json={"vm_state": {"id": 4}})
    assert off.status_code == 200, off.json
    made = env.api.post("storage", json={"size": 16 * MIB, "vm": {"id": vm["id"]},
                                         "storage_type": {"id": rbd_type["id"]}})  # fmt: skip
    assert made.status_code == 201, made.json
    storage = made.json["data"]["id"]
    image = f"{INSTALLATION}-storage-{storage}"
    aside = f"{INSTALLATION}-aside-{storage}"
    ceph.run("rbd", "rename", f"{ceph.pool}/{image}", f"{ceph.pool}/{aside}")  # not there now
    try:
        moved = env.api.post(f"vm/{vm['id']}/migrate",
                             json={"node": {"id": env.nodes["b"]["id"]}})  # fmt: skip
        error = assert_error(moved, 502, "vm/hypervisor_error")
        assert error["data"]["step"] == f"finding storage {storage} on the target"
        assert f"does not see {ceph.pool}/{image}" in error["message"]
        assert "(no such volume)" in error["message"]
        assert ceph.key not in moved.get_data(as_text=True)
        [(node,)] = env.sql("SELECT node_id FROM vm WHERE id = :id", id=vm["id"])
        assert node == env.nodes["a"]["id"]  # nothing moved
        assert env.domains("a")[vm["domain_name"]] == "shutoff"
        assert vm["domain_name"] not in env.domains("b")
        assert ceph.rbd_images().count(aside) == 1 and image not in ceph.rbd_images()
    finally:
        ceph.run("rbd", "rename", f"{ceph.pool}/{aside}", f"{ceph.pool}/{image}")
    gone = env.api.delete(f"vm/{vm['id']}?cascade=storage")
    assert gone.status_code == 200, gone.json
    assert image not in ceph.rbd_images()
    clean(env, ceph)  # the hosts as the module found them (no secret, no rbd pool)
