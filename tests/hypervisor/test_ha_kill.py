"""``flask vmapi ha watch`` as a real process, killed (SIGKILL) in the middle of a
recovery and started again, on the two private libvirtd hosts of ``host_pair``: host a
dies (its libvirtd killed); the first watcher is killed while a's fence agent is powering
a off (``fence_test_wait``: its ``off`` returns when the test lets it), the second while
it restarts the HA guest on b (its claim and move marker committed, its call to b's
libvirtd, stopped by the test, under way); the third finishes the job. The guest then runs once, on b (a fresh boot); a is fenced (its
agent's ``off`` asked again by the second watcher: no harm to a host that is off); no
claim, marker or domain is left over.

One guest boot on a and one on b serve the module's one test; a is started again after.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fence_agent import calls, install
from tests.hypervisor.migrate_env import boots, migrate_env, ticks, wait_for_ticks
from tests.hypervisor.test_ha import (
    allocated,
    ha_state,
    known_volumes,
    node_id_of,
    restore,
    wait,
)

pytestmark = [pytest.mark.hypervisor]

ROOT = Path(__file__).resolve().parents[2]
#: what the watcher processes take from the tests' app (as VMAPI_* variables)
PASSED = ("DATABASE_URL", "INSTALLATION_ID", "IMAGE_DIR", "LIBVIRT_TIMEOUT", "SHUTDOWN_TIMEOUT",
          "MIGRATION_TIMEOUT", "HA_FENCE_AGENT_DIRS", "HA_INTERVAL", "HA_MISSES",
          "HA_FENCE_TIMEOUT")  # fmt: skip


@pytest.fixture(scope="module")
def agents(tmp_path_factory) -> Path:
    return install(tmp_path_factory.mktemp("agents"))


@pytest.fixture(scope="module")
def env(host_pair, guest_image, pg_server, tmp_path_factory, agents):
    store = tmp_path_factory.mktemp("images")
    with migrate_env(pg_server, host_pair, guest_image.path, store) as made:
        made.app.config.update(HA_FENCE_AGENT_DIRS=str(agents), HA_INTERVAL=1.0, HA_MISSES=2,
                               HA_FENCE_TIMEOUT=120.0, LIBVIRT_TIMEOUT=5.0)  # fmt: skip
        try:
            yield made
        finally:
            (agents / "pids-a").write_text("")
            (agents / "go-a").touch()  # an agent still waiting returns
            for host in host_pair.hosts:
                restore(host)


class Watcher:
    """One ``flask vmapi ha watch`` process over the tests' database, its output in a
    file."""

    def __init__(self, app, log: Path) -> None:
        self.log = log
        vars_ = {f"VMAPI_{key}": str(app.config[key]) for key in PASSED}
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "flask", "--app", "wsgi", "vmapi", "ha", "watch"],
                cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **vars_}, stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def text(self) -> str:
        return self.log.read_text()

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> int:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(sig)
        return self.process.wait(60)


@contextlib.contextmanager
def watching(app, log: Path) -> Iterator[Watcher]:
    watcher = Watcher(app, log)
    try:
        yield watcher
    finally:
        if watcher.process.poll() is None:
            watcher.kill()


def offs(agents: Path) -> int:
    return len([c for c in calls(agents) if c["options"]["action"] == "off"])


def test_ha_watch_killed_twice_mid_recovery_finishes_without_doubling(env, agents, tmp_path):
    a = env.host("a")
    node_a = env.nodes["a"]["id"]
    fence = {"fence_agent": "fence_test_wait", "fence_address": "a", "fence_user": "admin"}
    assert env.api.update(f"node/{node_a}", json=fence).status_code == 200
    vm = env.create("a", ha=True, ha_local_disks="rebuild")
    read = env.console(vm["id"])
    wait_for_ticks(read, 2)
    name = vm["domain_name"]
    (agents / "pids-a").write_text(" ".join(map(str, a.daemon_pids() + a.qemu_pids())))

    def marker() -> int | None:
        return env.sql("SELECT migration_node_id FROM vm WHERE id = :id", id=vm["id"])[0][0]

    # 1. a dies; the first watcher is killed while a's agent is powering it off
    with watching(env.app, tmp_path / "first.log") as first:
        wait(lambda: "active:" in first.text(), "the first watcher", 60)
        time.sleep(2)  # a round in which a answers
        assert ha_state(env, "a") == "ok"
        os.kill(int(a.pid_files["libvirtd"].read_text().split()[0]), signal.SIGKILL)
        wait(lambda: offs(agents) == 1, "a's agent asked to power a off", 60)
        assert first.kill() == -signal.SIGKILL
    assert ha_state(env, "a") == "fencing" and node_id_of(env, vm) == node_a

    # 2. the second fences a again and starts the restart, which b's libvirtd, stopped
    # (SIGSTOP) meanwhile, holds after its claim and move marker are committed: it is
    # killed there (what b was asked to do is done once b runs on, for no one)
    b_libvirtd = int(env.host("b").pid_files["libvirtd"].read_text().split()[0])
    with watching(env.app, tmp_path / "second.log") as second:
        wait(lambda: offs(agents) == 2, "a's agent asked again", 60)  # (b answered its round)
        os.kill(b_libvirtd, signal.SIGSTOP)
        try:
            (agents / "go-a").touch()  # both agents' `off` return (a's processes killed)
            wait(marker, "the restart's claim on b", 60)
            time.sleep(1)  # its first call to b is sent
            assert second.kill() == -signal.SIGKILL
        finally:
            os.kill(b_libvirtd, signal.SIGCONT)
    left = {"marker": marker(), "on b": env.domains("b").get(name),
            "node": node_id_of(env, vm), "allocated": allocated(env)}  # fmt: skip
    print(f"\nleft by the killed restart: {left}")
    assert left["marker"] == env.nodes["b"]["id"] and left["node"] == node_a
    assert ha_state(env, "a") == "fenced" and not a.qemu_pids()

    # 3. the third finishes the job
    with watching(env.app, tmp_path / "third.log") as third:
        wait(lambda: node_id_of(env, vm) == env.nodes["b"]["id"] and marker() is None
             and env.domains("b").get(name) == "running", "the guest on b", 180)  # fmt: skip
        time.sleep(3)  # rounds after it: nothing more happens
        assert third.kill(signal.SIGTERM) == 0
    print(third.text())
    assert env.domains("b") == {name: "running"}
    assert allocated(env) == {"a": 0, "b": 1}
    assert [c["options"]["action"] for c in calls(agents)] == ["off", "off", "status"]
    assert ha_state(env, "a") == "fenced"
    text = wait_for_ticks(read, 2)
    assert boots(text) == 1 and ticks(text)[:2] == [1, 2]  # one fresh boot, on b
    [(volumes,)] = env.sql("SELECT count(*) FROM storage WHERE vm_id = :id", id=vm["id"])
    assert volumes == 1 and env.sql("SELECT node_id FROM storage WHERE vm_id = :id",
                                    id=vm["id"]) == [(env.nodes["b"]["id"],)]  # fmt: skip
    assert env.volumes("b") == known_volumes(env, "b")  # nothing of the killed attempt

    (agents / "pids-a").write_text("")
    restore(a)  # a comes back: what it kept of the guest is not running
    wait(lambda: env.domains("a").get(name) in (None, "shutoff"), "a's old domain down", 60)
    assert env.domains("b") == {name: "running"}
    assert env.api.delete(f"vm/{vm['id']}?cascade=storage").status_code == 200
    code, output = env.reconcile("--fix")  # what a kept of it (its domain, its disk)
    assert code == 0 and " 0 left" in output, output
    assert env.domains("a") == env.domains("b") == {}
