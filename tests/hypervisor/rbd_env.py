"""What the RBD modules with two hosts share (test_rbd_moves.py, test_rbd_boot.py): vmapi on
the host pair (migrate_env) given the session cluster's key, an rbd type over that cluster,
the clean-up of both hosts and of this installation's images in the cluster, a record
of the processes vmapi's Ceph client starts (what passes through the API host), and one
of the clones its in-process client makes."""

from __future__ import annotations

import json
import os
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager

import libvirt

from tests.hypervisor.ceph_cluster import CephCluster
from tests.hypervisor.migrate_env import INSTALLATION, MigrateEnv, migrate_env
from vmapi.hypervisor import librbd as librbd_module
from vmapi.hypervisor import rbd as rbd_module

RBD_POOL = "vmapi-ceph"


def clean(env: MigrateEnv, ceph: CephCluster) -> None:
    """The rbd pool and the Ceph user's secret off both hosts, this installation's images
    out of the cluster."""
    for host in env.hosts.hosts:
        conn = libvirt.open(host.uri)
        try:
            for pool in conn.listAllStoragePools():
                if pool.name() == RBD_POOL:
                    if pool.isActive():
                        pool.destroy()
                    pool.undefine()
            for secret in conn.listAllSecrets():
                if secret.usageID() == f"client.{ceph.user}":
                    secret.undefine()
        finally:
            conn.close()
    ours = [image for image in ceph.rbd_images() if image.startswith(f"{INSTALLATION}-")]
    # clones (root disks, volumes) before the images they are clones of
    for image in sorted(ours, key=lambda name: "-image-" in name):
        spec = f"{ceph.pool}/{image}"
        for snap in json.loads(ceph.run("rbd", "snap", "ls", "--format", "json", spec)):
            if snap["protected"] == "true":
                ceph.run("rbd", "snap", "unprotect", f"{spec}@{snap['name']}")
            ceph.run("rbd", "snap", "rm", f"{spec}@{snap['name']}")
        ceph.run("rbd", "rm", spec)


@contextmanager
def ceph_env(host_pair, guest_image, pg_server, tmp_path_factory, ceph) -> Iterator[MigrateEnv]:
    """Two hosts' vmapi (migrate_env) given the Ceph key; the cluster and hosts cleaned after."""
    store = tmp_path_factory.mktemp("images")
    keys = tmp_path_factory.mktemp("ceph-keys")
    (keys / f"client.{ceph.user}.key").write_text(ceph.key + "\n")
    made = None
    try:
        with migrate_env(pg_server, host_pair, guest_image.path, store) as made:
            made.app.config["CEPH_KEY_DIR"] = str(keys)
            yield made
    finally:
        if made is not None:  # after the domains went: a guest still holding an image
            clean(made, ceph)  # (a test that failed half-way) would keep it from going


def make_rbd_type(env: MigrateEnv, ceph: CephCluster) -> dict:
    """The rbd storage type over the session's cluster."""
    body = {"name": "ceph", "description": "Ceph RBD", "pool": RBD_POOL, "format": "raw",
            "backend": "rbd", "ceph_monitors": [f"{h}:{p}" for h, p in ceph.monitors],
            "ceph_pool": ceph.pool, "ceph_user": ceph.user}  # fmt: skip
    made = env.api.post("storage_type", json=body)
    assert made.status_code == 201, made.json
    return made.json["data"]


def state_of(env: MigrateEnv, name: str) -> tuple[dict[str, str], list[str]]:
    """Host ``name``'s ceph secrets (usage -> UUID) and storage pools."""
    conn = libvirt.open(env.host(name).uri)
    try:
        found = {s.usageID(): s.UUIDString() for s in conn.listAllSecrets()}
        return found, [p.name() for p in conn.listAllStoragePools()]
    finally:
        conn.close()


def network_disk(env: MigrateEnv, name: str, domain: str, target: str) -> ET.Element:
    conn = libvirt.open(env.host(name).uri)
    try:
        xml = ET.fromstring(conn.lookupByName(domain).XMLDesc(0))
    finally:
        conn.close()
    [disk] = [d for d in xml.iterfind("devices/disk") if d.find("target").get("dev") == target]
    return disk


#: words of an ``rbd`` command line that read or write an image's data (through the tool)
DATA_WORDS = frozenset({"flatten", "export", "export-diff", "import", "import-diff", "cp", "copy",
                        "deep", "migration", "bench", "map", "device"})  # fmt: skip


class Spawned:
    """Stands for ``subprocess`` in vmapi's Ceph client (vmapi/hypervisor/rbd.py: every
    process it starts, the ``ceph`` tool's included, goes through its ``run`` or
    ``Popen``): records each command line, then runs it for real, with when it started
    and ended (``times``). ``slow`` (word, seconds): a command with that word waits that
    long first (a slow cluster); ``failing`` (a word): such a command fails instead, as
    if the cluster had refused it (neither can be had from the cluster on demand)."""

    def __init__(self) -> None:
        self.argv: list[list[str]] = []
        self.times: list[tuple[list[str], float, float]] = []
        self.slow: tuple[str, float] | None = None
        self.failing: str | None = None

    def __getattr__(self, name: str) -> object:
        return getattr(subprocess, name)

    def run(self, argv, *args, **kwargs):
        argv = [str(a) for a in argv]
        self.argv.append(argv)
        started = time.monotonic()
        if self.slow is not None and self.slow[0] in argv:
            time.sleep(self.slow[1])
        try:
            if self.failing is not None and self.failing in argv:
                return subprocess.CompletedProcess(argv, 5, b"", b"injected failure")
            return subprocess.run(argv, *args, **kwargs)
        finally:
            self.times.append((argv, started, time.monotonic()))

    def Popen(self, argv, *args, **kwargs):
        self.argv.append([str(a) for a in argv])
        return subprocess.Popen(argv, *args, **kwargs)

    def tools(self, name: str) -> list[list[str]]:
        return [argv for argv in self.argv if os.path.basename(argv[0]) == name]

    def moving_data(self) -> list[list[str]]:
        """The command lines that would pass an image's bytes through the API host: any
        tool but ``rbd`` and ``ceph`` (``qemu-img convert``, ``cp``, ``dd``...), and ``rbd``
        with a word that reads or writes data (``flatten``, ``export``, ``cp``...)."""
        return [argv for argv in self.argv
                if os.path.basename(argv[0]) not in ("rbd", "ceph")
                or (os.path.basename(argv[0]) == "rbd" and DATA_WORDS & set(argv))]  # fmt: skip

    def manager_commands(self) -> list[list[str]]:
        """The ``ceph`` command lines, from their command words on (after the options)."""
        return [argv[argv.index("rbd") :] for argv in self.tools("ceph")]


def record_processes(monkeypatch) -> Spawned:
    """From now on until the test ends, every process vmapi's Ceph client starts."""
    spawned = Spawned()
    monkeypatch.setattr(rbd_module, "subprocess", spawned)
    return spawned


class InProcess:
    """Stands for Ceph's ``rbd`` bindings in vmapi's in-process Ceph client
    (vmapi/hypervisor/librbd.py): records each clone and growth (``times``: the call's
    word, when it started and ended), then makes it for real. ``slow`` (word, seconds): a
    ``clone`` or ``resize`` waits that long first (a slow cluster); ``failing`` (a word):
    it fails instead, as librbd does on an I/O error (neither can be had from the
    cluster on demand)."""

    def __init__(self) -> None:
        import rbd  # (Ceph's bindings: there whenever the tier runs)

        self.real = rbd
        self.times: list[tuple[str, float, float]] = []
        self.slow: tuple[str, float] | None = None
        self.failing: str | None = None

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)

    def made(self, word: str, call):
        started = time.monotonic()
        try:
            if self.slow is not None and self.slow[0] == word:
                time.sleep(self.slow[1])
            if self.failing == word:
                raise self.real.IOError("injected failure", errno=5)
            return call()
        finally:
            self.times.append((word, started, time.monotonic()))

    def RBD(self) -> _Rbd:
        return _Rbd(self, self.real.RBD())

    def Image(self, *args, **kwargs) -> _Image:
        return _Image(self, self.real.Image(*args, **kwargs))

    def words(self) -> list[str]:
        return [word for word, _started, _ended in self.times]


class _Rbd:
    def __init__(self, seen: InProcess, real) -> None:
        self.seen, self.real = seen, real

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)

    def clone(self, *args, **kwargs):
        return self.seen.made("clone", lambda: self.real.clone(*args, **kwargs))


class _Image:
    def __init__(self, seen: InProcess, real) -> None:
        self.seen, self.real = seen, real

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)

    def __enter__(self) -> _Image:
        return self

    def __exit__(self, *exc) -> None:
        self.real.close()

    def resize(self, *args, **kwargs):
        return self.seen.made("resize", lambda: self.real.resize(*args, **kwargs))


def record_in_process(monkeypatch) -> InProcess:
    """From now on until the test ends, every clone and growth of vmapi's in-process
    Ceph client."""
    seen = InProcess()
    monkeypatch.setattr(librbd_module, "rbd", seen)
    return seen


def flattens_done_by_the_manager(ceph: CephCluster) -> list[str]:
    """The images the cluster's manager flattened (its progress module keeps the events of
    the rbd_support tasks it completed: "Flattening image POOL/IMAGE")."""
    progress = json.loads(ceph.run("ceph", "progress", "json"))
    return [event["message"].split()[-1] for event in progress.get("completed", [])
            if event.get("message", "").startswith("Flattening image ")]  # fmt: skip
