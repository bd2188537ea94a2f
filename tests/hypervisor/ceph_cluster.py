"""A throwaway one-node Ceph cluster for the RBD tests (../shared/recipes/ceph-rbd.md).

One monitor, one manager and one BlueStore OSD on a sparse file, all in a folder of their
own under the temporary directory (``vmapi-ceph-<random>``), bound to 127.0.0.1 only, run
as forking daemons with pid files (no systemd, nothing in /etc/ceph: every command is
given the folder's ``ceph.conf``). The pool ``rbd`` is initialised and the cephx user
``client.libvirt`` may use it (``profile rbd`` of the monitors, the OSDs on the pool and the
manager on the pool, as README asks of operators). Up in about 10 s; :func:`ceph_cluster`
ends the daemons with SIGKILL and removes the folder (about 2 s), also when the tests
failed, and first removes what an earlier run that was killed left: a folder whose owner
(the process that made it, by pid and start time) is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: the start of every cluster folder's name
MARKER = "vmapi-ceph-"
#: what the folder's owner file holds: its maker's pid and start time
OWNER = "owner"
#: the tools and daemons the cluster needs (Debian: ceph-mon, ceph-mgr, ceph-osd, ceph-common)
TOOLS = ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph", "rbd", "ceph-authtool", "monmaptool")
HOST = "127.0.0.1"
POOL = "rbd"
USER = "libvirt"
#: the OSD's block file: sparse, only what is written takes room
OSD_BYTES = 8 * 1024**3
#: bound on every command and on reaching HEALTH_OK
COMMAND_SECONDS = 60.0
HEALTHY_SECONDS = 60.0


class CephUnavailable(Exception):
    """This machine cannot run the cluster (a package is missing)."""


class CephError(Exception):
    """A step of the cluster's bring-up failed; the message says which and why."""


@dataclass(frozen=True)
class CephCluster:
    """A running cluster, as its clients need it."""

    folder: Path
    #: (host, msgr v1 port): the monitor as libvirt's ``<host>`` takes it
    monitors: tuple[tuple[str, int], ...]
    pool: str
    user: str  # the cephx user, without ``client.``
    key: str  # its key, base64 as Ceph prints it
    conf: Path  # give to every client (``-c``, ``CEPH_CONF``, qemu-img's ``conf=``)
    keyring: Path  # the user's keyring, for client tools acting as that user
    admin_keyring: Path  # every key of the cluster (the admin's among them)

    def run(self, *args: str) -> str:
        """A ceph or rbd command as the admin, e.g. ``run("rbd", "info", "rbd/x")``."""
        return _run(self.conf, args[0], "-c", str(self.conf), *args[1:])

    def rbd_info(self, image: str) -> dict:
        return json.loads(self.run("rbd", "info", "--format", "json", f"{self.pool}/{image}"))

    def rbd_images(self) -> list[str]:
        return sorted(json.loads(self.run("rbd", "ls", "--format", "json", self.pool)))

    def qemu_target(self, image: str) -> str:
        """QEMU's name of an image, reached as the cluster's user: ``rbd:pool/image:...``."""
        return (f"rbd:{self.pool}/{image}:id={self.user}:conf={self.conf}"
                f":keyring={self.keyring}")  # fmt: skip


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


#: Words of commands that only read: one that a signal killed (a client's own abort in
#: librados, seen once in CI under load) is run once more rather than failing a teardown.
READ_ONLY = frozenset({"ls", "info", "children", "status", "health", "df"})


def _run(conf: Path, *args: str, timeout: float = COMMAND_SECONDS) -> str:
    env = {**os.environ, "CEPH_CONF": str(conf)}
    tries = 2 if READ_ONLY & set(args) else 1
    for _ in range(tries):
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                                  env=env)  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise CephError(f"{' '.join(args)}: no answer within {timeout:g} s") from exc
        if done.returncode >= 0:
            break
    if done.returncode != 0:
        # a crash dump's reason is at its start, the rest is a stack and log levels
        said = (done.stderr or done.stdout).strip()
        raise CephError(f"{' '.join(args)} failed ({done.returncode}): "
                        f"{said[:1500]}{' ... ' + said[-500:] if len(said) > 2000 else ''}")  # fmt: skip
    return done.stdout


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _start_time(pid: int) -> str | None:
    """The process's start time (in clock ticks since boot), None when there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _conf_text(folder: Path, fsid: str, v1: int, v2: int) -> str:
    """ceph.conf: loopback only, one of everything, size-1 pools without warnings, quick
    stats (HEALTH_OK ~6 s sooner). ``$name`` and the like are Ceph's own variables."""
    d = str(folder)
    sections = {
        "global": {
            "fsid": fsid,
            "mon host": f"[v2:{HOST}:{v2},v1:{HOST}:{v1}]",
            "public addr": HOST,
            "cluster addr": HOST,
            "auth cluster required": "cephx",
            "auth service required": "cephx",
            "auth client required": "cephx",
            "auth allow insecure global id reclaim": "false",
            "keyring": f"{d}/keyring",
            "run dir": f"{d}/run",
            "admin socket": f"{d}/run/$name.$pid.asok",
            "pid file": f"{d}/run/$name.pid",
            "log file": f"{d}/log/$name.log",
            "crash dir": f"{d}/crash",
            "osd pool default size": "1",
            "osd pool default min size": "1",
            "osd pool default pg num": "8",
            "osd pool default pgp num": "8",
            "osd crush chooseleaf type": "0",
            "mon allow pool size one": "true",
            "mon allow pool delete": "true",
            "mon warn on pool no redundancy": "false",
            "mon data avail warn": "5",
            "mon data avail crit": "2",
            "mgr stats period": "1",
            "mon mgr digest period": "1",
        },
        "mon": {
            "mon data": f"{d}/mon/$cluster-$id",
            "mon cluster log file": f"{d}/log/cluster.log",
        },
        "mgr": {"mgr data": f"{d}/mgr/$cluster-$id"},
        "osd": {
            "osd data": f"{d}/osd/$cluster-$id",
            "osd objectstore": "bluestore",
            # outside the OSD's data folder: there, mkfs makes it a link to itself
            "bluestore block path": f"{d}/osd/$cluster-$id.block",
            "bluestore block create": "true",
            "bluestore block size": str(OSD_BYTES),
            "bluestore block db path": "",
            "bluestore block db create": "false",
            "bluestore block wal path": "",
            "bluestore block wal create": "false",
            "bluestore fsck on mkfs": "false",
            "bluestore fsck on mount": "false",
            "bluestore fsck on umount": "false",
            "osd memory target": "939524096",
        },
    }
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {value}" for key, value in values.items())
    return "\n".join(lines) + "\n"


def _daemon_pids(folder: Path) -> list[int]:
    """The pids of this folder's daemons that still run (their command line names its
    ceph.conf: a recycled pid is someone else's)."""
    found = []
    conf = str(folder / "ceph.conf").encode()
    for pidfile in sorted((folder / "run").glob("*.pid")):
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if conf in cmdline.split(b"\0"):
            found.append(pid)
    return found


def remove(folder: Path) -> None:
    """End the folder's daemons (SIGKILL: nothing of the cluster is kept) and remove it."""
    pids = _daemon_pids(folder)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    shutil.rmtree(folder, ignore_errors=True)


def remove_leftovers(root: Path) -> list[Path]:
    """The cluster folders under ``root`` whose owner is gone (a run that was killed);
    a cluster of a session running now stays. Returns what was removed."""
    removed = []
    for folder in root.glob(f"{MARKER}*"):
        try:
            pid, started = (folder / OWNER).read_text().split()
        except (OSError, ValueError):
            # no owner file: killed before it was written (it is the first thing made),
            # or not ours; an hour old, it belongs to no bring-up in progress
            if time.time() - folder.stat().st_mtime < 3600:
                continue
        else:
            if _start_time(int(pid)) == started:
                continue
        remove(folder)
        removed.append(folder)
    return removed


def _wait_healthy(conf: Path, deadline: float) -> None:
    last = ""
    while time.monotonic() < deadline:
        status = json.loads(_run(conf, "ceph", "-c", str(conf), "status", "--format", "json"))
        pgs = status.get("pgmap", {})
        clean = sum(s["count"] for s in pgs.get("pgs_by_state", [])
                    if s["state_name"] == "active+clean")  # fmt: skip
        health = status.get("health", {}).get("status")
        if health == "HEALTH_OK" and pgs.get("num_pgs") and clean == pgs["num_pgs"]:
            return
        last = f"{health}, {clean} of {pgs.get('num_pgs')} PGs active+clean"
        time.sleep(0.25)
    raise CephError(f"the cluster was not healthy within {HEALTHY_SECONDS:g} s: {last}")


def start(folder: Path) -> CephCluster:
    """Bring the cluster up in ``folder`` (made here, empty)."""
    for sub in ("mon", "mgr/ceph-x", "osd/ceph-0", "run", "log", "crash"):
        (folder / sub).mkdir(parents=True)
    conf, keyring = folder / "ceph.conf", folder / "keyring"
    fsid = str(uuid.uuid4())
    v1, v2 = _free_port(), _free_port()
    while v2 == v1:
        v2 = _free_port()
    conf.write_text(_conf_text(folder, fsid, v1, v2))
    c = ("-c", str(conf))

    def run(*args: str) -> str:
        return _run(conf, *args)

    run("ceph-authtool", *c, "--create-keyring", str(keyring), "--gen-key", "-n", "mon.",
        "--cap", "mon", "allow *")  # fmt: skip
    caps = {
        "client.admin": ["mon", "allow *", "osd", "allow *", "mgr", "allow *", "mds", "allow *"],
        "mgr.x": ["mon", "allow profile mgr", "osd", "allow *", "mds", "allow *"],
        "osd.0": ["mon", "allow profile osd", "mgr", "allow profile osd", "osd", "allow *"],
    }
    for name, pairs in caps.items():
        args = [arg for i in range(0, len(pairs), 2) for arg in ("--cap", *pairs[i : i + 2])]
        run("ceph-authtool", *c, str(keyring), "--gen-key", "-n", name, *args)
    monmap = str(folder / "monmap")
    run("monmaptool", *c, "--create", "--fsid", fsid, "--addv", "a",
        f"[v2:{HOST}:{v2},v1:{HOST}:{v1}]", monmap)  # fmt: skip
    run("ceph-mon", *c, "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", str(keyring))
    run("ceph-mon", *c, "-i", "a")
    run("ceph-mgr", *c, "-i", "x")
    osd_uuid = str(uuid.uuid4())
    osd_id = run("ceph", *c, "osd", "new", osd_uuid).strip()
    run("ceph-osd", *c, "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid)
    run("ceph-osd", *c, "-i", osd_id)  # returns once the OSD has booted
    run("ceph", *c, "osd", "pool", "create", POOL, "8", "8")
    run("rbd", *c, "pool", "init", POOL)
    user_keyring = folder / f"client.{USER}.keyring"
    # mgr: the manager's rbd_support tasks (a save's flatten inside the cluster)
    run("ceph", *c, "auth", "get-or-create", f"client.{USER}", "mon", "profile rbd",
        "osd", f"profile rbd pool={POOL}", "mgr", f"profile rbd pool={POOL}",
        "-o", str(user_keyring))  # fmt: skip
    key = run("ceph", *c, "auth", "get-key", f"client.{USER}").strip()
    _wait_healthy(conf, time.monotonic() + HEALTHY_SECONDS)
    return CephCluster(folder=folder, monitors=((HOST, v1),), pool=POOL, user=USER, key=key,
                       conf=conf, keyring=user_keyring, admin_keyring=keyring)  # fmt: skip


@contextlib.contextmanager
def ceph_cluster(root: Path | None = None) -> Iterator[CephCluster]:
    """A cluster for the ``with`` block, removed after it whatever happened
    (:class:`CephUnavailable` when a tool is missing, :class:`CephError` when the
    bring-up fails: its folder is removed then too)."""
    missing = missing_tools()
    if missing:
        raise CephUnavailable(f"Ceph is not installed (missing: {', '.join(missing)}; "
                              "Debian: ceph-mon ceph-mgr ceph-osd ceph-common)")  # fmt: skip
    root = Path(root or tempfile.gettempdir())
    remove_leftovers(root)
    folder = Path(tempfile.mkdtemp(prefix=MARKER, dir=root))
    try:
        (folder / OWNER).write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
        yield start(folder)
    finally:
        remove(folder)
