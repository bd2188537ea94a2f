"""Fixtures of the hypervisor tier (real libvirtd).

The stream, console-log and disk-copy tests: everything they make is named
``vmapi-streamtest-*`` (a dir pool of each test's own, its volumes, tiny ``type='qemu'``
domains) and removed even when a test fails; leftovers of an interrupted run are removed
first.
Migration: two private libvirtd hosts (tests/hypervisor/two_hosts.py), started once a
session (``host_pair``). Disk leases: another such pair whose hosts also run virtlockd with
one lease folder (tests/hypervisor/leased_hosts.py), started when a test first asks for it
(``leased_pair``), so that ``host_pair`` stays as it is.
Boot from an image (test_boot, test_boot_faults, test_seed_api, test_guest_network): one
vmapi of its own on qemu:///system for the session (tests/hypervisor/boot_env.py), handed
to each module as ``env`` and taken back as it was found.
The API on qemu:///system (``qemu_node``): domains made there carry a test installation id
(and their names with it); leftovers of an interrupted run are removed first.
Network filters: the empty frame libvirt leaves in the host's ruleset once the tier's last
filtered guest is gone is taken away at the session's end, from the tables that were not
there when it began (``no_filter_frames``, tests/hypervisor/ruleset.py).
Ceph: a one-node cluster of the session's own (``ceph``, tests/hypervisor/ceph_cluster.py),
started when a test first asks for it, stopped and removed at the session's end.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from tests.conftest import node_body, unavailable
from tests.domains import tagged_domains
from tests.hypervisor import qemu_host, ruleset
from tests.hypervisor.boot_env import BootEnv, boot_env
from tests.hypervisor.ceph_cluster import CephCluster, CephUnavailable, ceph_cluster
from tests.hypervisor.leased_hosts import check_leased_machine, leased_hosts
from tests.hypervisor.streamtest import POOL_ROOT, PREFIX, URI, remove_leftovers, remove_pool
from tests.hypervisor.two_hosts import HostUnavailable, TwoHosts, check_machine, two_hosts
from vmapi.hypervisor.libvirt import LibvirtDriver


@pytest.fixture(scope="session", autouse=True)
def no_filter_frames(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[None]:
    """The tables of libvirt's filters that the session made (none of them existed when it
    began) go at its end when they hold nothing but libvirt's empty frame; a table that
    was there before, or holds any rule of a guest or another program, stays. Under
    pytest-xdist both workers may run guests: the first to get here reads the tables, the
    last to finish takes the frames away (counted in the run's shared temporary folder),
    so that no worker deletes a table another's guests are about to use."""
    try:
        before = ruleset.tables() if ruleset.available() else None
    except (OSError, subprocess.SubprocessError):  # (not root: nothing to clean either)
        before = None
    if before is None:
        yield
        return
    if not hasattr(request.config, "workerinput"):
        yield
        ruleset.remove_frames(before)
        return
    shared = tmp_path_factory.getbasetemp().parent / "filter-frames.json"
    with frames_lock(shared):
        state = json.loads(shared.read_text()) if shared.exists() else {"sessions": 0}
        if state["sessions"] == 0:
            state["before"] = sorted(before)
        state["sessions"] += 1
        shared.write_text(json.dumps(state))
    yield
    with frames_lock(shared):
        state = json.loads(shared.read_text())
        state["sessions"] -= 1
        shared.write_text(json.dumps(state))
        if state["sessions"] == 0:
            ruleset.remove_frames({tuple(table) for table in state["before"]})


@contextlib.contextmanager
def frames_lock(shared: Path) -> Iterator[None]:
    with open(shared.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="module")
def libvirtd():
    """A connection of the test's own to the real libvirtd, to look at what vmapi did."""
    try:
        connection = libvirt.open(URI)
    except libvirt.libvirtError as exc:
        unavailable(f"libvirtd does not answer on {URI}: {exc}")
    remove_leftovers(connection)
    yield connection
    remove_leftovers(connection)
    connection.close()


@pytest.fixture
def hv():
    """vmapi's libvirt driver (its own connection cache)."""
    driver = LibvirtDriver(timeout=30.0)
    yield driver
    driver.connections.clear()


@pytest.fixture
def pool(libvirtd, hv):
    """A dir pool of this test's own: its name."""
    name = f"{PREFIX}{uuid.uuid4().hex[:8]}"
    hv.ensure_pool(URI, name, str(POOL_ROOT / name))
    yield name
    remove_pool(libvirtd.storagePoolLookupByName(name))


@pytest.fixture
def domains(libvirtd, pool):
    """Names of domains a test defines; destroyed and undefined after it, whatever happens
    (before its pool goes: it may be writing a log there)."""
    names = []
    yield names
    for name in names:
        try:
            dom = libvirtd.lookupByName(name)
        except libvirt.libvirtError:
            continue
        if dom.isActive():
            dom.destroy()
        dom.undefine()


@pytest.fixture(scope="session")
def host_pair() -> Iterator[TwoHosts]:
    """Hosts ``a`` and ``b``: two libvirtd daemons of their own, started once per session
    and always stopped at its end (domains destroyed, daemons ended, folders removed)."""
    try:
        check_machine()
    except HostUnavailable as exc:
        unavailable(str(exc))
    with two_hosts() as pair:
        yield pair


@pytest.fixture(scope="session")
def leased_pair() -> Iterator[TwoHosts]:
    """Hosts ``a`` and ``b`` with libvirt's lock manager (lockd): every writable disk of a
    running domain has a lease in ``<root>/leases``, which both share. Started once per
    session when first asked for, stopped at its end like ``host_pair``."""
    try:
        check_leased_machine()
    except HostUnavailable as exc:
        unavailable(str(exc))
    with leased_hosts() as pair:
        yield pair


@pytest.fixture(scope="session")
def ceph() -> Iterator[CephCluster]:
    """A one-node Ceph cluster (mon, mgr, one OSD) on 127.0.0.1, its pool ``rbd`` and its
    user ``client.libvirt``: up in about 10 s, stopped and removed at the session's end
    (and what a killed earlier run left, before it starts)."""
    try:
        with ceph_cluster() as cluster:
            yield cluster
    except CephUnavailable as exc:
        unavailable(str(exc))


@pytest.fixture(scope="module")
def conn():
    try:
        connection = libvirt.open(qemu_host.URI)
    except libvirt.libvirtError as exc:
        unavailable(f"libvirtd does not answer on {URI}: {exc}")
    yield connection
    connection.close()


def remove_test_domains(conn):
    for dom in tagged_domains(conn, qemu_host.MARKER):
        if dom.isActive():
            dom.destroy()
        dom.undefine()


@pytest.fixture
def app_config():
    return {"INSTALLATION_ID": qemu_host.INSTALLATION, "LIBVIRT_TIMEOUT": 60.0, "SHUTDOWN_TIMEOUT": 1.0,
            "DETACH_TIMEOUT": 2.0}  # fmt: skip


@pytest.fixture
def qemu_node(api, conn, address_pools):
    remove_test_domains(conn)
    method = "KVM" if qemu_host.kvm_works() else "QEMU"
    # user networking needs nothing on the host; ethernet (a tap) is tested below
    body = {
        "node": node_body(libvirt_uri=qemu_host.URI, interface_mode="user"),
        "virt_method": {"name": method},
    }
    response = api.post("virt_node", json=body)
    assert response.status_code == 201, response.json
    vn = response.json["data"]
    yield {
        "node": api.get(f"node/{vn['node']['id']}").json["data"],
        "method": vn["virt_method"]["id"],
        "kind": method,
    }
    remove_test_domains(conn)


@pytest.fixture(scope="session")
def boot_vmapi(pg_server, tmp_path_factory) -> Iterator[BootEnv]:
    """The session's vmapi on qemu:///system for the boot-from-image modules: its database,
    app, address ranges and node are made once (use ``env``, which cleans up after a
    module)."""
    try:
        libvirt.open(qemu_host.URI).close()
    except libvirt.libvirtError as exc:
        unavailable(f"libvirtd does not answer on {qemu_host.URI}: {exc}")
    with boot_env(pg_server, tmp_path_factory.mktemp("images")) as made:
        yield made


#: what a module may change on the shared node and must give back
NODE_FIELDS = ("interface_mode", "bridge")


@pytest.fixture(scope="module")
def env(boot_vmapi: BootEnv) -> Iterator[BootEnv]:
    """The shared vmapi for one module, left as the module found it: its VMs (with their
    storage), volumes and images deleted, the node's networking put back; then nothing of
    the installation may be left on the host."""
    node = boot_vmapi.api.get(f"node/{boot_vmapi.node['id']}").json["data"]
    before = {name: node[name] for name in NODE_FIELDS}
    yield boot_vmapi
    leave_as_found(boot_vmapi, before)


def leave_as_found(env: BootEnv, node_fields: dict) -> None:
    api = env.api
    for vm in api.get("vm").json["data"]:
        gone = api.delete(f"vm/{vm}?cascade=storage")
        assert gone.status_code == 200, gone.json
    for storage in api.get("storage").json["data"]:
        gone = api.delete(f"storage/{storage}")
        assert gone.status_code == 200, gone.json
    for image in api.get("image").json["data"]:
        gone = api.delete(f"image/{image}")
        assert gone.status_code == 200, gone.json
    node = api.get(f"node/{env.node['id']}").json["data"]
    if {name: node[name] for name in NODE_FIELDS} != node_fields:
        put = api.update(f"node/{env.node['id']}", json=node_fields)
        assert put.status_code == 200, put.json
    assert env.ours() == [], "the module left these on the host"
