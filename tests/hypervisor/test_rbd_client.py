"""The API host as a Ceph client (vmapi/hypervisor/rbd.py), on the session's one-node
cluster (``ceph``, tests/hypervisor/ceph_cluster.py) with the real ``rbd`` and ``qemu-img``.

The client reaches the cluster as its user from a key file only (no ceph.conf). Images are
imported from raw and qcow2 files and read back byte for byte, copied flattened inside the
cluster, listed, looked at one by one, removed (not while clones exist), exported; a name
in use is left alone, a failure half-way leaves nothing, a wrong key, a closed and a silent
monitor port are errors that never quote the key. Every test's images are named
``rbdclient-<random>-*`` and removed after it (clones first), whatever happened.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import struct
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.hypervisor.ceph_cluster import CephCluster, CephError
from tests.hypervisor.rbd_env import flattens_done_by_the_manager, record_processes
from vmapi.hypervisor.rbd import (
    COPY_SNAPSHOT,
    CephAccess,
    RbdBusy,
    RbdClient,
    RbdError,
    RbdNotFound,
    RbdTimeout,
)

pytestmark = [pytest.mark.hypervisor]

MIB = 1024**2
#: bound on each command of the tests' clients, and on an import or a copy
BOUND = 60.0


def run(*args: str) -> bytes:
    return subprocess.run(args, check=True, capture_output=True, timeout=60).stdout


@pytest.fixture(scope="module")
def keyfile(ceph: CephCluster, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rbd-key") / f"client.{ceph.user}.key"
    path.write_text(ceph.key + "\n")
    path.chmod(0o600)
    return path


def client_for(ceph: CephCluster, keyfile: Path, monitors=None, timeout=BOUND) -> RbdClient:
    access = CephAccess(monitors=monitors or ceph.monitors, user=ceph.user,
                        keyfile=str(keyfile), timeout=timeout)  # fmt: skip
    return RbdClient(access)


@pytest.fixture
def client(ceph: CephCluster, keyfile: Path) -> RbdClient:
    return client_for(ceph, keyfile)


def purge(ceph: CephCluster, image: str) -> None:
    """Remove ``image`` with its snapshots as the admin (nothing when it is gone)."""
    try:
        snaps = json.loads(
            ceph.run("rbd", "snap", "ls", "--format", "json", f"{ceph.pool}/{image}")
        )
    except CephError:
        return
    for snap in snaps:
        if snap["protected"] == "true":
            ceph.run("rbd", "snap", "unprotect", f"{ceph.pool}/{image}@{snap['name']}")
    ceph.run("rbd", "snap", "purge", "--no-progress", f"{ceph.pool}/{image}")
    ceph.run("rbd", "rm", "--no-progress", f"{ceph.pool}/{image}")


@pytest.fixture
def prefix(ceph: CephCluster):
    """This test's image names start with it; all of them go after the test (clones
    before their parents)."""
    start = f"rbdclient-{uuid.uuid4().hex[:8]}-"
    yield start
    for _ in range(3):  # a clone of a clone at most
        left = [name for name in ceph.rbd_images() if name.startswith(start)]
        clones = [name for name in left if "parent" in ceph.rbd_info(name)]
        for name in clones or left:
            purge(ceph, name)
    assert [name for name in ceph.rbd_images() if name.startswith(start)] == []


def data(size: int) -> bytes:
    return os.urandom(size)


def raw_file(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def qcow2_file(path: Path, size: int) -> tuple[Path, bytes]:
    """A qcow2 of ``size`` with a few written ranges and holes; its content as raw bytes."""
    run("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size))
    for pattern, offset, length in ((0x5A, 0, 64 * 1024), (0xC3, MIB + 4096, 300 * 1024),
                                    (0x11, size - 64 * 1024, 64 * 1024)):  # fmt: skip
        run("qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} {length}", str(path))
    raw = path.with_suffix(".raw")
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(path), str(raw))
    return path, raw.read_bytes()


def corrupt_qcow2(path: Path) -> Path:
    """A qcow2 whose header and tables read well (``qemu-img info`` takes it), but whose
    first data cluster's L2 entry points to an unaligned offset: reading it fails (EIO)."""
    run("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(4 * MIB))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", str(path))
    mapped = json.loads(run("qemu-img", "map", "--output=json", "-f", "qcow2", str(path)))
    host = next(extent["offset"] for extent in mapped if extent["data"])
    content = bytearray(path.read_bytes())
    entry = struct.pack(">Q", host | 1 << 63)  # an allocated cluster, refcount 1 ("copied")
    at = content.index(entry)
    content[at : at + 8] = struct.pack(">Q", (host + 512) | 1 << 63)
    path.write_bytes(bytes(content))
    return path


def exported(client: RbdClient, pool: str, name: str) -> bytes:
    return b"".join(client.export(pool, name, BOUND))


def snapshots(ceph: CephCluster, image: str) -> dict[str, bool]:
    found = json.loads(ceph.run("rbd", "snap", "ls", "--format", "json", f"{ceph.pool}/{image}"))
    return {snap["name"]: snap["protected"] == "true" for snap in found}


def ours(ceph: CephCluster, prefix: str) -> list[str]:
    return [name for name in ceph.rbd_images() if name.startswith(prefix)]


def write_into(ceph: CephCluster, image: str, source: Path) -> None:
    """Write a raw file over the start of an image (as the cluster's user, with its conf)."""
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), ceph.qemu_target(image))


def test_info_list_and_children(ceph, client, prefix):
    base, clone = f"{prefix}base", f"{prefix}clone"
    ceph.run("rbd", "create", "--size", "4M", f"{ceph.pool}/{base}")
    ceph.run("rbd", "snap", "create", "--no-progress", f"{ceph.pool}/{base}@one")
    ceph.run("rbd", "snap", "create", "--no-progress", f"{ceph.pool}/{base}@two")
    ceph.run("rbd", "snap", "protect", f"{ceph.pool}/{base}@two")
    ceph.run("rbd", "clone", f"{ceph.pool}/{base}@two", f"{ceph.pool}/{clone}")

    found = client.info(ceph.pool, base)
    assert (found.name, found.size, found.parent, found.snapshots) == (base, 4 * MIB, None,
                                                                      ("one", "two"))  # fmt: skip
    cloned = client.info(ceph.pool, clone)
    assert cloned.parent == f"{ceph.pool}/{base}@two"
    assert cloned.snapshots == ()
    assert client.info(ceph.pool, f"{prefix}missing") is None

    names = client.list_images(ceph.pool)
    assert {base, clone} <= set(names)
    assert f"{prefix}missing" not in names
    assert client.children(ceph.pool, base) == [f"{ceph.pool}/{clone}"]
    assert client.children(ceph.pool, clone) == []
    with pytest.raises(RbdNotFound):
        client.children(ceph.pool, f"{prefix}missing")
    with pytest.raises(RbdError) as listing:
        client.list_images(f"{prefix}nopool")
    assert not isinstance(listing.value, RbdNotFound)  # a missing pool is not a missing image


def test_import_raw(ceph, client, prefix, tmp_path):
    content = data(3 * MIB + 4096)  # not a whole number of RBD objects
    name = f"{prefix}raw"
    size = client.import_image(ceph.pool, name, str(raw_file(tmp_path / "a,b.img", content)),
                               "raw", "base", BOUND)  # fmt: skip
    assert size == len(content)
    assert ceph.rbd_info(name)["size"] == len(content)
    assert snapshots(ceph, name) == {"base": True}
    assert exported(client, ceph.pool, name) == content


def test_import_qcow2(ceph, client, prefix, tmp_path):
    path, content = qcow2_file(tmp_path / "disk.qcow2", 5 * MIB)
    name = f"{prefix}qcow"
    assert client.import_image(ceph.pool, name, str(path), "qcow2", "base", BOUND) == 5 * MIB
    assert client.info(ceph.pool, name).snapshots == ("base",)
    assert snapshots(ceph, name) == {"base": True}
    assert exported(client, ceph.pool, name) == content


def test_import_onto_a_taken_name_leaves_it_alone(ceph, client, prefix, tmp_path):
    name = f"{prefix}taken"
    before = data(2 * MIB)
    client.import_image(ceph.pool, name, str(raw_file(tmp_path / "first", before)), "raw",
                        "mine", BOUND)  # fmt: skip
    other = raw_file(tmp_path / "second", data(3 * MIB))
    with pytest.raises(RbdBusy) as busy:
        client.import_image(ceph.pool, name, str(other), "raw", "base", BOUND)
    assert name in str(busy.value)
    assert ceph.rbd_info(name)["size"] == 2 * MIB
    assert snapshots(ceph, name) == {"mine": True}
    assert exported(client, ceph.pool, name) == before


def test_import_failing_half_way_leaves_nothing(ceph, client, prefix, tmp_path):
    broken = corrupt_qcow2(tmp_path / "broken.qcow2")
    with pytest.raises(RbdError) as failed:
        client.import_image(ceph.pool, f"{prefix}broken", str(broken), "qcow2", "base", BOUND)
    assert "qemu-img convert" in str(failed.value)
    assert ours(ceph, prefix) == []

    raw_says_qcow2 = raw_file(tmp_path / "plain.img", data(MIB))
    with pytest.raises(RbdError):
        client.import_image(ceph.pool, f"{prefix}plain", str(raw_says_qcow2), "qcow2", "base",
                            BOUND)  # fmt: skip
    with pytest.raises(RbdError) as no_file:
        client.import_image(ceph.pool, f"{prefix}none", str(tmp_path / "missing"), "raw", "b",
                            BOUND)  # fmt: skip
    assert not isinstance(no_file.value, RbdNotFound)  # a missing file is not a missing image
    assert ours(ceph, prefix) == []


class FailingAt(RbdClient):
    """The real client, except that one command (the first whose words start with
    ``step``, e.g. ``rbd snap protect`` or ``ceph rbd task add flatten``) fails once as
    if the cluster had refused it (the cluster cannot be made to fail at that step on
    demand)."""

    def __init__(self, access: CephAccess, step: tuple[str, ...]) -> None:
        super().__init__(access)
        self.step: str | None = " ".join(step)

    def _run(self, argv, bound, what, ok=(0,)):
        if self.step is not None and what.startswith(self.step):
            self.step = None
            raise RbdError(f"{what} failed (5): injected")
        return super()._run(argv, bound, what, ok)


def test_import_failing_at_the_snapshot_leaves_nothing(ceph, client, prefix, tmp_path):
    failing = FailingAt(client.access, ("rbd", "snap", "protect"))
    with pytest.raises(RbdError, match="injected"):
        failing.import_image(ceph.pool, f"{prefix}late", str(raw_file(tmp_path / "f", data(MIB))),
                             "raw", "base", BOUND)  # fmt: skip
    assert ours(ceph, prefix) == []


def test_copy_flattened(ceph, client, prefix, tmp_path, monkeypatch):
    """The copy stands alone with the source's content, and its flatten was the cluster's
    manager's: the manager's progress module completed "Flattening image POOL/COPY", and
    the processes the client started for the copy are metadata commands only (``rbd
    snap``/``clone``/``info``, ``ceph rbd task``): no ``rbd flatten``, ``export``, ``cp``,
    no ``qemu-img``, nothing else that could carry the image's bytes through this host."""
    source, copy = f"{prefix}source", f"{prefix}copy"
    first = data(4 * MIB)
    client.import_image(ceph.pool, source, str(raw_file(tmp_path / "first", first)), "raw",
                        "base", BOUND)  # fmt: skip
    changed = data(MIB)  # the source's head, written after its snapshot
    write_into(ceph, source, raw_file(tmp_path / "changed", changed))
    at_copy = changed + first[MIB:]

    assert f"{ceph.pool}/{copy}" not in flattens_done_by_the_manager(ceph)
    spawned = record_processes(monkeypatch)
    assert client.copy_flattened(ceph.pool, source, copy, "own", BOUND) == 4 * MIB
    monkeypatch.undo()
    assert spawned.moving_data() == []
    queued, *polls = spawned.manager_commands()
    assert queued == ["rbd", "task", "add", "flatten", f"{ceph.pool}/{copy}"]
    assert polls and all(argv[:3] == ["rbd", "task", "list"] for argv in polls)
    assert f"{ceph.pool}/{copy}" in flattens_done_by_the_manager(ceph)
    made = client.info(ceph.pool, copy)
    assert (made.parent, made.snapshots) == (None, ("own",))
    assert snapshots(ceph, copy) == {"own": True}
    assert "parent" not in ceph.rbd_info(copy)
    assert snapshots(ceph, source) == {"base": True}  # no snapshot of the copy left
    assert client.children(ceph.pool, source) == []

    write_into(ceph, source, raw_file(tmp_path / "later", data(MIB)))  # the copy keeps its own
    assert exported(client, ceph.pool, copy) == at_copy


def test_copy_flattened_refusals(ceph, client, prefix, tmp_path):
    source, taken = f"{prefix}source", f"{prefix}taken"
    client.import_image(ceph.pool, source, str(raw_file(tmp_path / "s", data(MIB))), "raw",
                        "base", BOUND)  # fmt: skip
    kept = data(2 * MIB)
    client.import_image(ceph.pool, taken, str(raw_file(tmp_path / "t", kept)), "raw", "mine",
                        BOUND)  # fmt: skip

    with pytest.raises(RbdBusy):
        client.copy_flattened(ceph.pool, source, taken, "own", BOUND)
    assert snapshots(ceph, taken) == {"mine": True}
    assert exported(client, ceph.pool, taken) == kept
    with pytest.raises(RbdNotFound):
        client.copy_flattened(ceph.pool, f"{prefix}missing", f"{prefix}new", "own", BOUND)
    assert sorted(ours(ceph, prefix)) == sorted([source, taken])
    assert snapshots(ceph, source) == {"base": True}


@pytest.mark.parametrize(
    "step",
    [
        ("ceph", "rbd", "task", "add", "flatten"),
        ("ceph", "rbd", "task", "list"),
        ("rbd", "snap", "protect"),
    ],
)
def test_copy_failing_half_way_leaves_nothing(ceph, client, prefix, tmp_path, step):
    """Refused at the queueing of the manager's flatten, failing while it is followed
    (the task is cancelled: the manager drops it), or at the copy's own snapshot: no
    copy, no snapshot, no task left."""
    source = f"{prefix}source"
    client.import_image(ceph.pool, source, str(raw_file(tmp_path / "s", data(8 * MIB))), "raw",
                        "base", BOUND)  # fmt: skip
    failing = FailingAt(client.access, step)
    if step[0] == "rbd":  # the copy's own snapshot: the temporary one is made
        failing.step = f"rbd snap protect {ceph.pool}/{prefix}copy@own"
    with pytest.raises(RbdError, match="injected"):
        failing.copy_flattened(ceph.pool, source, f"{prefix}copy", "own", BOUND)
    assert failing.step is None  # (it did fail there)
    assert ours(ceph, prefix) == [source]
    assert snapshots(ceph, source) == {"base": True}
    assert not any(s.startswith(COPY_SNAPSHOT) for s in snapshots(ceph, source))
    tasks = json.loads(ceph.run("ceph", "rbd", "task", "list"))
    assert [t for t in tasks if prefix in t["refs"].get("image_name", "")] == []


def test_copy_without_the_managers_capability_says_so_and_leaves_nothing(ceph, prefix, tmp_path):
    """A user with the monitors' and OSDs' ``profile rbd`` but not the manager's: the
    manager refuses the task, the error names the capability to grant, nothing is left
    (and nothing was flattened by this host instead)."""
    user = f"{prefix}nomgr"
    ceph.run("ceph", "auth", "get-or-create", f"client.{user}", "mon", "profile rbd",
             "osd", f"profile rbd pool={ceph.pool}")  # fmt: skip
    try:
        keyfile = tmp_path / f"client.{user}.key"
        keyfile.write_text(ceph.run("ceph", "auth", "get-key", f"client.{user}").strip() + "\n")
        limited = RbdClient(CephAccess(monitors=ceph.monitors, user=user, keyfile=str(keyfile),
                                       timeout=BOUND))  # fmt: skip
        source = f"{prefix}source"
        limited.import_image(ceph.pool, source, str(raw_file(tmp_path / "s", data(MIB))), "raw",
                             "base", BOUND)  # fmt: skip
        with pytest.raises(RbdError) as refused:
            limited.copy_flattened(ceph.pool, source, f"{prefix}copy", "own", BOUND)
        assert f"mgr 'profile rbd pool={ceph.pool}'" in str(refused.value)
        assert ours(ceph, prefix) == [source]
        assert snapshots(ceph, source) == {"base": True}
    finally:
        ceph.run("ceph", "auth", "del", f"client.{user}")


def test_remove_image(ceph, client, prefix, tmp_path):
    base, clone = f"{prefix}base", f"{prefix}clone"
    client.import_image(ceph.pool, base, str(raw_file(tmp_path / "b", data(MIB))), "raw",
                        "base", BOUND)  # fmt: skip
    ceph.run("rbd", "clone", f"{ceph.pool}/{base}@base", f"{ceph.pool}/{clone}")

    with pytest.raises(RbdBusy) as busy:
        client.remove_image(ceph.pool, base)
    assert f"{ceph.pool}/{clone}" in str(busy.value)
    assert snapshots(ceph, base) == {"base": True}  # nothing removed
    assert client.info(ceph.pool, clone).parent == f"{ceph.pool}/{base}@base"

    assert client.remove_image(ceph.pool, clone) is True
    assert client.remove_image(ceph.pool, base) is True
    assert ours(ceph, prefix) == []
    assert client.remove_image(ceph.pool, base) is False


def rbd_children() -> list[tuple[int, str]]:
    """The rbd processes this test process started that still run: (pid, command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if parent == os.getpid() and argv[0] == b"rbd":
                found.append((int(entry.name), b" ".join(argv).decode()))
    return found


def test_export(ceph, client, prefix, tmp_path):
    name = f"{prefix}export"
    content = data(6 * MIB)
    client.import_image(ceph.pool, name, str(raw_file(tmp_path / "e", content)), "raw", "base",
                        BOUND)  # fmt: skip
    assert exported(client, ceph.pool, name) == content

    chunks = client.export(ceph.pool, name, BOUND)
    assert content.startswith(next(chunks))
    running = rbd_children()
    assert len(running) == 1 and " export " in running[0][1] and "--keyfile" in running[0][1]
    assert ceph.key not in running[0][1]  # the key is never on a command line
    chunks.close()
    assert rbd_children() == []  # closing killed the tool

    with pytest.raises(RbdNotFound):
        list(client.export(ceph.pool, f"{prefix}missing", BOUND))


def test_wrong_key_is_an_error_that_never_quotes_it(ceph, keyfile, prefix, tmp_path):
    ceph.run("rbd", "create", "--size", "1M", f"{ceph.pool}/{prefix}there")
    other = ceph.run("ceph-authtool", "--gen-print-key").strip()  # a key, not the user's
    junk = base64.b64encode(os.urandom(16)).decode()  # not a cephx key at all
    for key in (other, junk):
        path = tmp_path / "client.wrong.key"
        path.write_text(key + "\n")
        wrong = client_for(ceph, path, timeout=20.0)
        for call in (lambda c: c.info(ceph.pool, f"{prefix}there"),
                     lambda c: c.info(ceph.pool, f"{prefix}missing"),
                     lambda c: c.list_images(ceph.pool)):  # fmt: skip
            with pytest.raises(RbdError) as refused:
                call(wrong)
            assert not isinstance(refused.value, RbdNotFound)
            assert key not in str(refused.value) and ceph.key not in str(refused.value)
            assert "rbd " in str(refused.value)
        with pytest.raises(RbdError) as importing:
            wrong.import_image(ceph.pool, f"{prefix}new", str(raw_file(tmp_path / "n", b"x" * 512)),
                               "raw", "base", 20.0)  # fmt: skip
        assert key not in str(importing.value)
    assert ours(ceph, prefix) == [f"{prefix}there"]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_closed_monitor_port(ceph, keyfile):
    nowhere = client_for(ceph, keyfile, monitors=(("127.0.0.1", closed_port()),), timeout=3.0)
    with pytest.raises(RbdError) as failed:
        nowhere.info(ceph.pool, "anything")
    assert ceph.key not in str(failed.value)
    with pytest.raises(RbdError):
        list(nowhere.export(ceph.pool, "anything", 3.0))


def test_silent_monitor_is_killed_at_the_bound(ceph, keyfile):
    """A monitor that takes the connection and never answers: the tool would wait for its
    own mount timeout (at least 1 s); the bound (below it) kills it first."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        stuck = client_for(ceph, keyfile, monitors=(("127.0.0.1", port),), timeout=0.3)
        with pytest.raises(RbdTimeout):
            stuck.list_images(ceph.pool)
        with pytest.raises(RbdTimeout):
            list(stuck.export(ceph.pool, "anything", 0.3))
    assert rbd_children() == []


def test_children_and_growth(ceph, client, prefix, tmp_path):
    """The clones of an image's snapshot are its children; an image grows, never shrinks.
    (Root disks are cloned in process: test_rbd_librbd.py; these clones by Ceph's tool.)"""
    parent, clone, other = f"{prefix}parent", f"{prefix}clone", f"{prefix}other"
    client.import_image(ceph.pool, parent, str(raw_file(tmp_path / "p", data(2 * MIB))), "raw",
                        "base", BOUND)  # fmt: skip
    for name in (clone, other):
        ceph.run("rbd", "clone", f"{ceph.pool}/{parent}@base", f"{ceph.pool}/{name}")
    assert sorted(client.children(ceph.pool, parent)) == sorted(
        f"{ceph.pool}/{n}" for n in (clone, other))  # fmt: skip
    client.resize(ceph.pool, clone, 4 * MIB)
    assert client.info(ceph.pool, clone).size == 4 * MIB
    with pytest.raises(RbdError):
        client.resize(ceph.pool, clone, MIB)
    assert client.info(ceph.pool, clone).size == 4 * MIB
    with pytest.raises(RbdNotFound):
        client.resize(ceph.pool, f"{prefix}none", MIB)


def test_copy_flattened_says_when_its_snapshot_is_taken(ceph, client, prefix, tmp_path):
    """``on_snapshot`` runs once the source's snapshot exists and before the copy is
    flattened (what the caller froze for the snapshot thaws then)."""
    source, copy = f"{prefix}source", f"{prefix}copy"
    client.import_image(ceph.pool, source, str(raw_file(tmp_path / "s", data(MIB))), "raw",
                        "base", BOUND)  # fmt: skip
    seen = []

    def taken():
        seen.append((sorted(snapshots(ceph, source)), client.info(ceph.pool, copy)))

    client.copy_flattened(ceph.pool, source, copy, "own", BOUND, on_snapshot=taken)
    assert seen == [(sorted(["base", f"{COPY_SNAPSHOT}{copy}"]), None)]
