"""Volumes of an rbd storage type through the API, on the real libvirtd and the session's
one-node Ceph cluster (``ceph``, tests/hypervisor/ceph_cluster.py).

The session's vmapi (``env``, tests/hypervisor/boot_env.py) is given the cluster's key in
a key directory of the module's own and an rbd storage type over the cluster's pool. The
test guest boots from a local overlay as usual; a volume of the type is made for it: the
node gets the secret and the rbd pool first, the image is in the cluster (``rbd info``),
the running guest has it as a network disk with its limits, it grows live, a second
volume finds the node ready, and both detach live and go from the cluster. A type whose
monitor is a closed port answers 502 with the step and leaves no pool, no secret, no
image and no row; a secret a pool of the node uses is kept by that undo. Reconcile looks
at the type's images through the API host's Ceph client (a row whose image is gone, an
image of ours no row owns), never by listing the node's rbd pool. The module removes its
pools, secrets and images after itself (and what an earlier run that was killed left,
before it starts).
"""

from __future__ import annotations

import base64
import os
import socket
import time
import uuid
import xml.etree.ElementTree as ET

import libvirt
import pytest

from tests.conftest import MIB
from tests.errors import assert_error
from tests.faults import FaultyDriver
from tests.hypervisor.boot_env import BootEnv, wait_for_guest
from tests.hypervisor.ceph_cluster import CephCluster
from tests.hypervisor.qemu_host import INSTALLATION
from vmapi.extensions import db
from vmapi.hypervisor import CephSource
from vmapi.models import Storage
from vmapi.services.nodes.hosts import DRIVER_KEY

# the module's tests are one story on one node (the first volume prepares the pool and
# the secret, later ones meet them): they run in the file's order, not shuffled
pytestmark = [pytest.mark.hypervisor, pytest.mark.random_order(disabled=True)]

#: the libvirt pools of this module's storage types (a good one, one out of reach)
RBD_POOL = f"{INSTALLATION}-rbd"
WRONG_POOL = f"{INSTALLATION}-rbd-wrong"
#: the cephx user of the type out of reach (a key the cluster never knew)
NOWHERE = "nowhere"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def remove_ours(conn: libvirt.virConnect, ceph: CephCluster) -> None:
    """The module's pools on the host, the secrets of its Ceph users and its images in the
    cluster (libvirt holds one secret per usage: only these tests use them here)."""
    for pool in conn.listAllStoragePools():
        if pool.name() in (RBD_POOL, WRONG_POOL):
            if pool.isActive():
                pool.destroy()
            pool.undefine()
    for secret in conn.listAllSecrets():
        ceph_secret = secret.usageType() == libvirt.VIR_SECRET_USAGE_TYPE_CEPH
        if ceph_secret and secret.usageID() in (f"client.{ceph.user}", f"client.{NOWHERE}"):
            secret.undefine()
    for image in ceph.rbd_images():
        if image.startswith(f"{INSTALLATION}-"):
            ceph.run("rbd", "rm", f"{ceph.pool}/{image}")


def secrets(conn: libvirt.virConnect) -> dict[str, str]:
    """The host's ceph secrets: usage -> UUID."""
    return {
        s.usageID(): s.UUIDString()
        for s in conn.listAllSecrets()
        if s.usageType() == libvirt.VIR_SECRET_USAGE_TYPE_CEPH
    }


def pools(conn: libvirt.virConnect) -> list[str]:
    return [p.name() for p in conn.listAllStoragePools()]


@pytest.fixture(scope="module")
def keys(env: BootEnv, ceph: CephCluster, tmp_path_factory):
    """The module's key directory, named in the session's vmapi for the module."""
    folder = tmp_path_factory.mktemp("ceph-keys")
    (folder / f"client.{ceph.user}.key").write_text(ceph.key + "\n")
    (folder / f"client.{NOWHERE}.key").write_text(base64.b64encode(os.urandom(16)).decode())
    before = env.app.config.get("CEPH_KEY_DIR")
    env.app.config["CEPH_KEY_DIR"] = str(folder)
    remove_ours(env.conn, ceph)
    yield folder
    env.app.config["CEPH_KEY_DIR"] = before


def make_type(env: BootEnv, name: str, pool: str, monitors: list[str], user: str) -> dict:
    body = {"name": name, "description": f"{name} (test)", "pool": pool, "format": "raw",
            "backend": "rbd", "ceph_monitors": monitors, "ceph_pool": "rbd",
            "ceph_user": user}  # fmt: skip
    made = env.api.post("storage_type", json=body)
    assert made.status_code == 201, made.json
    return made.json["data"]


@pytest.fixture(scope="module")
def rbd_type(env: BootEnv, ceph: CephCluster, keys):
    """An rbd storage type over the cluster's pool; after the module: its VMs and volumes
    deleted, the type, and everything of the module on the host and in the cluster."""
    monitors = [f"{host}:{port}" for host, port in ceph.monitors]
    made = make_type(env, "ceph-test", RBD_POOL, monitors, ceph.user)
    yield made
    try:
        for vm in env.api.get("vm").json["data"]:
            gone = env.api.delete(f"vm/{vm}?cascade=storage")
            assert gone.status_code == 200, gone.json
        for storage_type in env.api.get("storage_type").json["data"].values():
            if storage_type["backend"] == "rbd":
                assert env.api.delete(f"storage_type/{storage_type['id']}").status_code == 200
        assert [i for i in ceph.rbd_images() if i.startswith(f"{INSTALLATION}-")] == []
    finally:
        remove_ours(env.conn, ceph)


@pytest.fixture(scope="module")
def guest(env: BootEnv, guest_image, rbd_type) -> dict:
    """The test guest, booted from a local overlay of the image uploaded through the API;
    running."""
    image = env.upload(guest_image.path, name="rbd-guest")
    vm = env.create(image["id"])
    wait_for_guest(env.console(vm["id"]))
    return vm


def row(env: BootEnv, storage_id: int) -> Storage:
    with env.app.app_context():
        found = db.session.get(Storage, storage_id)
        db.session.expunge(found)
        db.session.remove()
    return found


def live_disk(env: BootEnv, vm: dict, target: str, flags: int = 0) -> ET.Element | None:
    xml = ET.fromstring(env.conn.lookupByName(vm["domain_name"]).XMLDesc(flags))
    found = [d for d in xml.iterfind("devices/disk") if d.find("target").get("dev") == target]
    return found[0] if found else None


def test_a_volume_on_rbd_lives_in_the_cluster_and_is_a_network_disk(env, ceph, rbd_type, guest):
    # the first volume on the node prepares the pool (another test of the module, in any
    # order, may have made it: it goes first; the cluster's images are not touched)
    if RBD_POOL in pools(env.conn):
        made = env.conn.storagePoolLookupByName(RBD_POOL)
        if made.isActive():
            made.destroy()
        made.undefine()
    assert RBD_POOL not in pools(env.conn)
    body = {"size": 64 * MIB, "vm": {"id": guest["id"]}, "storage_type": {"id": rbd_type["id"]},
            "read_iops_limit": 200}  # fmt: skip
    started = time.monotonic()
    response = env.api.post("storage", json=body)
    seconds = time.monotonic() - started
    assert response.status_code == 201, response.json
    print(f"\nPOST /storage on rbd, the node's secret and pool included: {seconds:.2f} s")
    storage = response.json["data"]
    message = response.json.get("message", "")
    assert "given the Ceph user's key" in message and "storage pool was created" in message
    assert "next start" not in message  # attached live
    assert ceph.key not in response.get_data(as_text=True)

    # the node: the secret of the type's user, the rbd pool over the cluster, autostarted
    assert secrets(env.conn)[f"client.{ceph.user}"] == rbd_type["ceph_secret_uuid"]
    pool = env.conn.storagePoolLookupByName(RBD_POOL)
    assert pool.isActive() and pool.autostart()
    assert ET.fromstring(pool.XMLDesc(0)).get("type") == "rbd"

    # the cluster: a raw image of the size; the row's path is libvirt's pool/image
    stored = row(env, storage["id"])
    image = f"{INSTALLATION}-storage-{storage['id']}"
    assert (stored.volume_name, stored.path, stored.pool) == (image, f"rbd/{image}", RBD_POOL)
    assert ceph.rbd_info(image)["size"] == 64 * MIB

    # the running guest: a network disk through librbd, with its limit, and persistently
    for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE):
        vdb = live_disk(env, guest, "vdb", flags)
        assert vdb is not None and vdb.get("type") == "network"
        source = vdb.find("source")
        assert (source.get("protocol"), source.get("name")) == ("rbd", f"rbd/{image}")
        assert [(h.get("name"), int(h.get("port"))) for h in source.iterfind("host")] == list(
            ceph.monitors
        )
        auth = vdb.find("auth")
        assert auth.get("username") == ceph.user
        assert auth.find("secret").get("uuid") == rbd_type["ceph_secret_uuid"]
        assert vdb.find("driver").get("type") == "raw"
    dom = env.conn.lookupByName(guest["domain_name"])
    assert dom.blockIoTune("vdb", libvirt.VIR_DOMAIN_AFFECT_LIVE)["read_iops_sec"] == 200

    # grown live: the image in the cluster and the size the guest's disk has
    grown = env.api.update(f"storage/{storage['id']}", json={"size": 128 * MIB,
                                                             "read_iops_limit": 50})  # fmt: skip
    assert grown.status_code == 200, grown.json
    assert ceph.rbd_info(image)["size"] == 128 * MIB
    assert dom.blockInfo("vdb")[0] == 128 * MIB
    assert dom.blockIoTune("vdb", libvirt.VIR_DOMAIN_AFFECT_LIVE)["read_iops_sec"] == 50

    # a second volume finds the node ready
    again = env.api.post("storage", json={**body, "size": 32 * MIB})
    assert again.status_code == 201, again.json
    assert "storage pool was created" not in again.json.get("message", "")
    assert "Ceph user's key" not in again.json.get("message", "")
    second = again.json["data"]
    image2 = f"{INSTALLATION}-storage-{second['id']}"
    assert live_disk(env, guest, "vdc").find("source").get("name") == f"rbd/{image2}"

    # detached live and deleted: gone from the guest and from the cluster
    for made, name, target in ((storage, image, "vdb"), (second, image2, "vdc")):
        gone = env.api.delete(f"storage/{made['id']}")
        assert gone.status_code == 200, gone.json
        assert live_disk(env, guest, target) is None
        assert live_disk(env, guest, target, libvirt.VIR_DOMAIN_XML_INACTIVE) is None
        assert name not in ceph.rbd_images()


def test_a_node_that_cannot_reach_the_cluster_keeps_nothing(env, ceph, rbd_type, guest):
    port = _closed_port()
    wrong = make_type(env, "ceph-closed", WRONG_POOL, [f"127.0.0.1:{port}"], NOWHERE)
    assert wrong["ceph_secret_uuid"] != rbd_type["ceph_secret_uuid"]  # another user's
    images = ceph.rbd_images()
    before = env.api.get("storage").json["data"].keys()
    body = {"size": 32 * MIB, "vm": {"id": guest["id"]}, "storage_type": {"id": wrong["id"]}}
    started = time.monotonic()
    response = env.api.post("storage", json=body)
    seconds = time.monotonic() - started
    error = assert_error(response, 502, "vm/hypervisor_error")
    print(f"\nPOST /storage with the monitor out of reach: {seconds:.2f} s")
    assert error["data"]["step"] == "preparing the rbd storage pool"
    assert f"cannot reach Ceph pool rbd at 127.0.0.1:{port}" in error["message"]
    assert ceph.key not in response.get_data(as_text=True)
    # nothing left: no pool, no secret of that user, no image, no row, no disk
    assert WRONG_POOL not in pools(env.conn)
    assert f"client.{NOWHERE}" not in secrets(env.conn)
    assert wrong["ceph_secret_uuid"] not in secrets(env.conn).values()
    assert ceph.rbd_images() == images
    assert env.api.get("storage").json["data"].keys() == before
    assert live_disk(env, guest, "vdb") is None
    assert env.api.delete(f"storage_type/{wrong['id']}").status_code == 200


def test_a_secret_a_pool_uses_is_kept(env, ceph, rbd_type, keys):
    """The undo of a failed pool start removes the secret it set only when no pool of the
    node uses it (a node whose key was set again for a pool it has keeps it)."""
    driver = env.app.extensions[DRIVER_KEY]
    source = CephSource(tuple(ceph.monitors), ceph.pool, ceph.user, rbd_type["ceph_secret_uuid"])
    uri = env.node["libvirt_uri"]
    driver.ensure_ceph_secret(uri, source, ceph.key)
    driver.ensure_rbd_pool(uri, RBD_POOL, source)
    try:
        assert driver.forget_ceph_secret(uri, source.secret_uuid) is False
        assert secrets(env.conn)[f"client.{ceph.user}"] == source.secret_uuid
    finally:
        pool = env.conn.storagePoolLookupByName(RBD_POOL)
        pool.destroy()
        pool.undefine()
    assert driver.forget_ceph_secret(uri, source.secret_uuid) is True
    assert f"client.{ceph.user}" not in secrets(env.conn)
    assert driver.forget_ceph_secret(uri, source.secret_uuid) is False  # none there


def test_reconcile_looks_at_each_image_through_the_api_host(env, ceph, rbd_type, guest):
    made = env.api.post("storage", json={"size": 32 * MIB, "vm": {"id": guest["id"]},
                                         "storage_type": {"id": rbd_type["id"]}})  # fmt: skip
    assert made.status_code == 201, made.json
    there = f"{INSTALLATION}-storage-{made.json['data']['id']}"
    # a row whose image is not in the cluster (as an image lost behind vmapi's back leaves it)
    with env.app.app_context():
        lost = Storage(size=32 * MIB, vm_id=guest["id"], storage_type_id=rbd_type["id"],
                       target="vdy", node_id=env.node["id"], pool=RBD_POOL)  # fmt: skip
        db.session.add(lost)
        db.session.flush()
        lost.volume_name = f"{INSTALLATION}-storage-{lost.id}"
        lost.path = f"{ceph.pool}/{lost.volume_name}"
        db.session.commit()
        lost_id, lost_path = lost.id, lost.path
        db.session.remove()
    stray, foreign = f"{INSTALLATION}-storage-999999", f"not-ours-{uuid.uuid4().hex[:8]}"
    for name in (stray, foreign):
        ceph.run("rbd", "create", "--size", "1M", f"{ceph.pool}/{name}")
    real = env.app.extensions[DRIVER_KEY]
    env.app.extensions[DRIVER_KEY] = counting = FaultyDriver(real)  # (fails nothing)
    try:
        result = env.app.test_cli_runner().invoke(args=["vmapi", "reconcile"])
    finally:
        env.app.extensions[DRIVER_KEY] = real
    try:
        lines = result.output.splitlines()
        assert result.exit_code == 1, result.output
        [missing] = [line for line in lines if "missing_volume" in line]
        assert lost_path in missing and f"storage {lost_id} (vm-{guest['id']})" in missing
        assert env.node["fqdn"] in missing
        [unowned] = [line for line in lines if "unowned_volume" in line and "rbd/" in line]
        assert f"rbd/{stray}" in unowned
        assert f"ceph:127.0.0.1:{ceph.monitors[0][1]}" in unowned
        assert not any(foreign in line or there in line for line in lines), result.output
        assert "ceph_unreachable" not in result.output
        # no node listed the rbd pool: the images were looked at by the API host
        assert RBD_POOL not in [args[0] for name, args in counting.called if name == "volumes"]
    finally:
        with env.app.app_context():
            db.session.delete(db.session.get(Storage, lost_id))
            db.session.commit()
            db.session.remove()
        for name in (stray, foreign):
            ceph.run("rbd", "rm", "--no-progress", f"{ceph.pool}/{name}")
        gone = env.api.delete(f"storage/{made.json['data']['id']}")
        assert gone.status_code == 200, gone.json
