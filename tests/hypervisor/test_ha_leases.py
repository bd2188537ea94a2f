"""A fence agent that lies, on hosts with disk leases (``leased_pair``,
tests/hypervisor/leased_hosts.py): node a only loses its connection (its libvirtd,
virtlockd and the guest's QEMU run on, the QEMU holding its disks' leases) and its agent
says a is off when it is not. ``ha watch`` fences a and restarts the HA guest on b
through the evacuation: b's lock manager refuses the start (the shared data volume's
lease is a's), so nothing runs twice; the attempt is undone whole (no domain, no volume,
no claim on b; the VM is recorded on a, where it runs), the refusal is in the audit
trail, the metrics and the log, and node a is ``fence_failed`` (nothing more of it
restarts). Once a is really off (its QEMU killed) and an admin confirms it, the next
round restarts the guest on b, its disk's lease now b's.

One guest boot (on a) and one restart (on b) serve the module's one test.
"""

from __future__ import annotations

import os
import signal
import time

import libvirt
import pytest

from tests.conftest import MIB
from tests.fence_agent import calls, install
from tests.hypervisor.leased_hosts import LeasedHost, lease_holder
from tests.hypervisor.migrate_env import boots, migrate_env, ticks, wait_for_ticks
from tests.hypervisor.test_ha import (
    Watching,
    allocated,
    ha_state,
    known_volumes,
    node_id_of,
    sha256,
    wait,
)
from vmapi.hypervisor.libvirt.config import StoragePool

pytestmark = [pytest.mark.hypervisor]


@pytest.fixture(scope="module")
def agents(tmp_path_factory):
    return install(tmp_path_factory.mktemp("agents"))


@pytest.fixture(scope="module")
def env(leased_pair, guest_image, pg_server, tmp_path_factory, agents):
    store = tmp_path_factory.mktemp("images")
    with migrate_env(pg_server, leased_pair, guest_image.path, store) as made:
        made.app.config.update(HA_FENCE_AGENT_DIRS=str(agents), HA_INTERVAL=1.0, HA_MISSES=2,
                               HA_FENCE_TIMEOUT=30.0, LIBVIRT_TIMEOUT=5.0)  # fmt: skip
        try:
            yield made
        finally:
            for host in leased_pair.hosts:  # every process of the pair runs again
                assert isinstance(host, LeasedHost)
                if len(host.daemon_pids()) < len(host.pid_files):
                    host.restart()


def shared_type(env) -> int:
    """A pool both hosts see at one path (the pair's shared folder), a type on it."""
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
    assert made.status_code == 201, made.json
    return made.json["data"]["id"]


def events(env, vm_id: int) -> list[tuple]:
    return env.sql("SELECT action, outcome, status FROM event WHERE resource = 'vm' AND "
                   "object_id = :id AND action = 'evacuate' ORDER BY id", id=vm_id)  # fmt: skip


def metric(env, line: str) -> float:
    headers = {"Authorization": f"Bearer {env.api.token}"}
    text = env.app.test_client().get("/metrics", headers=headers).get_data(as_text=True)
    found = [row.rsplit(" ", 1)[1] for row in text.splitlines() if row.startswith(line + " ")]
    return float(found[0]) if found else 0.0


def test_a_lying_fence_agent_cannot_make_the_disk_run_twice(env, agents):
    a, b = env.host("a"), env.host("b")
    assert isinstance(a, LeasedHost) and isinstance(b, LeasedHost)
    node_a = env.nodes["a"]["id"]
    lie = {"fence_agent": "fence_test_lie", "fence_address": "a", "fence_user": "admin"}
    assert env.api.update(f"node/{node_a}", json=lie).status_code == 200
    vm = env.create("a", ha=True, ha_local_disks="rebuild")
    read = env.console(vm["id"])
    made = env.api.post("storage", json={"size": 8 * MIB, "vm": {"id": vm["id"]},
                                         "storage_type": {"id": shared_type(env)}})  # fmt: skip
    assert made.status_code == 201, made.json
    [(path,)] = env.sql("SELECT path FROM storage WHERE id = :id", id=made.json["data"]["id"])
    wait_for_ticks(read, 2)
    [qemu] = a.qemu_pids()
    assert lease_holder(a.leases, path) == a.pid("virtlockd")
    refused = 'vmapi_migrations_total{kind="evacuate",outcome="vm/disk_leased"}'
    before = metric(env, refused)

    # a loses its connection; everything of it runs on
    lost = f"qemu+unix:///system?socket={a.folder}/run/no-such-sock"
    env.sql("UPDATE node SET libvirt_uri = :uri WHERE id = :id", uri=lost, id=node_a)
    try:
        with Watching(env.app) as watcher:
            wait(lambda: ha_state(env, "a") == "fence_failed", "a fence_failed", 120)
            time.sleep(3)  # rounds after it: nothing more is tried
    finally:
        env.sql("UPDATE node SET libvirt_uri = :uri WHERE id = :id", uri=a.uri, id=node_a)
    print("\n".join(watcher.lines))
    assert [(c["agent"], c["options"]["action"]) for c in calls(agents)] == [
        ("fence_test_lie", "off"), ("fence_test_lie", "status")]  # fmt: skip
    # nothing runs twice: a's QEMU runs on and holds the lease; nothing of the VM on b
    assert a.qemu_pids() == [qemu] and lease_holder(a.leases, path) == a.pid("virtlockd")
    assert env.domains("b") == {}
    # the QEMU b started paused, whose start the lease refused, is killed by libvirt
    # without waiting for it to exit (CI once saw it still exiting 3 s later under load)
    wait(lambda: b.qemu_pids() == [], "b's refused QEMU gone", 30)
    assert env.volumes("b") == known_volumes(env, "b")  # (its root disk made there removed)
    assert env.sql("SELECT count(*) FROM storage WHERE node_id = :id",
                   id=env.nodes["b"]["id"]) == [(0,)]  # fmt: skip
    # its row: on a (where it runs), running, no move under way, its claim on b given back
    [(node, marker, state)] = env.sql(
        "SELECT v.node_id, v.migration_node_id, s.name FROM vm v JOIN vm_state s "
        "ON s.id = v.vm_state_id WHERE v.id = :id", id=vm["id"])  # fmt: skip
    assert (node, marker, state) == (node_a, None, "running")
    assert allocated(env) == {"a": 1, "b": 0}
    assert env.sql("SELECT count(*) FROM leftover")[0][0] == 0
    # visible: one refusal (no retry of a node whose fencing the lease contradicts)
    assert events(env, vm["id"]) == [("evacuate", "vm/disk_leased", 409)]
    assert metric(env, refused) == before + 1
    assert any("vm/disk_leased" in line for line in watcher.lines), watcher.lines
    assert any(line.startswith(f"{env.nodes['a']['fqdn']}: FENCE FAILED") for line in
               watcher.lines), watcher.lines  # fmt: skip
    node = env.api.get(f"node/{node_a}").json["data"]
    assert node["ha_state"] == "fence_failed"
    seen = ticks(read())
    wait_for_ticks(read, 1, after=seen[-1])  # the guest on a was never stopped

    # a really goes off (its QEMU killed: the lease goes with it); an admin confirms
    data = sha256(path)
    os.kill(qemu, signal.SIGKILL)
    wait(lambda: lease_holder(a.leases, path) is None, "a's lease to go", 30)
    env.sql("UPDATE node SET libvirt_uri = :uri WHERE id = :id", uri=lost, id=node_a)
    try:
        confirmed = env.app.test_cli_runner().invoke(
            args=["vmapi", "node", "fenced", env.nodes["a"]["fqdn"]])  # fmt: skip
        assert confirmed.exit_code == 0, confirmed.output
        with Watching(env.app) as watcher:
            wait(lambda: node_id_of(env, vm) == env.nodes["b"]["id"]
                 and env.domains("b").get(vm["domain_name"]) == "running",
                 "the guest on b", 120)  # fmt: skip
    finally:
        env.sql("UPDATE node SET libvirt_uri = :uri WHERE id = :id", uri=a.uri, id=node_a)
    print("\n".join(watcher.lines))
    assert lease_holder(b.leases, path) == b.pid("virtlockd")
    assert sha256(path) == data
    assert allocated(env) == {"a": 0, "b": 1}
    assert len(calls(agents)) == 2  # confirmed by hand: the agent was not asked again
    text = wait_for_ticks(read, 2)
    assert boots(text) == 1 and ticks(text)[:2] == [1, 2]  # a fresh boot on b

    assert env.api.delete(f"vm/{vm['id']}?cascade=storage").status_code == 200
    code, output = env.reconcile("--fix")  # what a kept of it (its domain, its root disk)
    assert code == 0 and " 0 left" in output, output
    assert env.domains("a") == env.domains("b") == {}
