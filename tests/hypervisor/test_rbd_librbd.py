"""The API host's in-process Ceph client (vmapi/hypervisor/librbd.py: Ceph's Python
bindings, one connection per process and cluster access), on the session's one-node
cluster (``ceph``, tests/hypervisor/ceph_cluster.py).

A clone of a protected snapshot grown to its size without any process started; its
refusals (a taken name left alone, a missing snapshot or pool); a failed growth leaves no
clone; one connection serves every thread, a forked child makes its own; a cluster out of
reach is the tool client's clear error, a stopped OSD Ceph's timeout, after which the
connection is made anew; the bindings missing say what to install. Every test's images
are named ``librbd-<random>-*`` and removed after it (clones first), whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.hypervisor.ceph_cluster import CephCluster, _daemon_pids
from tests.hypervisor.rbd_env import record_in_process, record_processes
from tests.hypervisor.test_rbd_client import purge
from vmapi.hypervisor import librbd
from vmapi.hypervisor.librbd import BindingsMissing, LibRbdClient
from vmapi.hypervisor.rbd import (
    CephAccess,
    RbdBusy,
    RbdClient,
    RbdError,
    RbdNotFound,
    RbdTimeout,
)

pytestmark = [pytest.mark.hypervisor]

MIB = 1024**2
BOUND = 60.0


@pytest.fixture(scope="module")
def keyfile(ceph: CephCluster, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("librbd-key") / f"client.{ceph.user}.key"
    path.write_text(ceph.key + "\n")
    path.chmod(0o600)
    return path


def access_for(ceph: CephCluster, keyfile: Path, monitors=None, timeout=BOUND) -> CephAccess:
    return CephAccess(monitors=monitors or ceph.monitors, user=ceph.user,
                      keyfile=str(keyfile), timeout=timeout)  # fmt: skip


@pytest.fixture
def client(ceph: CephCluster, keyfile: Path) -> LibRbdClient:
    return LibRbdClient(access_for(ceph, keyfile))


@pytest.fixture
def tools(ceph: CephCluster, keyfile: Path) -> RbdClient:
    """The tool client, to look at what the in-process one made."""
    return RbdClient(access_for(ceph, keyfile))


@pytest.fixture
def prefix(ceph: CephCluster):
    start = f"librbd-{uuid.uuid4().hex[:8]}-"
    yield start
    for _ in range(2):  # clones before their parents
        left = [name for name in ceph.rbd_images() if name.startswith(start)]
        clones = [name for name in left if "parent" in ceph.rbd_info(name)]
        for name in clones or left:
            purge(ceph, name)
    assert [name for name in ceph.rbd_images() if name.startswith(start)] == []


def ours(ceph: CephCluster, prefix: str) -> list[str]:
    return [name for name in ceph.rbd_images() if name.startswith(prefix)]


@pytest.fixture
def parent(ceph: CephCluster, tools: RbdClient, prefix: str, tmp_path: Path):
    """This test's image of 1 MiB of random bytes with its protected snapshot ``base``
    (written by the tool client): its name and content."""
    content = os.urandom(MIB)
    source = tmp_path / "parent.raw"
    source.write_bytes(content)
    name = f"{prefix}parent"
    tools.import_image(ceph.pool, name, str(source), "raw", "base", BOUND)
    return name, content


def connection(access: CephAccess):
    """This process's connection for the access (None: none made, or dropped)."""
    found = librbd._registry.connections.get(access)
    return None if found is None else found.cluster


def test_a_clone_grown_in_process_and_its_refusals(ceph, client, tools, prefix, parent,
                                                   monkeypatch):  # fmt: skip
    (parent, content), grown = parent, f"{prefix}grown"
    spawned = record_processes(monkeypatch)
    client.clone(ceph.pool, parent, "base", grown, 8 * MIB)
    client.clone(ceph.pool, parent, "base", f"{prefix}small", MIB // 2)  # less: the parent's
    client.clone(ceph.pool, parent, "base", f"{prefix}same", MIB)
    monkeypatch.undo()
    assert spawned.argv == []  # no rbd (nor any other) process for any of it
    info = ceph.rbd_info(grown)
    assert info["size"] == 8 * MIB
    assert (info["parent"]["pool"], info["parent"]["image"], info["parent"]["snapshot"]) == (
        ceph.pool, parent, "base")  # fmt: skip
    assert b"".join(tools.export(ceph.pool, grown, BOUND)) == content + bytes(7 * MIB)
    assert ceph.rbd_info(f"{prefix}small")["size"] == MIB
    assert ceph.rbd_info(f"{prefix}same")["size"] == MIB
    with pytest.raises(RbdBusy) as taken:  # a name taken: left as it is
        client.clone(ceph.pool, parent, "base", grown, 16 * MIB)
    assert "exists" in str(taken.value)
    assert ceph.rbd_info(grown)["size"] == 8 * MIB
    with pytest.raises(RbdNotFound):
        client.clone(ceph.pool, parent, "nosuch", f"{prefix}none", MIB)
    with pytest.raises(RbdError) as no_pool:
        client.clone(f"{prefix}nopool", parent, "base", f"{prefix}none", MIB)
    assert not isinstance(no_pool.value, RbdNotFound)  # a missing pool is not a missing image
    assert ours(ceph, prefix) == sorted([parent, grown, f"{prefix}small", f"{prefix}same"])


def test_a_failed_growth_leaves_no_clone(ceph, client, prefix, monkeypatch, parent):
    parent, _content = parent
    made = record_in_process(monkeypatch)
    made.failing = "resize"
    with pytest.raises(RbdError) as failed:
        client.clone(ceph.pool, parent, "base", f"{prefix}clone", 4 * MIB)
    assert "injected failure" in str(failed.value) and "growing" in str(failed.value)
    assert made.words() == ["clone", "resize"]
    assert ours(ceph, prefix) == [parent]


def test_one_connection_serves_every_thread(ceph, client, prefix, parent):
    parent, _content = parent
    client.clone(ceph.pool, parent, "base", f"{prefix}first", 2 * MIB)
    kept = connection(client.access)
    assert kept is not None
    failures: list[BaseException] = []

    def clone(n: int) -> None:
        try:
            for i in range(3):
                client.clone(ceph.pool, parent, "base", f"{prefix}t{n}-{i}", 2 * MIB)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=clone, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    assert len(ours(ceph, prefix)) == 2 + 12
    assert connection(client.access) is kept  # the one connection, no other made


def test_a_forked_child_makes_its_own_connection(ceph, client, prefix, parent):
    parent, _content = parent
    client.clone(ceph.pool, parent, "base", f"{prefix}parent-side", 2 * MIB)
    kept = connection(client.access)
    pid = os.fork()
    if pid == 0:  # the child: the parent's connection is not its own
        code = 1
        try:
            if connection(client.access) is None:
                client.clone(ceph.pool, parent, "base", f"{prefix}child-side", 2 * MIB)
                code = 0 if connection(client.access) is not None else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child did not finish within 60 s")
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert ceph.rbd_info(f"{prefix}child-side")["size"] == 2 * MIB
    # the parent's connection goes on as it was
    client.clone(ceph.pool, parent, "base", f"{prefix}parent-after", 2 * MIB)
    assert connection(client.access) is kept


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_cluster_out_of_reach_is_a_clear_error_within_the_bound(ceph, keyfile):
    """A closed monitor port, and a monitor that takes the connection and never answers:
    the tool client's error (not a missing image), in about Ceph's mount timeout, and
    no connection kept."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        for port in (closed_port(), silent.getsockname()[1]):
            access = access_for(ceph, keyfile, monitors=(("127.0.0.1", port),), timeout=2.0)
            started = time.monotonic()
            with pytest.raises(RbdError) as failed:
                LibRbdClient(access).clone(ceph.pool, "any", "base", "other", MIB)
            assert time.monotonic() - started < 10
            assert not isinstance(failed.value, RbdNotFound)
            message = str(failed.value)
            assert "couldn't connect to the cluster" in message, message
            assert f"127.0.0.1:{port}" in message and ceph.key not in message
            assert connection(access) is None


def test_threads_waiting_for_a_failing_connect_share_its_answer(ceph, keyfile):
    """Four creates at once while the cluster is out of reach: one waits for Ceph's mount
    timeout (2 s), the others, queued behind it, get its answer rather than a wait of
    their own each (8 s in all)."""
    access = access_for(ceph, keyfile, monitors=(("127.0.0.1", closed_port()),), timeout=2.0)
    errors: list[BaseException] = []

    def clone() -> None:
        try:
            LibRbdClient(access).clone(ceph.pool, "any", "base", "other", MIB)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=clone) for _ in range(4)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    took = time.monotonic() - started
    assert len(errors) == 4 and all(type(e) is RbdError for e in errors), errors
    assert all("couldn't connect to the cluster" in str(e) for e in errors)
    assert took < 5.5, took


@contextlib.contextmanager
def stopped_osd(ceph: CephCluster):
    """The cluster's OSD stopped (SIGSTOP: it answers nothing) for the block."""
    [osd] = [pid for pid in _daemon_pids(Path(ceph.folder))
             if b"ceph-osd" in Path(f"/proc/{pid}/cmdline").read_bytes()]  # fmt: skip
    os.kill(osd, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(osd, signal.SIGCONT)


def test_a_stopped_osd_times_out_and_the_connection_is_made_anew(ceph, keyfile, prefix, parent):
    parent, _content = parent
    access = access_for(ceph, keyfile, timeout=1.0)
    client = LibRbdClient(access)
    client.clone(ceph.pool, parent, "base", f"{prefix}before", 2 * MIB)
    broken = connection(access)
    assert broken is not None
    with stopped_osd(ceph):
        started = time.monotonic()
        with pytest.raises(RbdTimeout) as timed_out:
            client.clone(ceph.pool, parent, "base", f"{prefix}during", 2 * MIB)
        took = time.monotonic() - started
    assert took < 10, took  # Ceph's own timeout (1 s an operation), not a hang
    assert timed_out.value.timeout == 1.0 and "Ceph's timeout" in str(timed_out.value)
    assert connection(access) is None  # dropped: not used again
    client.clone(ceph.pool, parent, "base", f"{prefix}after", 2 * MIB)
    assert connection(access) not in (None, broken)  # a new one
    assert ceph.rbd_info(f"{prefix}after")["size"] == 2 * MIB


def test_a_changed_key_file_makes_a_new_connection(ceph, keyfile, prefix, tmp_path, parent):
    parent, _content = parent
    key = tmp_path / f"client.{ceph.user}.key"
    key.write_text(ceph.key + "\n")
    access = access_for(ceph, key)
    LibRbdClient(access).clone(ceph.pool, parent, "base", f"{prefix}one", 2 * MIB)
    first = connection(access)
    os.utime(key, ns=(time.time_ns(), time.time_ns() + 10**9))  # rewritten (a rotated key)
    LibRbdClient(access).clone(ceph.pool, parent, "base", f"{prefix}two", 2 * MIB)
    assert connection(access) not in (None, first)


def test_missing_bindings_say_what_the_api_host_needs(ceph, keyfile, monkeypatch):
    monkeypatch.setattr(librbd, "rados", None)
    monkeypatch.setattr(librbd, "MISSING", "No module named 'rados'")
    access = access_for(ceph, keyfile, timeout=7.0)  # (an access with no connection yet)
    with pytest.raises(BindingsMissing) as missing:
        LibRbdClient(access).clone(ceph.pool, "any", "base", "other", MIB)
    message = str(missing.value)
    assert "python3-rados" in message and "python3-rbd" in message and "make venv" in message
    assert connection(access) is None
