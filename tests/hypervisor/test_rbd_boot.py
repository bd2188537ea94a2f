"""VMs booted from RBD clones through the API, on two real libvirtd hosts (``host_pair``)
and the session's one-node Ceph cluster (``ceph``).

The test guest's image is uploaded through the API once; its first VM on the rbd type
has the API host write it into the Ceph pool once (a raw RBD image with a protected
snapshot), and every root disk of it there is an RBD clone of that snapshot. A live move
copies no disk (the driver is never asked to, and the clone in the cluster is the one it
was); an evacuation of a dead host restarts the VM on its own clone with what the guest
wrote; a failure at any step leaves no RBD image, snapshot or clone behind.

The tests run in any order (``make test`` shuffles them within the module): each finds
the guest wherever the one before left it, and the failures use images of their own.
"""

from __future__ import annotations

import json
import os
import time

import libvirt
import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from tests.conftest import MIB
from tests.faults import FaultyDriver
from tests.guest import console
from tests.hypervisor.ceph_cluster import CephCluster
from tests.hypervisor.migrate_env import (
    INSTALLATION,
    MigrateEnv,
    boots,
    ticks,
    wait_for_ticks,
)
from tests.hypervisor.rbd_env import (
    ceph_env,
    flattens_done_by_the_manager,
    make_rbd_type,
    network_disk,
    record_in_process,
    record_processes,
)
from tests.image_files import OCTET
from vmapi.extensions import db
from vmapi.models import ImageRbd, StorageType
from vmapi.services.nodes.hosts import DRIVER_KEY
from vmapi.services.storage.ceph import librbd_client
from vmapi.services.undo import Undo
from vmapi.services.vms import placed as placed_module
from vmapi.services.vms.boot import round_up
from vmapi.services.vms.rbd_boot import start_clone

pytestmark = [pytest.mark.hypervisor]


@pytest.fixture(scope="module")
def env(host_pair, guest_image, pg_server, tmp_path_factory, ceph):
    with ceph_env(host_pair, guest_image, pg_server, tmp_path_factory, ceph) as made:
        made.app.extensions[DRIVER_KEY] = FaultyDriver(made.app.extensions[DRIVER_KEY])
        yield made


@pytest.fixture(scope="module")
def rbd_type(env, ceph) -> dict:
    return make_rbd_type(env, ceph)


@pytest.fixture(scope="module")
def guest(env, rbd_type) -> dict:
    """The test guest on node a, its root disk an RBD clone; ticking."""
    vm = env.create("a", root_storage_type={"id": rbd_type["id"]})
    wait_for_ticks(env.console(vm["id"]), 2)
    return vm


def faults(env: MigrateEnv) -> FaultyDriver:
    return env.app.extensions[DRIVER_KEY]


def image_uploads(env: MigrateEnv) -> int:
    """Uploads of an image's base copy to a node (seeds are uploaded too)."""
    return sum(1 for method, args in faults(env).called
               if method == "upload_volume" and "-image-" in args[1])  # fmt: skip


def parent_image(env: MigrateEnv) -> str:
    return f"{INSTALLATION}-image-{env.image['id']}"


def root_of(env: MigrateEnv, vm: dict) -> tuple[int, str, str]:
    """The VM's root disk: its storage id, RBD image and recorded path."""
    [(ident, name, path)] = env.sql(
        "SELECT id, volume_name, path FROM storage WHERE vm_id = :id AND boot", id=vm["id"]
    )
    return ident, name, path


def snapshots(ceph: CephCluster, image: str) -> list[dict]:
    return json.loads(ceph.run("rbd", "snap", "ls", "--format", "json", f"{ceph.pool}/{image}"))


def ours(ceph: CephCluster) -> list[str]:
    return [name for name in ceph.rbd_images() if name.startswith(f"{INSTALLATION}-")]


def where(env: MigrateEnv, vm: dict) -> str:
    [(node,)] = env.sql("SELECT node_id FROM vm WHERE id = :id", id=vm["id"])
    return next(name for name, row in env.nodes.items() if row["id"] == node)


def written(ceph: CephCluster, image: str) -> int:
    """Bytes the clone holds of its own (what the guest wrote; the rest is its parent's)."""
    extents = json.loads(ceph.run("rbd", "diff", "--format", "json", f"{ceph.pool}/{image}"))
    return sum(e["length"] for e in extents)


def test_the_guest_boots_from_a_clone_of_the_image_written_once(env, ceph, rbd_type, guest):
    parent = parent_image(env)
    # the image is in the cluster once, raw, with its protected snapshot
    assert ceph.rbd_info(parent)["size"] == env.image["virtual_size"]
    [snapshot] = snapshots(ceph, parent)
    assert snapshot["name"] == "vmapi-base" and snapshot["protected"] == "true"
    [(row_image, row_type, row_name)] = env.sql(
        "SELECT image_id, storage_type_id, rbd_name FROM image_rbd WHERE image_id = :i",
        i=env.image["id"],
    )
    assert (row_image, row_type, row_name) == (env.image["id"], rbd_type["id"], parent)
    # the root disk is a clone of it, grown to its size, a network disk of the domain
    storage, name, path = root_of(env, guest)
    info = ceph.rbd_info(name)
    assert info["parent"]["image"] == parent and info["parent"]["snapshot"] == "vmapi-base"
    assert path == f"{ceph.pool}/{name}"
    vda = network_disk(env, where(env, guest), guest["domain_name"], "vda")
    assert vda.get("type") == "network" and vda.find("source").get("name") == path
    # no node holds a copy of the image, nor a file of the disk
    assert env.sql("SELECT count(*) FROM image_copy") == [(0,)]
    for node in "ab":
        assert [v for v in env.volumes(node) if "image" in v or name in v] == []
    answer = env.api.get(f"storage/{storage}").json["data"]
    assert answer["storage_type"] == {"id": rbd_type["id"]} and answer["boot"] is True


def test_a_second_vm_shares_the_parent_and_writes_nothing_more(env, ceph, rbd_type, guest):
    before = image_uploads(env)
    second = env.create("b", root_storage_type={"id": rbd_type["id"]})
    _, first_name, _ = root_of(env, guest)
    _, second_name, _ = root_of(env, second)
    parents = {ceph.rbd_info(n)["parent"]["image"] for n in (first_name, second_name)}
    assert parents == {parent_image(env)}
    assert parent_image(env) in ours(ceph)
    assert image_uploads(env) == before == 0  # no node ever got the image
    wait_for_ticks(env.console(second["id"]), 1)
    # deleting the image waits for its VMs; the last one's delete keeps the parent
    in_use = env.api.delete(f"image/{env.image['id']}")
    assert in_use.status_code == 409 and in_use.json["error_id"] == "image/in_use"
    assert env.api.delete(f"vm/{second['id']}").status_code == 200
    assert second_name not in ceph.rbd_images()
    assert parent_image(env) in ceph.rbd_images()


def test_a_live_move_copies_no_disk_and_the_guest_keeps_its_data(env, ceph, guest):
    _, name, path = root_of(env, guest)
    identity = ceph.rbd_info(name)["id"]
    read = env.console(guest["id"])
    text = read()
    last, booted = ticks(text)[-1], boots(text)
    faults(env).called_with.clear()
    other = "b" if where(env, guest) == "a" else "a"
    moved = env.api.post(f"vm/{guest['id']}/migrate",
                         json={"node": {"id": env.nodes[other]["id"]}})  # fmt: skip
    assert moved.status_code == 200, moved.json
    [(_, kwargs)] = [(a, k) for m, a, k in faults(env).called_with if m == "migrate"]
    # the driver was never asked to copy a disk: the root disk is a network disk
    assert kwargs["copy_storage"] is False and kwargs["incremental"] is False
    assert path not in (kwargs["disk_paths"] or {})
    assert ceph.rbd_info(name)["id"] == identity  # the same clone, not a new one
    assert [v for v in env.volumes(other) if name in v] == []
    stats = env.api.get(f"vm/{guest['id']}").json["data"]
    assert stats["node"] == {"id": env.nodes[other]["id"]}
    vda = network_disk(env, other, guest["domain_name"], "vda")
    assert vda.find("source").get("name") == path
    text = wait_for_ticks(read, 2, after=last)
    assert boots(text) <= booted  # never restarted (the log on the target starts anew)


def test_an_evacuation_restarts_the_vm_on_its_own_clone(env, ceph, guest):
    if where(env, guest) != "b":
        assert env.api.post(f"vm/{guest['id']}/migrate",
                            json={"node": {"id": env.nodes["b"]["id"]}}).status_code == 200  # fmt: skip
    _, name, path = root_of(env, guest)
    identity = ceph.rbd_info(name)["id"]
    # b dies: its guest is powered off (fenced), and it answers no more
    conn = libvirt.open(env.host("b").uri)
    conn.lookupByName(guest["domain_name"]).destroy()
    conn.close()
    wrote = written(ceph, name)
    assert wrote > 0  # the guest's boot wrote on its clone
    env.api.update(f"node/{env.nodes['a']['id']}", json={"node_state": {"id": 1}})
    env.sql("UPDATE node SET unreachable_since = now() WHERE id = :id", id=env.nodes["b"]["id"])
    try:
        result = env.app.test_cli_runner().invoke(
            args=["vmapi", "node", "evacuate", env.nodes["b"]["fqdn"]]
        )
        assert result.exit_code == 0, result.output
        assert f"vm-{guest['id']}: on {env.nodes['a']['fqdn']} (running)" in result.output
        # not rebuilt from the image: the same clone, holding what the guest wrote
        assert ceph.rbd_info(name)["id"] == identity
        assert written(ceph, name) >= wrote
        assert (
            network_disk(env, "a", guest["domain_name"], "vda").find("source").get("name") == path
        )
        text = wait_for_ticks(env.console(guest["id"]), 1)
        assert boots(text) >= 1
    finally:
        env.sql("UPDATE node SET unreachable_since = NULL WHERE id = :id",
                id=env.nodes["b"]["id"])  # fmt: skip
        env.sql("UPDATE node SET node_state_id = 1 WHERE id = :id", id=env.nodes["b"]["id"])
        env.reconcile("--fix")  # b is back: what it kept of the guest goes


def test_saving_the_running_guest_makes_an_image_inside_the_cluster(
    env, ceph, rbd_type, guest, monkeypatch
):
    _, name, _ = root_of(env, guest)
    faults(env).calls.clear()
    spawned = record_processes(monkeypatch)
    saved = env.api.post(f"vm/{guest['id']}/image", json={"name": "saved"})
    monkeypatch.undo()
    assert saved.status_code == 201, saved.json
    image = saved.json["data"]
    assert (image["state"], image["format"], image["kind"]) == ("active", "raw", "snapshot")
    assert image["source"] == {"vm": {"id": guest["id"]}}
    # made in the cluster: no volume of a node copied, read or streamed
    assert not {"copy_disk_live", "clone_volume", "download_volume"} & set(faults(env).calls)
    in_ceph = f"{INSTALLATION}-image-{image['id']}"
    # and no byte through the API host: the manager flattened the copy (its progress
    # module completed the task), and the API host's Ceph client ran metadata commands
    # only (no rbd flatten/export/cp, no qemu-img, no other tool)
    assert f"{ceph.pool}/{in_ceph}" in flattens_done_by_the_manager(ceph)
    assert spawned.argv and spawned.moving_data() == []
    assert ["rbd", "task", "add", "flatten", f"{ceph.pool}/{in_ceph}"] in (
        spawned.manager_commands()
    )
    info = ceph.rbd_info(in_ceph)
    assert "parent" not in info  # flattened: it stands alone
    assert image["size"] == info["size"] == ceph.rbd_info(name)["size"]
    assert [s["name"] for s in snapshots(ceph, in_ceph)] == ["vmapi-base"]
    assert snapshots(ceph, name) == []  # the disk keeps no snapshot of the save
    assert env.sql("SELECT file FROM image WHERE id = :id", id=image["id"]) == [(None,)]
    # it boots in the rbd type, as a clone of itself; elsewhere it is refused, saying why
    local = env.api.post("vm", json={**create_body(env, rbd_type), "image": {"id": image["id"]},
                                     "root_storage_type": None})  # fmt: skip
    assert local.status_code == 409 and local.json["error_id"] == "image/not_active", local.json
    assert "Ceph" in local.json["message"]
    download = env.api.get(f"image/{image['id']}/file")
    assert download.status_code == 409 and download.json["error_id"] == "image/not_active"
    booted = env.api.post("vm", json={**create_body(env, rbd_type), "image": {"id": image["id"]}})
    assert booted.status_code == 201, booted.json
    _, clone, _ = root_of(env, booted.json["data"])
    assert ceph.rbd_info(clone)["parent"]["image"] == in_ceph
    wait_for_ticks(env.console(booted.json["data"]["id"]), 1)
    # the image goes with its RBD image once no VM boots from it
    assert env.api.delete(f"vm/{booted.json['data']['id']}").status_code == 200
    assert env.api.delete(f"image/{image['id']}").status_code == 200
    assert in_ceph not in ceph.rbd_images()
    assert env.sql("SELECT count(*) FROM image_rbd WHERE rbd_name = :n", n=in_ceph) == [(0,)]


def test_a_rebuild_gives_the_guest_a_new_clone_and_drops_the_old(env, ceph, guest, monkeypatch):
    """The new clone is made in process (librbd), as POST /vm's: no ``rbd`` tool runs."""
    _, old, _ = root_of(env, guest)
    read = env.console(guest["id"])
    before = boots(read())
    spawned = record_processes(monkeypatch)
    made_in_process = record_in_process(monkeypatch)
    try:
        done = env.api.post(f"vm/{guest['id']}/rebuild", json={"image": {"id": env.image["id"]}})
    finally:
        monkeypatch.undo()
    assert done.status_code == 200, done.json
    assert made_in_process.words()[:1] == ["clone"]
    assert [a for a in spawned.tools("rbd") if {"clone", "resize"} & set(a)] == []
    _storage, new, path = root_of(env, guest)
    assert new != old and "-r" in new and path == f"{ceph.pool}/{new}"
    assert ceph.rbd_info(new)["parent"]["image"] == parent_image(env)
    assert old not in ceph.rbd_images()  # the replaced clone went
    where_now = where(env, guest)
    vda = network_disk(env, where_now, guest["domain_name"], "vda")
    assert vda.get("type") == "network" and vda.find("source").get("name") == path
    console.wait_for(read, lambda text: boots(text) > before, "a boot from the new clone")


@pytest.mark.parametrize("failing", ["clone", "resize"])
def test_a_rebuild_whose_clone_fails_keeps_the_old_disk_and_leaves_nothing(env, ceph, guest,
                                                                          monkeypatch, failing):  # fmt: skip
    """The new clone, or its growth to the larger root_size, fails (librbd's I/O error,
    injected): 502 at its step, the VM keeps its root disk, its size and its domain's disk,
    and no new clone is left in the pool."""
    ident, old, path = root_of(env, guest)
    [(size,)] = env.sql("SELECT size FROM storage WHERE id = :i", i=ident)
    images = ours(ceph)
    made_in_process = record_in_process(monkeypatch)
    made_in_process.failing = failing
    try:
        done = env.api.post(f"vm/{guest['id']}/rebuild",
                            json={"image": {"id": env.image["id"]}, "root_size": size + 8 * MIB})  # fmt: skip
    finally:
        monkeypatch.undo()
    assert done.status_code == 502, done.json
    assert done.json["data"]["step"] == "creating the root disk", done.json
    assert "injected failure" in done.json["message"]
    assert made_in_process.words() == (["clone"] if failing == "clone" else ["clone", "resize"])
    assert root_of(env, guest) == (ident, old, path)
    assert env.sql("SELECT size FROM storage WHERE id = :i", i=ident) == [(size,)]
    assert ours(ceph) == images
    vda = network_disk(env, where(env, guest), guest["domain_name"], "vda")
    assert vda.find("source").get("name") == path
    assert env.domains(where(env, guest))[guest["domain_name"]] == "running"


@pytest.mark.parametrize("method,step", [("define", "defining the domain"),
                                         ("start", "starting the domain")])  # fmt: skip
def test_a_rebuild_failing_after_its_clone_removes_it_and_runs_the_old_disk(env, ceph, guest,
                                                                           method, step):  # fmt: skip
    """The new clone is made, then the domain's definition with it, or its start, fails:
    502 at that step, the new clone is removed from the pool, and the guest runs again on
    its old clone."""
    ident, old, path = root_of(env, guest)
    images = ours(ceph)
    faults(env).fail(method)
    done = env.api.post(f"vm/{guest['id']}/rebuild", json={"image": {"id": env.image["id"]}})
    assert done.status_code == 502, done.json
    assert done.json["data"]["step"] == step, done.json
    assert root_of(env, guest) == (ident, old, path)
    assert ours(ceph) == images
    vda = network_disk(env, where(env, guest), guest["domain_name"], "vda")
    assert vda.find("source").get("name") == path
    assert env.domains(where(env, guest))[guest["domain_name"]] == "running"


def test_a_quiesced_save_without_a_guest_agent_is_refused_and_leaves_nothing(env, ceph, guest):
    _, name, _ = root_of(env, guest)
    images = ours(ceph)
    [(rows,)] = env.sql("SELECT count(*) FROM image")
    saved = env.api.post(f"vm/{guest['id']}/image", json={"name": "quiet", "quiesce": True})
    assert saved.status_code == 409 and saved.json["error_id"] == "vm/no_guest_agent", saved.json
    assert ours(ceph) == images and snapshots(ceph, name) == []
    assert env.sql("SELECT count(*) FROM image") == [(rows,)]
    assert env.sql("SELECT count(*) FROM image_rbd WHERE image_id IS NULL") == [(0,)]


def create_body(env: MigrateEnv, rbd_type: dict) -> dict:
    return {"cores": 1, "ram": 256 * MIB, "virt_method": {"id": env.method},
            "image": {"id": env.image["id"]}, "node": {"id": env.nodes["a"]["id"]},
            "root_storage_type": {"id": rbd_type["id"]}}  # fmt: skip


@pytest.fixture
def fresh_image(env):
    """A small raw image of this test's own, not in the cluster yet; deleted after."""
    made = env.api.post("image", json={"name": "fresh", "format": "raw"})
    assert made.status_code == 201, made.json
    ident = made.json["data"]["id"]
    sent = env.api.call("PUT", f"image/{ident}/file", data=os.urandom(MIB), headers=OCTET)
    assert sent.status_code == 200, sent.json
    yield sent.json["data"]
    env.api.delete(f"image/{ident}")


def vms(env: MigrateEnv) -> list[str]:
    return sorted(env.api.get("vm").json["data"])


@pytest.mark.parametrize(
    "method", ["ensure_rbd_pool", "upload_volume", "define", "start", "domain"]
)
def test_a_failure_at_any_step_leaves_nothing_in_the_cluster(env, ceph, rbd_type, fresh_image,
                                                             method):  # fmt: skip
    """A failed create takes its clone (grown: its root disk is larger than the image),
    and the image it wrote (no other VM uses it)."""
    images, before, domains = ours(ceph), vms(env), env.domains("a")
    faults(env).fail(method)
    made = env.api.post("vm", json={**create_body(env, rbd_type), "root_size": 4 * MIB,
                                    "image": {"id": fresh_image["id"]}})  # fmt: skip
    assert made.status_code == 502, made.json
    assert ours(ceph) == images
    assert f"{INSTALLATION}-image-{fresh_image['id']}" not in ours(ceph)
    assert env.sql("SELECT count(*) FROM image_rbd WHERE image_id = :i",
                   i=fresh_image["id"]) == [(0,)]  # fmt: skip
    assert vms(env) == before and env.domains("a") == domains


def test_a_failure_keeps_the_image_other_vms_use(env, ceph, rbd_type, guest):
    images, before = ours(ceph), vms(env)
    assert parent_image(env) in images  # the guest's clone's parent
    faults(env).fail("start")
    assert env.api.post("vm", json=create_body(env, rbd_type)).status_code == 502
    assert ours(ceph) == images  # the parent stays for the guest, no second clone
    assert vms(env) == before


def test_a_name_taken_in_the_cluster_is_refused_and_left_alone(env, ceph, rbd_type):
    [(last, called)] = env.sql("SELECT last_value, is_called FROM storage_id_seq")
    foreign = f"{INSTALLATION}-storage-{last + 1 if called else last}"  # the next root disk
    ceph.run("rbd", "create", "--size", "4", f"{ceph.pool}/{foreign}")
    try:
        before = [n for n in ours(ceph) if n != foreign]
        made = env.api.post("vm", json=create_body(env, rbd_type))
        assert made.status_code == 409 and made.json["error_id"] == "vm/name_taken", made.json
        assert foreign in ceph.rbd_images()
        assert [n for n in ours(ceph) if n != foreign] == before
    finally:
        ceph.run("rbd", "rm", f"{ceph.pool}/{foreign}")


def test_reconcile_owns_images_in_ceph_and_removes_a_deleted_image_s(env, ceph, rbd_type):
    """An image's RBD image is vmapi's (never unowned_volume); one whose image was deleted
    while the cluster was out of reach (a row without image) is stale_image_rbd, and
    --fix removes it."""
    if parent_image(env) not in ceph.rbd_images():
        assert env.api.post("vm", json=create_body(env, rbd_type)).status_code == 201
    code, output = env.reconcile()
    assert "unowned_volume" not in output and "-image-" not in output, output
    left = f"{INSTALLATION}-image-999"
    ceph.run("rbd", "create", "--size", "4", f"{ceph.pool}/{left}")
    ceph.run("rbd", "snap", "create", f"{ceph.pool}/{left}@vmapi-base")
    ceph.run("rbd", "snap", "protect", f"{ceph.pool}/{left}@vmapi-base")
    env.sql("INSERT INTO image_rbd (image_id, storage_type_id, ceph_pool, rbd_name, snapshot, "
            "created_at) VALUES (NULL, :t, :p, :n, 'vmapi-base', now())",
            t=rbd_type["id"], p=ceph.pool, n=left)  # fmt: skip
    code, output = env.reconcile()
    assert code == 1 and "stale_image_rbd" in output and left in output, output
    code, output = env.reconcile("--fix")
    assert left not in ceph.rbd_images()
    assert env.sql("SELECT count(*) FROM image_rbd WHERE rbd_name = :n", n=left) == [(0,)]


def clone_as_a_create_dying_before_its_claim(env: MigrateEnv, rbd_type: dict) -> str:
    """A root disk's clone left as a worker killed between its start and the claim's
    commit leaves it: an id taken from the storage rows' sequence, the clone made by the
    API host's in-process client under that id's name (as early_clone makes it), then
    neither the row nor the undo (the worker is dead); its name."""
    [(storage_id,)] = env.sql("SELECT nextval(pg_get_serial_sequence('storage', 'id'))")
    with env.app.app_context():
        storage_type = db.session.get(StorageType, rbd_type["id"])
        parent = db.session.scalars(
            select(ImageRbd).where(ImageRbd.rbd_name == parent_image(env))
        ).one()
        clone = start_clone(librbd_client(storage_type), parent, storage_id,
                            env.image["virtual_size"], Undo())  # fmt: skip
        assert clone.cloning.wait(), clone.cloning.error
        db.session.remove()
    return clone.name


def test_reconcile_removes_a_clone_whose_create_died_before_its_claim(env, ceph, rbd_type,
                                                                      monkeypatch):  # fmt: skip
    """A root disk cloned before its create's claim whose row never committed (the worker
    died) is reported as unowned_volume while younger than BUILD_TIMEOUT (a create may
    still be running) and left; once older it is abandoned_clone, which --fix removes.
    Other unowned images are reported and left: a clone under an id above the sequence's
    last value (a future row's), one named otherwise (a rebuilt root disk's form), and an
    image that is no clone under a taken id (a stranger in the way of a name)."""
    if parent_image(env) not in ceph.rbd_images():
        assert env.api.post("vm", json=create_body(env, rbd_type)).status_code == 201
    images = ours(ceph)
    leak = clone_as_a_create_dying_before_its_claim(env, rbd_type)
    number = int(leak.rsplit("-", 1)[1])
    base = f"{ceph.pool}/{parent_image(env)}@vmapi-base"
    future = f"{INSTALLATION}-storage-{number + 1000}"
    rebuilt = f"{leak}-r0a1b2c"
    [(taken,)] = env.sql("SELECT nextval(pg_get_serial_sequence('storage', 'id'))")
    stranger = f"{INSTALLATION}-storage-{taken}"
    for name in (future, rebuilt):
        ceph.run("rbd", "clone", base, f"{ceph.pool}/{name}")
    ceph.run("rbd", "create", "--size", "4", f"{ceph.pool}/{stranger}")
    others = (future, rebuilt, stranger)
    try:
        for args in ((), ("--fix",)):  # young: reported, never removed
            code, output = env.reconcile(*args)
            assert code == 1 and "abandoned_clone" not in output, output
            for name in (leak, *others):
                [line] = [line for line in output.splitlines() if f"rbd/{name} " in line]
                assert line.startswith("found") and "unowned_volume" in line, output
        assert set(ours(ceph)) == {*images, leak, *others}

        monkeypatch.setitem(env.app.config, "BUILD_TIMEOUT", 0)
        time.sleep(1.1)  # (creation times are whole seconds)
        code, output = env.reconcile()
        assert code == 1, output
        [line] = [line for line in output.splitlines() if "abandoned_clone" in line]
        assert line.startswith("found") and f"rbd/{leak} " in line, output
        assert f"storage id {number} " in line and parent_image(env) in line
        assert leak in ceph.rbd_images()
        code, output = env.reconcile("--fix")
        [line] = [line for line in output.splitlines() if "abandoned_clone" in line]
        assert line.startswith("fixed") and f"rbd/{leak} " in line, output
        assert leak not in ceph.rbd_images()
        for name in others:
            [line] = [line for line in output.splitlines() if f"rbd/{name} " in line]
            assert line.startswith("found") and "unowned_volume" in line, output
        assert set(ours(ceph)) == {*images, *others}
    finally:
        for name in (leak, *others):
            if name in ceph.rbd_images():
                ceph.run("rbd", "rm", "--no-progress", f"{ceph.pool}/{name}")


def test_the_clone_has_root_size_before_the_domain_starts(env, ceph, rbd_type, monkeypatch):
    """A root disk larger than its image: the API host's in-process client clones the
    image's snapshot and grows the clone to root_size (no ``rbd`` process: no clone, no
    resize on a command line) before the domain starts, so QEMU opens it at root_size
    and the guest never sees the image's size; then libvirt and the cluster agree."""
    size = round_up(env.image["virtual_size"]) + 8 * MIB
    at_start: list[tuple[str, dict]] = []

    def before(method: str, uri: str, args: tuple) -> None:
        if method == "start":
            [(name,)] = env.sql("SELECT volume_name FROM storage WHERE boot AND vm_id = "
                                "(SELECT id FROM vm WHERE domain_name = :d)", d=args[0])  # fmt: skip
            at_start.append((name, ceph.rbd_info(name)))

    faults(env).before = before
    faults(env).calls.clear()
    spawned = record_processes(monkeypatch)
    made_in_process = record_in_process(monkeypatch)
    try:
        made = env.api.post("vm", json={**create_body(env, rbd_type), "root_size": size})
    finally:
        faults(env).before = None
        monkeypatch.undo()
    assert made.status_code == 201, made.json
    vm = made.json["data"]
    try:
        _, name, _ = root_of(env, vm)
        [(seen, info)] = at_start
        assert seen == name and info["size"] == size  # root_size before QEMU opened it
        assert info["parent"]["image"] == parent_image(env)
        assert info["parent"]["snapshot"] == "vmapi-base"
        assert made_in_process.words() == ["clone", "resize"]
        assert [a for a in spawned.tools("rbd") if {"clone", "resize"} & set(a)] == []
        assert ceph.rbd_info(name)["size"] == size
        assert "resize_disk_live" not in faults(env).calls and "resume" not in faults(env).calls
        conn = libvirt.open(env.host("a").uri)
        try:
            dom = conn.lookupByName(vm["domain_name"])
            assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
            assert dom.blockInfo("vda")[0] == size
        finally:
            conn.close()
        wait_for_ticks(env.console(vm["id"]), 1)
    finally:
        assert env.api.delete(f"vm/{vm['id']}").status_code == 200


def test_the_clone_is_made_while_the_create_goes_on(env, ceph, rbd_type, monkeypatch):
    """The root disk's clone runs while the create defines the domain (made slow here,
    1 s: the definition happens between its start and its end), and the domain starts
    once it is done."""
    made_in_process = record_in_process(monkeypatch)
    made_in_process.slow = ("clone", 1.0)
    called: list[tuple[str, float]] = []
    faults(env).before = lambda method, uri, args: called.append((method, time.monotonic()))
    try:
        made = env.api.post("vm", json=create_body(env, rbd_type))
    finally:
        faults(env).before = None
        monkeypatch.undo()
    assert made.status_code == 201, made.json
    try:
        [(_, started, _)] = [t for t in made_in_process.times if t[0] == "clone"]
        ended = max(t[2] for t in made_in_process.times)  # the growth after it
        [defined] = [at for method, at in called if method == "define"]
        [start] = [at for method, at in called if method == "start"]
        assert started < defined < ended < start
    finally:
        assert env.api.delete(f"vm/{made.json['data']['id']}").status_code == 200


@pytest.mark.parametrize("failing", ["define", "upload_volume", "clone", "resize"])
def test_a_failure_beside_the_running_clone_leaves_nothing(env, ceph, rbd_type, fresh_image,
                                                           monkeypatch, failing):  # fmt: skip
    """A step that fails while the clone is still running (the seed's upload, the
    definition): the undo waits for the clone, then removes it. The clone, or its growth
    to root_size, failing while the rest went well: the domain and everything else go
    (a clone whose growth failed first of all), 502 at its step."""
    images, before, domains = ours(ceph), vms(env), env.domains("a")
    made_in_process = record_in_process(monkeypatch)
    made_in_process.slow = ("clone", 1.0)
    if failing in ("clone", "resize"):
        made_in_process.failing = failing
    else:
        faults(env).fail(failing)
    try:
        made = env.api.post("vm", json={**create_body(env, rbd_type), "root_size": 4 * MIB,
                                        "image": {"id": fresh_image["id"]}})  # fmt: skip
    finally:
        monkeypatch.undo()
    assert made.status_code == 502, made.json
    if failing in ("clone", "resize"):
        assert made.json["data"]["step"] == "creating the root disk", made.json
        assert "injected failure" in made.json["message"]
    assert ours(ceph) == images
    assert env.sql("SELECT count(*) FROM image_rbd WHERE image_id = :i",
                   i=fresh_image["id"]) == [(0,)]  # fmt: skip
    assert vms(env) == before and env.domains("a") == domains


def refused_claim(env: MigrateEnv, guest: dict, monkeypatch, failure: str) -> tuple[dict, int, str]:
    """A create of ``guest``'s image that its claim refuses by ``failure``: its body, and
    the status and error id it is answered with."""
    body = create_body(env, {"id": root_type_of(env, guest)})
    if failure == "quota":
        made = env.api.post("quota", json={"customer_id": 4711, "max_vms": 0})
        assert made.status_code == 201, made.json
        return {**body, "customer_id": 4711}, 403, "vm/quota_exceeded"
    if failure == "no_valid_host":
        del body["node"]
        return {**body, "ram": 1024 * 1024 * MIB}, 409, "vm/no_valid_host"
    if failure == "uuid":
        node = env.nodes[where(env, guest)]
        return {**body, "node": {"id": node["id"]}, "uuid": guest["uuid"]}, 409, "vm/uuid_conflict"
    assert failure == "database"  # the claim's commit fails (the connection dropped)

    def lost(ids: list[int]) -> None:
        db.session.rollback()
        raise OperationalError("COMMIT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(placed_module, "commit_building", lost)
    return body, 503, "general/unavailable"


def root_type_of(env: MigrateEnv, vm: dict) -> int:
    [(type_id,)] = env.sql("SELECT storage_type_id FROM storage WHERE vm_id = :id AND boot",
                           id=vm["id"])  # fmt: skip
    return type_id


@pytest.mark.parametrize("failure", ["quota", "no_valid_host", "uuid", "database"])
def test_the_clone_starts_before_the_claim_and_goes_with_its_failure(env, ceph, guest,
                                                                    monkeypatch, failure):  # fmt: skip
    """The image in the cluster already: the root disk's clone starts before the create's
    claim (it needs no node), so a claim that fails (the quota, no node to take the VM,
    the UUID, the database) still had it started: the undo waits for it (slow here, 1 s),
    then removes it. Nothing is left: no RBD image, no VM, no storage row."""
    images, before = ours(ceph), vms(env)
    rows = env.sql("SELECT count(*) FROM storage")
    body, status, error_id = refused_claim(env, guest, monkeypatch, failure)
    made_in_process = record_in_process(monkeypatch)
    made_in_process.slow = ("clone", 1.0)
    try:
        made = env.api.post("vm", json=body)
    finally:
        monkeypatch.undo()
        env.sql("DELETE FROM quota WHERE customer_id = 4711")
    assert made.status_code == status and made.json["error_id"] == error_id, made.json
    assert made_in_process.words()[:1] == ["clone"]  # started all the same, then removed
    assert ours(ceph) == images
    assert vms(env) == before and env.sql("SELECT count(*) FROM storage") == rows


def test_an_idempotent_create_whose_claim_failed_clones_once_on_its_retry(env, ceph, guest,
                                                                         monkeypatch):  # fmt: skip
    """The claim's commit lost under an Idempotency-Key: the early clone goes with it and
    the key is given up; the retry with the same key makes the VM, one clone."""
    images, before = ours(ceph), vms(env)
    body, status, _ = refused_claim(env, guest, monkeypatch, "database")
    key = {"Idempotency-Key": f"rbd-early-{time.monotonic_ns()}"}
    try:
        failed = env.api.post("vm", json=body, headers=key)
    finally:
        monkeypatch.undo()
    assert failed.status_code == status, failed.json
    assert ours(ceph) == images and vms(env) == before
    made = env.api.post("vm", json=body, headers=key)
    assert made.status_code == 201, made.json
    try:
        again = env.api.post("vm", json=body, headers=key)
        assert again.status_code == 201 and again.json["data"]["id"] == made.json["data"]["id"]
        _, name, path = root_of(env, made.json["data"])
        assert [n for n in ours(ceph) if n not in images] == [name]
        assert path == f"{ceph.pool}/{name}"
        assert ceph.rbd_info(name)["parent"]["image"] == parent_image(env)
    finally:
        assert env.api.delete(f"vm/{made.json['data']['id']}").status_code == 200
    assert ours(ceph) == images


def test_a_key_this_host_cannot_read_starts_no_clone_and_answers_after_the_claim(
    env, ceph, guest, monkeypatch, tmp_path
):
    """No early clone without the Ceph key: the claim answers first (the quota here), as
    it did before the clone started early; within the quota the key's 503 comes at its
    step, nothing made."""
    images, before = ours(ceph), vms(env)
    body, status, error_id = refused_claim(env, guest, monkeypatch, "quota")
    monkeypatch.setitem(env.app.config, "CEPH_KEY_DIR", str(tmp_path))  # no key file there
    made_in_process = record_in_process(monkeypatch)
    try:
        refused = env.api.post("vm", json=body)
        env.sql("DELETE FROM quota WHERE customer_id = 4711")
        unreadable = env.api.post("vm", json=body)
    finally:
        monkeypatch.undo()
        env.sql("DELETE FROM quota WHERE customer_id = 4711")
    assert refused.status_code == status and refused.json["error_id"] == error_id, refused.json
    assert unreadable.status_code == 503, unreadable.json
    assert unreadable.json["data"]["step"] == "reading the Ceph key"
    assert made_in_process.words() == []
    assert ours(ceph) == images and vms(env) == before
