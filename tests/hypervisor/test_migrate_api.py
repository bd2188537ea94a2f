"""Moving VMs through the API between two real libvirtd hosts (the ``host_pair`` fixture):
nodes ``a`` and ``b`` of one vmapi, each with its own pool folder, ``type='qemu'`` guests
booted from the test image uploaded through the API.

A guest counts on its serial console; its console log, read through the API on whatever
node it is, shows that a move never restarted it. libvirt on each host says where each
domain is, and that nothing is left on the other. Faults are injected by wrapping the
real driver (tests/faults.py) or the step that records a move; everything else is real.
One guest boot serves the module: before each test, ``home`` puts the world back where
every test starts (both nodes up, the guest running on a with only its root disk, no
other VM), whatever ran before, so the tests pass in any order and alone; a test that
needs the guest elsewhere, or with more disks, makes that itself.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import libvirt
import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from tests.conftest import MIB
from tests.faults import FaultyDriver
from tests.guest import console
from tests.hypervisor.migrate_env import INSTALLATION, boots, migrate_env, ticks, wait_for_ticks
from vmapi.extensions import db
from vmapi.hypervisor.libvirt.config import StoragePool
from vmapi.models import ImageCopy
from vmapi.services.images.copies import remove_if_unused
from vmapi.services.moves import books as moves
from vmapi.services.nodes.hosts import DRIVER_KEY

pytestmark = [pytest.mark.hypervisor]


@pytest.fixture(scope="module")
def env(host_pair, guest_image, pg_server, tmp_path_factory):
    store = tmp_path_factory.mktemp("images")
    with migrate_env(pg_server, host_pair, guest_image.path, store) as made:
        yield made


@pytest.fixture(scope="module")
def guest(env):
    """A VM booted from the image on node a, counting on its console."""
    vm = env.create("a")
    wait_for_ticks(env.console(vm["id"]), 2)
    return vm


@pytest.fixture(scope="module")
def shared_type(env) -> int:
    """A pool both hosts see in one folder, as an NFS mount would be (``vmapi-shared``),
    and a storage type on it: its id."""
    folder = env.hosts.shared / "pool"
    folder.mkdir(mode=0o755, exist_ok=True)
    for name in ("a", "b"):
        conn = libvirt.open(env.host(name).uri)
        pool = conn.storagePoolDefineXML(StoragePool("vmapi-shared", str(folder)).to_xml(), 0)
        pool.create(0)
        conn.close()
    kind = {"name": "shared-raw", "description": "raw volumes every node sees",
            "pool": "vmapi-shared", "format": "raw", "shared": True}  # fmt: skip
    made = env.api.post("storage_type", json=kind)
    assert made.status_code == 201 and made.json["data"]["shared"] is True, made.json
    return made.json["data"]["id"]


@pytest.fixture(autouse=True)
def home(env, guest):
    """Where every test starts: nodes a and b up and schedulable, no VM but the guest, the
    guest running on a with its root disk only."""
    env.sql("UPDATE node SET unreachable_since = NULL")
    for name in "ab":
        up = env.api.update(f"node/{env.nodes[name]['id']}", json={"node_state": {"id": 1}})
        assert up.status_code == 200, up.json
    for vm in env.api.get("vm").json["data"].values():
        if vm["id"] != guest["id"]:
            assert env.api.delete(f"vm/{vm['id']}?cascade=storage").status_code == 200
    if env.api.get(f"vm/{guest['id']}").json["data"]["vm_state"] != {"id": 2}:
        running = env.api.update(f"vm/{guest['id']}", json={"vm_state": {"id": 2}})
        assert running.status_code == 200, running.json
    if where(env, guest) != "a":
        back = move(env, guest, node={"id": env.nodes["a"]["id"]})
        assert back.status_code == 200, back.json
    for storage in env.api.get(f"storage?vm.id={guest['id']}").json["data"].values():
        if not storage["boot"]:
            assert env.api.delete(f"storage/{storage['id']}").status_code == 200
    assert_stayed(env, guest, "a", {"a": 1, "b": 0})


def no_copy_on(env, name: str) -> None:
    """The node keeps no copy of the image (a move there has to make one)."""
    with env.app.app_context():
        node = env.nodes[name]["id"]
        for copy in db.session.scalars(select(ImageCopy).where(ImageCopy.node_id == node)).all():
            assert remove_if_unused(copy.id)
        db.session.remove()


@pytest.fixture
def faults(env):
    real = env.app.extensions[DRIVER_KEY]
    env.app.extensions[DRIVER_KEY] = FaultyDriver(real)
    yield env.app.extensions[DRIVER_KEY]
    env.app.extensions[DRIVER_KEY] = real


def where(env, vm) -> str:
    node = env.api.get(f"vm/{vm['id']}").json["data"]["node"]["id"]
    return next(name for name, n in env.nodes.items() if n["id"] == node)


def allocated(env) -> dict[str, int]:
    return {n: env.api.get(f"node/{env.nodes[n]['id']}").json["data"]["allocated_cores"]
            for n in "ab"}  # fmt: skip


def move(env, vm, **body):
    return env.api.post(f"vm/{vm['id']}/migrate", json=body)


def assert_stayed(env, vm, on: str, cores: dict[str, int], state: str = "running") -> None:
    """The VM is where it was, with nothing of it on the other host."""
    other = "b" if on == "a" else "a"
    assert where(env, vm) == on
    assert env.domains(on)[vm["domain_name"]] == state
    assert vm["domain_name"] not in env.domains(other)
    assert allocated(env) == cores
    assert env.sql("SELECT migration_node_id FROM vm WHERE id = :id", id=vm["id"]) == [(None,)]
    assert env.sql("SELECT node_id, kind, name FROM leftover") == []


# ---------------------------------------------------------------------- failures first
def test_a_failed_image_copy_leaves_nothing_on_the_target(env, guest, faults):
    no_copy_on(env, "b")
    faults.fail("upload_volume")  # the copy of the image to b
    response = move(env, guest, node={"id": env.nodes["b"]["id"]})
    assert response.status_code == 502, response.json
    root = env.sql("SELECT id FROM storage WHERE vm_id = :id AND boot", id=guest["id"])[0][0]
    assert response.json["data"]["step"] == f"copying the image of storage {root} to the target"
    assert response.json["data"]["node"] == {"id": env.nodes["b"]["id"]}
    assert_stayed(env, guest, "a", {"a": 1, "b": 0})
    assert env.volumes("b") == []  # no copy, no overlay
    assert env.sql("SELECT node_id FROM image_copy") == [(env.nodes["a"]["id"],)]
    before = ticks(env.console(guest["id"])())
    wait_for_ticks(env.console(guest["id"]), 1, after=before[-1])


def test_a_migration_that_raises_is_undone(env, guest, faults):
    no_copy_on(env, "b")  # the move makes one there, and its undo removes it
    faults.fail("migrate")
    response = move(env, guest, node={"id": env.nodes["b"]["id"]})
    assert response.status_code == 502, response.json
    assert response.json["data"]["step"] == "moving the domain"
    assert "stays on" in response.json["message"]
    assert_stayed(env, guest, "a", {"a": 1, "b": 0})
    # the overlay made on b and the image copy this move made there are gone again
    assert env.volumes("b") == []
    assert {"create_overlay", "delete_volume"} <= set(faults.calls)


class Throttled:
    """The real driver, its migrations capped at 1 MiB/s: a guest of 256 MiB cannot move
    within the few seconds the app gives it here, whatever the machine's speed."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        target = getattr(self.real, name)
        if name != "migrate":
            return target
        return lambda *args, **kwargs: target(*args, **{**kwargs, "bandwidth": 1})


def test_a_move_past_its_time_is_aborted_and_the_guest_runs_on(env, guest):
    real = env.app.extensions[DRIVER_KEY]
    env.app.extensions[DRIVER_KEY] = Throttled(real)
    env.app.config["MIGRATION_TIMEOUT"] = 3.0
    booted = boots(env.console(guest["id"])())
    try:
        response = move(env, guest, node={"id": env.nodes["b"]["id"]})
    finally:
        env.app.extensions[DRIVER_KEY] = real
        env.app.config["MIGRATION_TIMEOUT"] = 120.0
    assert response.status_code == 504, response.json
    assert response.json["error_id"] == "vm/hypervisor_timeout"
    assert response.json["data"]["step"] == "moving the domain"
    assert "keeps running" in response.json["message"]
    assert_stayed(env, guest, "a", {"a": 1, "b": 0})
    assert [v for v in env.volumes("b") if "storage" in v] == []  # no overlay left on b
    text = env.console(guest["id"])()
    assert boots(text) == booted  # not restarted
    wait_for_ticks(env.console(guest["id"]), 1, after=ticks(text)[-1])


def failing_record(monkeypatch, times: int) -> None:
    """The database fails when the move is recorded, ``times`` times."""
    real, calls = moves._record_once, {"n": 0}

    def record_once(move, state):
        calls["n"] += 1
        if calls["n"] <= times:
            db.session.rollback()
            raise OperationalError("COMMIT", {}, Exception("server closed the connection"))
        return real(move, state)

    monkeypatch.setattr(moves, "_record_once", record_once)


def test_the_database_failing_after_the_move_records_it_where_it_is(env, guest, monkeypatch):
    failing_record(monkeypatch, times=1)  # once: the record is tried again
    response = move(env, guest, node={"id": env.nodes["b"]["id"]})
    assert response.status_code == 200, response.json
    assert_stayed(env, guest, "b", {"a": 0, "b": 1})

    failing_record(monkeypatch, times=2)  # for good: the marker stays, reconcile settles it
    response = move(env, guest, node={"id": env.nodes["a"]["id"]})
    assert response.status_code == 503, response.json
    assert response.json["data"] == {"step": "recording the move",
                                     "node": {"id": env.nodes["a"]["id"]}, "moved": True}  # fmt: skip
    assert env.domains("a")[guest["domain_name"]] == "running"  # libvirt moved it
    assert guest["domain_name"] not in env.domains("b")
    monkeypatch.undo()
    code, output = env.reconcile()
    assert code == 1 and "interrupted_move" in output, output
    code, output = env.reconcile("--fix")
    assert code == 0 and "was recorded" in output, output
    assert_stayed(env, guest, "a", {"a": 1, "b": 0})
    assert env.volumes("b") == [f"{INSTALLATION}-image-{env.image['id']}"]  # the copy stays


# ---------------------------------------------------------------------- moves
def test_a_live_move_there_and_back_never_restarts_the_guest(env, guest):
    read = env.console(guest["id"])
    seen = ticks(read())
    for target, body in (("b", {"node": {"id": env.nodes["b"]["id"]}}), ("a", {})):
        source = "b" if target == "a" else "a"
        response = move(env, guest, **body)  # back: the scheduler picks the only other node
        assert response.status_code == 200, response.json
        assert response.json["data"]["node"] == {"id": env.nodes[target]["id"]}
        assert (
            "moved live" in response.json["message"]
            and "ms at the switch-over" in (response.json["message"])
        )
        assert_stayed(env, guest, target, {source: 0, target: 1})
        # the log on the new node goes on counting where the old one stopped: no boot
        text = wait_for_ticks(read, 2, after=seen[-1])
        assert boots(text) == 0, text
        here = ticks(text)
        assert here[0] > seen[-1] and here == list(range(here[0], here[0] + len(here)))
        seen = here
        # its seed is on the new node; nothing of the guest is left on the source:
        # volumes (root disk, seed), console log
        [(seed,)] = env.sql("SELECT seed_path FROM vm WHERE id = :id", id=guest["id"])
        assert Path(seed).parent == env.pool(target) and Path(seed).exists()
        assert [v for v in env.volumes(source) if "storage" in v or "seed" in v] == []
        assert [v for v in env.volumes(source, "vmapi-logs") if guest["domain_name"] in v] == []
    events = env.api.get(f"event?action=migrate&object_id={guest['id']}&outcome=ok").json["data"]
    last = list(events.values())[-2:]
    assert [(e["before"]["node_id"], e["after"]["node_id"], e["after"]["kind"]) for e in last] == [
        (env.nodes["a"]["id"], env.nodes["b"]["id"], "live"),
        (env.nodes["b"]["id"], env.nodes["a"]["id"], "live"),
    ]
    assert all(e["after"]["downtime_ms"] >= 0 for e in last)


def test_a_paused_vm_moves_live_and_stays_paused(env, guest):
    assert env.api.update(f"vm/{guest['id']}", json={"vm_state": {"id": 3}}).status_code == 200
    response = move(env, guest)
    assert response.status_code == 200, response.json
    assert response.json["data"]["vm_state"] == {"id": 3}
    assert_stayed(env, guest, "b", {"a": 0, "b": 1}, state="paused")
    seen = ticks(env.console(guest["id"])())
    assert env.api.update(f"vm/{guest['id']}", json={"vm_state": {"id": 2}}).status_code == 200
    text = wait_for_ticks(env.console(guest["id"]), 2, after=seen[-1] if seen else 0)
    assert boots(text) == 0


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


def data_volume(env, vm, size=32 * MIB) -> tuple[int, str]:
    """A raw data volume of the VM filled with random bytes (written into its file, which
    the test reaches: both hosts' pool folders are on this machine); id and checksum."""
    made = env.api.post("storage", json={"size": size, "vm": {"id": vm["id"]},
                                         "storage_type": {"id": 2}})  # fmt: skip
    assert made.status_code == 201, made.json
    [(path,)] = env.sql("SELECT path FROM storage WHERE id = :id", id=made.json["data"]["id"])
    with open(path, "r+b") as f:
        f.write(os.urandom(size))
    return made.json["data"]["id"], sha256(path)


def test_copied_disks_keep_their_content_live_and_cold(env, guest):
    storage, checksum = data_volume(env, guest)
    [(old,)] = env.sql("SELECT path FROM storage WHERE id = :id", id=storage)
    response = move(env, guest)  # a -> b, the data volume copied by libvirt
    assert response.status_code == 200, response.json
    [(node, path)] = env.sql("SELECT node_id, path FROM storage WHERE id = :id", id=storage)
    assert node == env.nodes["b"]["id"] and Path(path).parent == env.pool("b")
    assert sha256(path) == checksum
    assert not Path(old).exists()  # a's copy went
    # A VM without an image (nothing boots) moves cold: its volume copied through streams.
    body = {"cores": 1, "ram": 128 * MIB, "virt_method": {"id": env.method},
            "node": {"id": env.nodes["a"]["id"]}}  # fmt: skip
    plain = env.api.post("vm", json=body).json["data"]
    storage, checksum = data_volume(env, plain, size=16 * MIB)
    assert (
        env.api.update(f"vm/{plain['id']}?force=true", json={"vm_state": {"id": 4}}).status_code
        == 200
    )
    response = move(env, plain, live=False)
    assert response.status_code == 200, response.json
    assert "moved cold" in response.json["message"]
    assert env.domains("b")[plain["domain_name"]] == "shutoff"
    assert plain["domain_name"] not in env.domains("a")
    [(path,)] = env.sql("SELECT path FROM storage WHERE id = :id", id=storage)
    assert Path(path).parent == env.pool("b") and sha256(path) == checksum
    # it starts on b from its volume there
    assert env.api.update(f"vm/{plain['id']}", json={"vm_state": {"id": 2}}).status_code == 200
    assert env.domains("b")[plain["domain_name"]] == "running"
    assert env.api.delete(f"vm/{plain['id']}?cascade=storage").status_code == 200


def shared_volume(env, vm, shared_type: int) -> tuple[int, str]:
    """A volume of the VM in the shared pool, filled with random bytes: id and path."""
    body = {"size": 8 * MIB, "vm": {"id": vm["id"]}, "storage_type": {"id": shared_type}}
    made = env.api.post("storage", json=body)
    assert made.status_code == 201, made.json
    [(path,)] = env.sql("SELECT path FROM storage WHERE id = :id", id=made.json["data"]["id"])
    assert Path(path).parent == env.hosts.shared / "pool"
    with open(path, "r+b") as f:
        f.write(os.urandom(8 * MIB))
    return made.json["data"]["id"], path


def test_a_volume_of_a_shared_pool_stays_where_it_is(env, guest, shared_type):
    storage, path = shared_volume(env, guest, shared_type)
    checksum = sha256(path)
    source = where(env, guest)
    target = "b" if source == "a" else "a"
    response = move(env, guest)
    assert response.status_code == 200, response.json
    assert_stayed(env, guest, target, {source: 0, target: 1})
    [(node, after)] = env.sql("SELECT node_id, path FROM storage WHERE id = :id", id=storage)
    assert (node, after) == (env.nodes[target]["id"], path)  # the same file, the target's
    assert sha256(path) == checksum
    assert move(env, guest).status_code == 200  # and back
    assert_stayed(env, guest, source, {source: 1, target: 0})
    assert sha256(path) == checksum


def test_a_shut_off_image_vm_moves_cold_only_where_the_image_copies_share_a_path(env):
    vm = env.create("a")
    assert (
        env.api.update(f"vm/{vm['id']}?force=true", json={"vm_state": {"id": 4}}).status_code == 200
    )
    response = move(env, vm)
    assert response.status_code == 409, response.json
    assert response.json["error_id"] == "vm/state_conflict"
    assert "move it live" in response.json["message"]
    assert vm["domain_name"] not in env.domains("b") and where(env, vm) == "a"
    assert env.api.delete(f"vm/{vm['id']}").status_code == 200


# ---------------------------------------------------------------------- drain, evacuate
def test_drain_empties_a_host_of_three_vms(env, guest):
    others = [env.create("a") for _ in range(2)]
    vms = [guest, *others]
    assert {where(env, vm) for vm in vms} == {"a"}
    for vm in others:
        wait_for_ticks(env.console(vm["id"]), 1)
    seen = {vm["id"]: ticks(env.console(vm["id"])())[-1] for vm in vms}
    result = env.app.test_cli_runner().invoke(args=["vmapi", "node", "drain",
                                                    env.nodes["a"]["fqdn"]])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "3 moved, 0 not moved" in result.output
    assert env.domains("a") == {}
    assert env.domains("b") == {vm["domain_name"]: "running" for vm in vms}
    assert env.api.get(f"node/{env.nodes['a']['id']}").json["data"]["node_state"] == {"id": 2}
    for vm in vms:
        text = wait_for_ticks(env.console(vm["id"]), 1, after=seen[vm["id"]])
        assert boots(text) == 0
    assert [v for v in env.volumes("a") if "storage" in v] == []
    assert env.reconcile() == (0, "0 finding(s), 0 fixed, 0 left\n")  # both hosts clean


def evacuate(env, *flags: str):
    args = ["vmapi", "node", "evacuate", env.nodes["b"]["fqdn"], *flags]
    return env.app.test_cli_runner().invoke(args=args)


def test_evacuating_a_dead_host_rebuilds_its_vms_and_reconcile_cleans_it_when_back(
    env, guest, shared_type
):
    # on b: the guest with a data volume there (lost with b) and one in the shared pool
    # (which b's QEMU keeps open), and a second VM of the image
    assert move(env, guest).status_code == 200
    data_volume(env, guest)
    shared_volume(env, guest, shared_type)
    env.create("b")
    vms = [vm for vm in env.api.get("vm").json["data"].values()]
    assert {where(env, vm) for vm in vms} == {"b"}
    env.api.update(f"node/{env.nodes['a']['id']}", json={"node_state": {"id": 1}})
    env.sql("UPDATE node SET unreachable_since = now() WHERE id = :id", id=env.nodes["b"]["id"])
    result = evacuate(env)
    # the guest's data volume on b: its content would be lost
    [(storage,)] = env.sql("SELECT id FROM storage WHERE vm_id = :id AND storage_type_id = 2",
                           id=guest["id"])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert f"NOT rebuilt  vm-{guest['id']}: its storage [{storage}] is on the dead node" in (
        result.output
    )
    assert f"{len(vms) - 1} rebuilt, 1 not rebuilt" in result.output
    assert where(env, guest) == "b" and guest["domain_name"] not in env.domains("a")
    # b is not dead at all: its QEMU holds the guest's shared volume, and the one on a is
    # refused it (QEMU's image locks); the rebuild is undone
    result = evacuate(env, "--accept-data-loss")
    assert result.exit_code == 1 and "starting the domain on the target" in result.output
    assert where(env, guest) == "b" and guest["domain_name"] not in env.domains("a")
    assert allocated(env) == {"a": len(vms) - 1, "b": 1}
    # fenced: b's guest is powered off, as it would be on a host that really died
    conn = libvirt.open(env.host("b").uri)
    conn.lookupByName(guest["domain_name"]).destroy()
    conn.close()
    result = evacuate(env, "--accept-data-loss")
    assert result.exit_code == 0, result.output
    assert (
        f"vm-{guest['id']}: on {env.nodes['a']['fqdn']} (running); storage [{storage}] made "
        in (result.output)
    )
    assert env.api.get(f"node/{env.nodes['b']['id']}").json["data"]["node_state"] == {"id": 3}
    assert env.domains("a") == {vm["domain_name"]: "running" for vm in vms}
    for vm in vms:  # booted anew on a from the image, with its seed made there
        text = wait_for_ticks(env.console(vm["id"]), 1)
        assert boots(text) == 1
        assert {"meta-data", "user-data", "network-config"} <= set(console.boots(text)[0].cidata), (
            text
        )
    # b comes back, still running the old domains: reconcile removes them and their disks
    env.sql("UPDATE node SET unreachable_since = NULL WHERE id = :id", id=env.nodes["b"]["id"])
    code, output = env.reconcile()
    assert code == 1 and output.count("leftover") >= 2 * len(vms), output
    code, output = env.reconcile("--fix")
    assert code == 0, output
    assert env.domains("b") == {}
    assert [v for v in env.volumes("b") if "storage" in v or "seed" in v] == []
    assert env.reconcile() == (0, "0 finding(s), 0 fixed, 0 left\n")
    assert allocated(env) == {"a": len(vms), "b": 0}
