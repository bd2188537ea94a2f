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

import pytest

from tests.conftest import MIB
from tests.errors import assert_error
from tests.faults import FaultyDriver
from tests.hypervisor.migrate_env import (
    INSTALLATION,
    boots,
    ticks,
    wait_for_ticks,
)
from tests.hypervisor.rbd_env import (
    RBD_POOL,
    ceph_env,
    clean,
    make_rbd_type,
    network_disk,
    state_of,
)
from vmapi.services.nodes.hosts import DRIVER_KEY

pytestmark = [pytest.mark.hypervisor]


@pytest.fixture(scope="module")
def env(host_pair, guest_image, pg_server, tmp_path_factory, ceph):
    with ceph_env(host_pair, guest_image, pg_server, tmp_path_factory, ceph) as made:
        yield made


@pytest.fixture(scope="module")
def rbd_type(env, ceph) -> dict:
    return make_rbd_type(env, ceph)


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
