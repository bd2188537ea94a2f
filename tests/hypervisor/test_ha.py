"""``ha watch`` on real daemons (the two private libvirtd hosts of ``host_pair``): host a
dies (its libvirtd killed), the watcher fences it through the test agent
(tests/fence_agent.py: ``off`` kills the QEMU left of it) and the HA guest runs on b:
the same UUID, MAC and addresses, its shared data volume the same file, a fresh boot on
its console. Then a watcher that died while fencing finishes without doubling anything,
and a node that only loses its connection, its fencing failing, keeps its guest.

One guest boot serves the module (the restart on b boots it once more). Host a is
started again at the end: other modules share the pair.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import libvirt
import pytest

from tests.conftest import MIB
from tests.fence_agent import calls, install
from tests.hypervisor.migrate_env import boots, migrate_env, ticks, wait_for_ticks
from tests.hypervisor.two_hosts import PrivateHost
from vmapi.hypervisor.libvirt.config import StoragePool
from vmapi.services.ha.watch import watch

pytestmark = [pytest.mark.hypervisor]


@pytest.fixture(scope="module")
def agents(tmp_path_factory) -> Path:
    return install(tmp_path_factory.mktemp("agents"))


@pytest.fixture(scope="module")
def env(host_pair, guest_image, pg_server, tmp_path_factory, agents):
    store = tmp_path_factory.mktemp("images")
    with migrate_env(pg_server, host_pair, guest_image.path, store) as made:
        made.app.config.update(HA_FENCE_AGENT_DIRS=str(agents), HA_INTERVAL=1.0, HA_MISSES=2,
                               HA_FENCE_TIMEOUT=30.0, LIBVIRT_TIMEOUT=5.0)  # fmt: skip
        try:
            yield made
        finally:
            for host in host_pair.hosts:  # a host a test killed comes back for the others
                restore(host)


def restore(host: PrivateHost) -> None:
    """Start the host again if its libvirtd is dead (what is left of it killed first)."""
    try:
        libvirt.open(host.uri).close()
        return
    except libvirt.libvirtError:
        pass
    for pid in host.qemu_pids() + host.daemon_pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    host.start()


@pytest.fixture(scope="module")
def shared_type(env) -> int:
    """A pool both hosts see in one folder (``vmapi-shared``) and a storage type on it."""
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


class Watching:
    """``vmapi.services.ha.watch.watch`` in a thread of its own (in an app context)."""

    def __init__(self, app):
        self.app, self.stop, self.lines = app, threading.Event(), []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with self.app.app_context():
            watch(self.stop, self.lines.append)

    def __enter__(self) -> Watching:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive()


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def node_id_of(env, vm) -> int:
    return env.api.get(f"vm/{vm['id']}").json["data"]["node"]["id"]


def ha_state(env, name: str) -> str:
    return env.api.get(f"node/{env.nodes[name]['id']}").json["data"]["ha_state"]


def allocated(env) -> dict[str, int]:
    return {n: env.api.get(f"node/{env.nodes[n]['id']}").json["data"]["allocated_cores"]
            for n in "ab"}  # fmt: skip


def interfaces(env, vm) -> list[tuple]:
    """The VM's interfaces with their MACs and addresses."""
    return env.sql(
        "SELECT i.id, i.mac, i.device_suffix, v4.address, v6.address FROM interface i "
        "LEFT JOIN ipv4_address v4 ON v4.interface_id = i.id "
        "LEFT JOIN ipv6_address v6 ON v6.interface_id = i.id WHERE i.vm_id = :id "
        "ORDER BY i.id, v4.id, v6.id", id=vm["id"])  # fmt: skip


def known_volumes(env, name: str) -> list[str]:
    """The volumes the database records on node ``name``'s pool: its VMs' disks and seeds,
    its copies of images."""
    node = env.nodes[name]["id"]
    rows = env.sql("SELECT volume_name FROM storage WHERE node_id = :id AND pool = 'vmapi' "
                   "UNION SELECT seed_volume FROM vm WHERE node_id = :id AND seed_pool = "
                   "'vmapi' UNION SELECT volume_name FROM image_copy WHERE node_id = :id AND "
                   "pool = 'vmapi'", id=node)  # fmt: skip
    return sorted(row[0] for row in rows)


def wait(condition, what: str, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"waited {timeout:g} s for {what}"
        time.sleep(0.2)
    return found


def test_a_dead_host_is_fenced_and_its_ha_guest_runs_on_the_other(env, shared_type, agents):
    a, b = env.host("a"), env.host("b")
    fence = {"fence_agent": "fence_test", "fence_address": "a", "fence_user": "admin"}
    up = env.api.update(f"node/{env.nodes['a']['id']}", json=fence)
    assert up.status_code == 200, up.json
    vm = env.create("a", ha=True, ha_local_disks="rebuild")
    read = env.console(vm["id"])
    wait_for_ticks(read, 2)
    made = env.api.post("storage", json={"size": 8 * MIB, "vm": {"id": vm["id"]},
                                         "storage_type": {"id": shared_type}})  # fmt: skip
    assert made.status_code == 201, made.json
    [(path,)] = env.sql("SELECT path FROM storage WHERE id = :id", id=made.json["data"]["id"])
    with open(path, "r+b") as f:
        f.write(os.urandom(8 * MIB))
    data = (os.stat(path).st_ino, sha256(path))
    nics = interfaces(env, vm)
    domain_uuid = libvirt.open(a.uri).lookupByName(vm["domain_name"]).UUIDString()
    before = read()
    assert boots(before) == 1

    # host a dies: its libvirtd is killed; the agent's `off` kills what is left (QEMU)
    libvirtd = int(a.pid_files["libvirtd"].read_text().split()[0])
    assert libvirtd in a.daemon_pids()
    (agents / "pids-a").write_text(" ".join(map(str, a.daemon_pids() + a.qemu_pids())))
    assert a.qemu_pids()
    with Watching(env.app) as watcher:
        wait(lambda: ha_state(env, "a") == "ok", "a first round")
        died = time.monotonic()
        os.kill(libvirtd, signal.SIGKILL)
        wait(lambda: node_id_of(env, vm) == env.nodes["b"]["id"]
             and env.domains("b").get(vm["domain_name"]) == "running", "the guest on b")  # fmt: skip
        seconds = time.monotonic() - died
    print(f"\nhost a killed -> the HA guest running on b: {seconds:.1f} s")
    print("\n".join(watcher.lines))
    assert ha_state(env, "a") == "fenced"
    assert [(c["agent"], c["options"]["action"], c["options"]["ip"]) for c in calls(agents)] == [
        ("fence_test", "off", "a"), ("fence_test", "status", "a")]  # fmt: skip
    assert not a.qemu_pids()  # the agent killed them
    assert libvirt.open(b.uri).lookupByName(vm["domain_name"]).UUIDString() == domain_uuid
    assert interfaces(env, vm) == nics
    [(node, after)] = env.sql("SELECT node_id, path FROM storage WHERE id = :id",
                              id=made.json["data"]["id"])  # fmt: skip
    assert (node, after) == (env.nodes["b"]["id"], path)
    assert (os.stat(path).st_ino, sha256(path)) == data  # the same file, its data intact
    text = wait_for_ticks(read, 2)
    # b's console log: one boot, counting from the start (a's showed ticks past 2)
    assert ticks(before)[-1] >= 2 and boots(text) == 1 and ticks(text)[:2] == [1, 2]
    assert allocated(env) == {"a": 0, "b": 1}

    # a watcher that died while fencing a (its state left `fencing`): one round fences a
    # again and restarts nothing twice
    (agents / "pids-a").write_text("")  # (those pids are gone; none is to be reused)
    env.sql("UPDATE node SET ha_state = 'fencing' WHERE id = :id", id=env.nodes["a"]["id"])
    result = env.app.test_cli_runner().invoke(args=["vmapi", "ha", "watch", "--rounds", "1"])
    assert result.exit_code == 0, result.output
    assert ha_state(env, "a") == "fenced"
    assert [c["options"]["action"] for c in calls(agents)][2:] == ["off", "status"]
    assert allocated(env) == {"a": 0, "b": 1}
    assert node_id_of(env, vm) == env.nodes["b"]["id"]
    assert env.domains("b")[vm["domain_name"]] == "running"
    restore(a)  # a comes back: the guest's old definition there is not running (libvirt
    # says "running" from its status file until it finds the QEMU gone)
    assert not a.qemu_pids()
    wait(lambda: env.domains("a").get(vm["domain_name"]) in (None, "shutoff"),
         "a's libvirtd to find its QEMU gone", 60)  # fmt: skip

    # b only loses its connection (its daemon and guest run on) and its agent fails:
    # nothing is restarted on a, b is fence_failed
    assert env.api.update(f"node/{env.nodes['a']['id']}", json={"node_state": {"id": 1}}
                          ).status_code == 200  # fmt: skip
    fail = {"fence_agent": "fence_test_fail", "fence_address": "b", "fence_user": "admin"}
    assert env.api.update(f"node/{env.nodes['b']['id']}", json=fail).status_code == 200
    seen = ticks(read())
    lost = f"qemu+unix:///system?socket={b.folder}/run/no-such-sock"
    env.sql("UPDATE node SET libvirt_uri = :uri WHERE id = :id", uri=lost,
            id=env.nodes["b"]["id"])  # fmt: skip
    try:
        with Watching(env.app):
            wait(lambda: ha_state(env, "b") == "fence_failed", "b fence_failed", 60)
            time.sleep(3)  # rounds after it: still nothing restarted
    finally:
        env.sql("UPDATE node SET libvirt_uri = :uri WHERE id = :id", uri=b.uri,
                id=env.nodes["b"]["id"])  # fmt: skip
    assert calls(agents)[-1]["agent"] == "fence_test_fail"
    assert node_id_of(env, vm) == env.nodes["b"]["id"]
    assert env.domains("b")[vm["domain_name"]] == "running"
    assert env.domains("a").get(vm["domain_name"]) in (None, "shutoff")
    assert allocated(env) == {"a": 0, "b": 1}
    wait_for_ticks(read, 1, after=seen[-1])  # it ran on, never restarted

    assert env.api.delete(f"vm/{vm['id']}?cascade=storage").status_code == 200
    code, output = env.reconcile("--fix")  # what a kept of it (its domain, its disks)
    assert code == 0 and "4 fixed, 0 left" in output, output
    assert env.domains("a") == env.domains("b") == {}
