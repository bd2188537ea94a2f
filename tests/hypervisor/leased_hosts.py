"""Two private libvirtd hosts with libvirt's lock manager: disk leases (virtlockd).

Follows ../shared/recipes/disk-leases.md on top of tests/hypervisor/two_hosts.py, with
the settings deploy/libvirt/ ships for a node (all but the lease folder's path). Each host
runs, in its own mount namespace and in this order, virtlogd, virtlockd and libvirtd
(libvirtd registers the lockspace with its virtlockd at start-up, through
``/run/libvirt/virtlockd-sock``: a virtlockd started later leaves every domain start
failing with "Lockspace for path ... does not exist"). Its ``qemu.conf`` names
``lock_manager = "lockd"`` and its ``qemu-lockd.conf`` gives every writable disk a lease
(``auto_disk_leases``) in one folder both hosts share, ``<pair>/leases``: the lease of a
disk is a file there named by the SHA-256 of the disk's path as the domain writes it,
held by the virtlockd of the host whose QEMU has the disk open (a POSIX write lock over
the whole file, dropped by the kernel when that virtlockd or the QEMU's connection to it
ends).

On one machine QEMU's own image locks would refuse the second host before the lease is
looked at; the domains of these tests run QEMU through ``qemu-unlocked`` (beside this
file), which turns them off. Nothing but these hosts uses it: it is each host's default
emulator too (libvirtd finds ``qemu-system-x86_64`` in its ``PATH``, which names the
host's ``bin/`` first, where a link to it is), so the domains vmapi defines there, which
name no emulator, run through it as well.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

from tests.hypervisor.two_hosts import (
    MOUNTS,
    PORTS_PER_HOST,
    HostUnavailable,
    PrivateHost,
    TwoHosts,
    _end,
    _is,
    _pid,
    check_machine,
    two_hosts,
)
from tests.libvirt_conf import shipped

#: the test-only emulator: QEMU without its own image locks
EMULATOR = Path(__file__).with_name("qemu-unlocked")
# virtlockd between virtlogd and libvirtd, inside the namespace (see two_hosts.START)
DAEMONS = """
virtlogd -d -p "$1/virtlogd.pid"
virtlockd -d -p "$1/virtlockd.pid"
PATH="$1/bin:$PATH" libvirtd -d --pid-file "$1/libvirtd.pid"
"""
START = MOUNTS + DAEMONS
#: migration ports: above the range two_hosts picks from (49400 to 53399)
PORTS = 53400


class LeasedHost(PrivateHost):
    """A private host whose disks get leases in the pair's shared ``leases`` folder."""

    script: ClassVar[str] = START

    @property
    def leases(self) -> Path:
        """The lockspace: one folder of the pair, at the same path for both hosts."""
        return self.folder.parent / "leases"

    @property
    def pid_files(self) -> dict[str, Path]:
        # ended in this order: libvirtd, then virtlockd (which would end the QEMU it holds
        # a lease for: stop() ends the guests first), then virtlogd
        return {"libvirtd": self.folder / "libvirtd.pid",
                "virtlockd": self.folder / "virtlockd.pid",
                "virtlogd": self.folder / "virtlogd.pid"}  # fmt: skip

    def pid(self, daemon: str) -> int:
        """The pid of one of its daemons (``libvirtd``, ``virtlockd``, ``virtlogd``)."""
        pid = _pid(self.pid_files[daemon])
        assert pid is not None and _is(pid, daemon, self.folder), f"no {daemon} in {self.folder}"
        return pid

    def start(self) -> None:
        self.leases.mkdir(mode=0o755, exist_ok=True)
        default = self.folder / "bin" / "qemu-system-x86_64"  # the default emulator
        default.parent.mkdir(parents=True, exist_ok=True)
        if not default.is_symlink():
            default.symlink_to(EMULATOR)
        super().start()

    def config(self) -> dict[str, dict[str, object]]:
        """The shipped node settings (deploy/libvirt/), the pair's folder as lockspace."""
        files = super().config()
        files["qemu.conf"] = {**files["qemu.conf"], **shipped("qemu-lock-manager.conf")}
        files["qemu-lockd.conf"] = {**shipped("qemu-lockd.conf"),
                                    "file_lockspace_dir": str(self.leases)}  # fmt: skip
        files["virtlockd.conf"] = {"log_outputs": "3:file:/var/log/libvirt/virtlockd.log"}
        return files

    def warm(self) -> None:
        """Probe the emulators the tests' domains run: the one they name, the default."""
        for named in (["--emulatorbin", str(EMULATOR)], []):
            subprocess.run(["virsh", "-c", self.uri, "domcapabilities", "--virttype", "qemu",
                            *named], check=True, capture_output=True, timeout=300)  # fmt: skip

    def restart_libvirtd(self) -> None:
        """Restart its libvirtd alone, as ``systemctl restart libvirtd`` would: SIGTERM,
        then started again in the namespace (entered through its virtlockd)."""
        _end(self.pid("libvirtd"))
        path = f"{self.folder / 'bin'}:{os.environ.get('PATH', '/usr/sbin:/usr/bin')}"
        subprocess.run(["nsenter", "-t", str(self.pid("virtlockd")), "-m", "--", "env",
                        f"PATH={path}", "libvirtd", "-d", "--pid-file",
                        str(self.pid_files["libvirtd"])],
                       check=True, capture_output=True, timeout=60)  # fmt: skip
        self.wait_until_answering()

    def restart(self) -> None:
        """After a test killed some of its processes: end what is left of it (its domains
        and pools removed, as by stop()) and start its daemons again, in order, in a new
        namespace (QEMU's capabilities stay cached in its folder: no new probe)."""
        self.stop()
        self.start()


def lease_name(disk: str | Path) -> str:
    """The name of a disk's lease: the SHA-256 of its path's text."""
    return hashlib.sha256(str(disk).encode()).hexdigest()


def lease_of(leases: Path, disk: str | Path) -> Path:
    """The lease file of a disk in the lockspace ``leases``."""
    return leases / lease_name(disk)


def lease_holder(leases: Path, disk: str | Path) -> int | None:
    """The pid holding the disk's lease (a POSIX lock on its file, ``/proc/locks``), or
    None when nobody holds it (virtlockd removes the file when it lets the lease go)."""
    try:
        stat = lease_of(leases, disk).stat()
    except FileNotFoundError:
        return None
    device = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        # "1: POSIX  ADVISORY  WRITE 4242 00:2e:1234 0 EOF" ("->" marks a waiter)
        if len(fields) >= 6 and fields[1] == "POSIX" and fields[5] == device:
            return int(fields[4])
    return None


def check_leased_machine() -> None:
    """Raise :class:`HostUnavailable` when leased private daemons cannot run here."""
    check_machine()
    for program in ("virtlockd", "nsenter"):
        if shutil.which(program) is None:
            raise HostUnavailable(f"{program} is not installed")


@contextlib.contextmanager
def leased_hosts(warm: bool = True) -> Iterator[TwoHosts]:
    """Hosts ``a`` and ``b`` with disk leases in ``<pair>/leases``; always stopped and
    removed on the way out."""
    check_leased_machine()
    ports = PORTS + (os.getpid() % 25) * 2 * PORTS_PER_HOST
    with two_hosts(ports, warm=False, host=LeasedHost) as pair:
        if warm:  # both probes at once (a few seconds each)
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(LeasedHost.warm, pair.hosts))
        yield pair
