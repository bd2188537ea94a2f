"""Two private libvirtd daemons on this machine: two hosts to migrate between.

Follows ../shared/recipes/two-hosts.md. Each host is a libvirtd (and its own virtlogd)
in a mount namespace of its own (``unshare -m --propagation private``) in which private
folders are bound over ``/run/libvirt``, ``/var/lib/libvirt``, ``/var/cache/libvirt``,
``/var/log/libvirt`` and ``/etc/libvirt``; the machine's own libvirtd keeps running
beside them. Everything a host has lives in one folder under ``/var/tmp`` (QEMU's user
must reach its disks): ``run/`` holds its socket, so every namespace reaches it at
``qemu+unix:///system?socket=<folder>/run/libvirt-sock``; ``pool/`` is its own storage
folder; its pid files are outside the bound folders so the tests see them too.

The bind mounts exist only inside the namespace, which ends with its last process:
stopping a host destroys its domains, ends QEMU, libvirtd and virtlogd by their pid
files (then anything else still holding its mounts), and its folder is removed. A
session killed before its teardown leaves a folder whose lock nobody holds; the next
session ends what it left (``remove_abandoned``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import libvirt

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised, not printed

PARENT = Path("/var/tmp")
PREFIX = "vmapi-twohosts-"
LOCK = "owner.lock"
#: what is bound over what inside a host's namespace (the host folder's names)
BINDS = {
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
    "etc": "/etc/libvirt",
}
# The namespace's start-up, with the host folder as $1 (paths are arguments, never
# pasted into the script). The daemons' -d returns once they are listening.
MOUNTS = """
set -eu
mount --bind "$1/run" /run/libvirt
mount --bind "$1/lib" /var/lib/libvirt
mount --bind "$1/cache" /var/cache/libvirt
mount --bind "$1/log" /var/log/libvirt
mount --bind "$1/etc" /etc/libvirt
"""
DAEMONS = """
virtlogd -d -p "$1/virtlogd.pid"
libvirtd -d --pid-file "$1/libvirtd.pid"
"""
START = MOUNTS + DAEMONS
STOP_WAIT = 15.0  # seconds a process gets to end after SIGTERM before SIGKILL
CLEAR_WAIT = 60.0  # seconds a daemon gets to destroy its domains before they are killed
PORTS_PER_HOST = 40
DISPLAY_OFFSET = 43400  # migration port - display port


class HostUnavailable(Exception):
    """This machine cannot run a private libvirtd (not root, no libvirtd, no unshare)."""


def _conf(settings: dict[str, object]) -> str:
    """libvirt's config syntax: ``key = value``; strings in double quotes (JSON's
    quoting is a subset of it), lists in brackets."""
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items())


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Is the process there (a zombie not yet reaped counts as ended)?"""
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return False
    return state != "Z"


def _end(pid: int, wait: float = STOP_WAIT) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``wait`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait
    while alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + wait
        time.sleep(0.05)


def _is(pid: int, program: str, mark: str | Path) -> bool:
    """Is ``pid`` still ``program`` with ``mark`` in its arguments (not a recycled pid)?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return Path(cmdline[0].decode()).name.startswith(program) and any(
        str(mark).encode() in arg for arg in cmdline
    )


def holders(folder: Path) -> list[int]:
    """Processes, in any mount namespace, with a mount of something inside ``folder``
    (the bind's source shows in ``/proc/<pid>/mountinfo``, relative to its filesystem:
    the folder's last two names are matched)."""
    mark = f"/{folder.parent.name}/{folder.name}/"
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if mark in (proc / "mountinfo").read_text():
                found.append(int(proc.name))
    return found


def _bounded(fn, wait: float) -> None:
    """Run ``fn`` in a thread and stop waiting after ``wait`` seconds (a hung daemon)."""
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    thread.join(wait)


@dataclass
class PrivateHost:
    """One libvirtd in its own mount namespace, with everything under ``folder``."""

    folder: Path
    ports: tuple[int, int]  # its migration port range
    host_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    script: ClassVar[str] = START  # the namespace's start-up

    @property
    def display_ports(self) -> tuple[int, int]:
        """Its guests' VNC ports: as many as migration ports, 43400 below them (6000 and
        up), away from the machine's libvirtd, which hands out 5900 and up without
        knowing of this one's (QEMU's "-vnc ... Address already in use" otherwise)."""
        return (self.ports[0] - DISPLAY_OFFSET, self.ports[1] - DISPLAY_OFFSET)

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.folder}/run/libvirt-sock"

    @property
    def pool(self) -> Path:
        """Its own storage folder (no other host's daemon defines a pool on it)."""
        return self.folder / "pool"

    @property
    def pid_files(self) -> dict[str, Path]:
        return {"libvirtd": self.folder / "libvirtd.pid", "virtlogd": self.folder / "virtlogd.pid"}

    def daemon_pids(self) -> list[int]:
        pids = {name: _pid(path) for name, path in self.pid_files.items()}
        return [pid for name, pid in pids.items() if pid and _is(pid, name, self.folder)]

    def qemu_pids(self) -> list[int]:
        """QEMU processes of this host, from the status files libvirt keeps for them
        (a pid counts only while its command line still carries the domain's UUID)."""
        pids = []
        for status in (self.folder / "run" / "qemu").glob("*.xml"):
            with contextlib.suppress(OSError, ET.ParseError, ValueError):
                root = ET.parse(status).getroot()  # libvirt's own status file
                pid, domain_uuid = int(root.get("pid", "0")), root.findtext("domain/uuid")
                if pid and domain_uuid and _is(pid, "qemu", domain_uuid):
                    pids.append(pid)
        return pids

    def start(self) -> None:
        for name in (*BINDS, "pool"):
            (self.folder / name).mkdir(parents=True, exist_ok=True)
        for folder in (self.folder, self.pool):
            folder.chmod(0o755)  # QEMU's user reaches the disks through them
        qemu_state = self.folder / "lib" / "qemu"
        qemu_state.mkdir(exist_ok=True)
        shutil.chown(qemu_state, "libvirt-qemu", "libvirt-qemu")
        for name, settings in self.config().items():
            (self.folder / "etc" / name).write_text(_conf(settings))
        for mount_point in BINDS.values():
            Path(mount_point).mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", self.script, "sh", self.folder],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"starting libvirtd in {self.folder} failed: {result.stderr}")
        self.wait_until_answering()

    def config(self) -> dict[str, dict[str, object]]:
        """The files of its /etc/libvirt and their settings."""
        libvirtd = {"host_uuid": self.host_uuid,
                    "log_outputs": "3:file:/var/log/libvirt/libvirtd.log"}  # fmt: skip
        # Two daemons number their domains from 1 and would share cgroup names.
        # Their "shared" pool is a folder on one local filesystem, which libvirt cannot
        # tell from a host's own disk (it skips restoring a migrated disk's owner only on
        # NFS, GFS2, Ceph and the like). With dynamic ownership the source daemon gives
        # the disk back to root (0644) when a live move ends, and the target's QEMU (as
        # libvirt-qemu) opens the disk again when it activates it: at the end of the
        # move for a running guest (before the source lets go), but only at `cont` for
        # one that arrived paused: "Could not open ...: Permission denied" on every
        # paused move (reproduced with the owner seen after each step: issue 22). So
        # QEMU runs as root here and neither daemon changes a file's owner.
        qemu = {"cgroup_controllers": [], "migration_port_min": self.ports[0],
                "migration_port_max": self.ports[1], "user": "root", "group": "root",
                "remote_display_port_min": self.display_ports[0],
                "remote_display_port_max": self.display_ports[1],
                "dynamic_ownership": 0, "remember_owner": 0}  # fmt: skip
        return {"libvirtd.conf": libvirtd, "qemu.conf": qemu}

    def wait_until_answering(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                libvirt.open(self.uri).close()
                return
            except libvirt.libvirtError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def warm(self) -> None:
        """The first use probes QEMU for seconds: do it before anything is timed."""
        subprocess.run(["virsh", "-c", self.uri, "domcapabilities", "--virttype", "qemu"],
                       check=True, capture_output=True, timeout=300)  # fmt: skip

    def clear(self) -> None:
        """Destroy and undefine every domain and pool of this host (all of them are the
        tests'). Quiet when the daemon does not answer: stop() ends QEMU by its pid."""
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError:
            return
        try:
            for dom in conn.listAllDomains():
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isActive():
                        dom.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isPersistent():
                        dom.undefine()
            for pool in conn.listAllStoragePools():
                with contextlib.suppress(libvirt.libvirtError):
                    if pool.isActive():
                        pool.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    pool.undefine()
        finally:
            conn.close()

    def stop(self) -> None:
        """Guests first (stopping libvirtd does not stop them), then the daemons by their
        pid files, then whatever still holds the namespace's mounts: with its last
        process the namespace, and so every bind mount of it, is gone."""
        _bounded(self.clear, CLEAR_WAIT)
        for pid in self.qemu_pids():
            _end(pid)
        for pid in self.daemon_pids():
            _end(pid)
        for pid in holders(self.folder):
            _end(pid)


@dataclass
class TwoHosts:
    """Hosts ``a`` and ``b`` under one folder; ``root`` also holds what both share."""

    root: Path
    a: PrivateHost
    b: PrivateHost

    @property
    def hosts(self) -> tuple[PrivateHost, PrivateHost]:
        return (self.a, self.b)

    @property
    def shared(self) -> Path:
        """A folder both hosts see at the same path (one filesystem): shared storage."""
        return self.root / "shared"


def _lock(folder: Path) -> int:
    """Hold ``folder``'s lock for this process's life (raises BlockingIOError if held)."""
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def _stop_hosts_in(root: Path) -> None:
    for child in sorted(root.iterdir()):
        if (child / "etc" / "qemu.conf").exists():
            PrivateHost(child, (0, 0)).stop()


def remove_abandoned(parent: Path = PARENT) -> list[Path]:
    """End the hosts of sessions that died before their teardown (their lock is free)
    and remove their folders; a live session's folders are left alone."""
    removed = []
    for root in parent.glob(f"{PREFIX}*"):
        try:
            fd = _lock(root)
        except BlockingIOError:
            continue  # a live session's
        except OSError:
            continue  # gone meanwhile, or not a folder of ours
        try:
            _stop_hosts_in(root)
            shutil.rmtree(root, ignore_errors=True)
            removed.append(root)
        finally:
            os.close(fd)
    return removed


def check_machine() -> None:
    """Raise :class:`HostUnavailable` when private daemons cannot run here."""
    if os.geteuid() != 0:
        raise HostUnavailable("private libvirtd daemons need root")
    for program in ("unshare", "libvirtd", "virtlogd", "virsh", "qemu-system-x86_64"):
        if shutil.which(program) is None:
            raise HostUnavailable(f"{program} is not installed (scripts/ensure-libvirtd.sh)")
    try:
        pwd.getpwnam("libvirt-qemu")
    except KeyError as exc:
        raise HostUnavailable("the libvirt-qemu user does not exist") from exc


def new_root(parent: Path = PARENT) -> tuple[Path, int]:
    """A locked folder for a pair of hosts. Made under a hidden name and renamed once
    locked, so remove_abandoned never takes it for an abandoned one."""
    hidden = Path(tempfile.mkdtemp(prefix=f".{PREFIX}", dir=parent))
    fd = _lock(hidden)
    root = hidden.with_name(hidden.name[1:])
    hidden.rename(root)
    root.chmod(0o755)
    return root, fd


@contextlib.contextmanager
def two_hosts(
    ports: int | None = None, warm: bool = True, host: type[PrivateHost] = PrivateHost
) -> Iterator[TwoHosts]:
    """Start hosts ``a`` and ``b`` of class ``host`` (migration ports from ``ports``, 40
    each; by default a range picked by pid, so that parallel sessions rarely meet), warm
    them, and always stop them and remove everything on the way out."""
    check_machine()
    remove_abandoned()
    if ports is None:
        ports = 49400 + (os.getpid() % 50) * 2 * PORTS_PER_HOST
    root, fd = new_root()
    last = PORTS_PER_HOST - 1
    pair = TwoHosts(root, host(root / "a", (ports, ports + last)),
                    host(root / "b", (ports + PORTS_PER_HOST, ports + PORTS_PER_HOST + last)))  # fmt: skip
    try:
        pair.shared.mkdir(mode=0o755)
        for host in pair.hosts:
            host.start()
        if warm:
            for host in pair.hosts:
                host.warm()
        yield pair
    finally:
        try:
            for host in pair.hosts:
                host.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)
            os.close(fd)
