"""The API host as a Ceph client: RBD images handled whole, from argument lists of the
``rbd`` and ``qemu-img`` tools (Debian's ceph-common and qemu-utils with
qemu-block-extra's rbd driver), never through a shell and never with the key on a
command line (it is read from its file: ``--keyfile`` for ``rbd``, a QEMU secret object
``file=`` for ``qemu-img``).

Why the tools here and not Ceph's Python bindings (python3-rados/python3-rbd): the tools
are what every Ceph admin already has, ``qemu-img convert`` turns a qcow2 image into a
raw RBD image in one pass without a temporary file, and every call is bounded by a
timeout that kills the tool. What POST /vm and a rebuild wait for, a root disk's clone,
is made in-process through the bindings instead (:mod:`vmapi.hypervisor.librbd`: a process and
its connection to the cluster per command cost more than the clone itself).

Why here and not through libvirt: libvirt 9.0's rbd pools have no volume upload or
download streams, no clone across pools, and learn of an image another client made only
by a refresh that lists and opens every image of the pool (CloudStack #14188: 11.7 s for
950 images). What needs one image (is it there, how large, its parent) is one
``rbd info`` here.

Nothing here knows vmapi's database or Flask: a :class:`CephAccess` says how to reach
the cluster.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from vmapi.hypervisor.errors import HypervisorError, HypervisorTimeout

log = logging.getLogger(__name__)

#: a copy's temporary snapshot of its source: this, then the copy's name
COPY_SNAPSHOT = "vmapi-copy-to-"
#: bytes one chunk of :meth:`RbdClient.export` holds at most
CHUNK = 1024 * 1024
#: the id of the QEMU secret object that reads the key file
SECRET_ID = "vmapikey"  # noqa: S105 - an object id; the key stays in its file
#: what in a tool's stderr tells the kind of failure (checked in this order)
_CLUSTER = ("couldn't connect to the cluster", "error opening pool")
_NOT_FOUND = ("No such file or directory", "ENOENT")
_BUSY = ("has snapshots", "child", "watchers", "image is in use", "exists",
         "Device or resource busy", "is protected")  # fmt: skip
#: the timestamp, thread and level that Ceph's log lines start with
_LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\dT\S+ [0-9a-f]+ +-?\d+ ")


@dataclass(frozen=True)
class CephAccess:
    """How the API host reaches a cluster as a cephx user."""

    monitors: tuple[tuple[str, int], ...]  # (host, msgr v1 port)
    user: str  # without ``client.``
    keyfile: str  # the file holding the user's key, base64 as ``ceph auth get-key`` prints it
    timeout: float  # seconds any one command may take (a copy has its own bound)


@dataclass(frozen=True)
class RbdImage:
    """What ``rbd info`` says of one image."""

    name: str
    size: int  # bytes (the virtual size)
    parent: str | None  # ``pool/image@snapshot`` of a clone, None for an image that stands alone
    snapshots: tuple[str, ...]  # names, oldest first
    created: datetime | None = None  # when it was made (UTC, whole seconds), if the tool says


#: the "host" a failure of the API host's Ceph client names (it is the cluster's)
CEPH_URI = "rbd:"


class RbdError(HypervisorError):
    """A command failed; the message names the command (never the key) and what the tool
    said. A :class:`HypervisorError` of :data:`CEPH_URI`: the services answer it as a
    step of theirs that failed (502 with ``data.step``)."""

    #: the in-process client's connection is not to be used again after this failure
    lost = False

    def __init__(self, message: str) -> None:
        # (not super(): RbdTimeout's next class, HypervisorTimeout, takes a number)
        HypervisorError.__init__(self, CEPH_URI, message)
        self.args = (message,)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RbdNotFound(RbdError):
    """No such image (or snapshot)."""


class RbdBusy(RbdError):
    """The image cannot go: a snapshot of it has clones (the message names them), or a
    client still has it open (watchers)."""


class RbdTimeout(RbdError, HypervisorTimeout):
    """A command ran past its bound and was killed, or a call of the in-process client
    ran into Ceph's own timeout (a :class:`HypervisorTimeout`: 504); ``timeout`` the
    bound in seconds."""

    reason_class = "timeout"

    def __init__(self, message: str, timeout: float = 0.0) -> None:
        RbdError.__init__(self, message)
        self.timeout = timeout


def _checked(kind: str, value: str) -> str:
    """A pool, image or snapshot name as the tools take it inside a spec (``pool/image@snap``)
    and never as an option."""
    if not value or value.startswith("-") or any(c in value for c in "/@\0\n"):
        raise ValueError(f"not a usable {kind} name: {value!r}")
    return value


def _opt(value: object) -> str:
    """A value inside QEMU's ``key=value,...`` options (a comma is doubled)."""
    return str(value).replace(",", ",,")


def _monitor(host: str, port: int) -> str:
    """``-m``'s form of a monitor: an address as msgr v1 (no v2 attempt first), a host name
    as ``host:port`` (Ceph resolves it)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"{host}:{port}"
    return f"v1:[{address}]:{port}" if address.version == 6 else f"v1:{address}:{port}"


def _environment() -> dict[str, str]:
    """The tools' environment without Ceph's own variables (no host configuration, no
    extra arguments through ``CEPH_ARGS``), in UTC (``rbd info`` prints an image's
    creation time in the local time zone, without one)."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith("CEPH")}
    return {**kept, "TZ": "UTC0"}


def _created(stamp: object) -> datetime | None:
    """``rbd info``'s ``create_timestamp`` (C's ``ctime()`` in UTC, see
    :func:`_environment`), None when there is none or it reads otherwise."""
    try:
        made = datetime.strptime(" ".join(str(stamp).split()), "%a %b %d %H:%M:%S %Y")
    except ValueError:
        return None
    return made.replace(tzinfo=UTC)


def _deadline(seconds: float, what: str) -> Callable[[], float]:
    """What is left of a bound shared by several commands (RbdTimeout when nothing is)."""
    end = time.monotonic() + seconds

    def left() -> float:
        if (remaining := end - time.monotonic()) <= 0:
            raise RbdTimeout(f"{what}: not done within {seconds:g} s", seconds)
        return remaining

    return left


class RbdClient:
    """Whole-image operations on one cluster, as one user."""

    def __init__(self, access: CephAccess) -> None:
        self.access = access

    def _rbd_args(self, args: tuple[str, ...], bound: float) -> list[str]:
        a = self.access
        monitors = ",".join(_monitor(host, port) for host, port in a.monitors)
        mount = str(max(1, int(bound * 0.8)))  # the tool's own "cannot reach" comes first
        return ["rbd", "-c", "/dev/null", "-m", monitors, "--id", a.user,
                "--keyfile", a.keyfile, "--client-mount-timeout", mount, *args]  # fmt: skip

    def _rbd(self, *args: str, bound: float | None = None) -> bytes:
        bound = self.access.timeout if bound is None else bound
        return self._run(self._rbd_args(args, bound), bound, "rbd " + " ".join(args)).stdout

    def _run(
        self, argv: list[str], bound: float, what: str, ok: tuple[int, ...] = (0,)
    ) -> subprocess.CompletedProcess[bytes]:
        try:
            done = subprocess.run(  # noqa: S603 - fixed words and checked names
                argv, capture_output=True, timeout=bound, env=_environment(), check=False
            )
        except subprocess.TimeoutExpired:
            raise RbdTimeout(f"{what}: no answer within {bound:g} s (killed)", bound) from None
        except OSError as exc:
            raise RbdError(f"{what}: cannot run {argv[0]}: {exc.strerror}") from None
        if done.returncode not in ok:
            raise self._failure(what, done.returncode, done.stderr or done.stdout)
        return done

    def _failure(self, what: str, code: int, said: bytes) -> RbdError:
        """The error for a failed command: its kind from what the tool said, the message
        its last lines with the key taken out."""
        text = said.decode(errors="replace")
        try:
            with open(self.access.keyfile, encoding="ascii", errors="replace") as file:
                key = file.read(4096).strip()
        except OSError:
            key = ""
        lines = []
        for line in text.splitlines():
            if (key and key in line) or "decode key" in line:
                line = "auth: the key in the key file cannot be used"
            line = _LOG_PREFIX.sub("", line).strip()
            if any(c.isalnum() for c in line) and line not in lines[-1:]:
                lines.append(line)
        tail = " / ".join(lines[-4:])[-1000:] or "no message"
        message = f"{what} failed ({code}): {tail}"
        if any(s in text for s in _CLUSTER):
            return RbdError(message)
        if any(s in text for s in _NOT_FOUND):
            return RbdNotFound(message)
        if any(s in text for s in _BUSY):
            return RbdBusy(message)
        return RbdError(message)

    def _qemu_target(self, pool: str, name: str) -> str:
        """QEMU's options for image ``pool/name`` as the user: key from the secret object,
        no configuration file."""
        opts = ["driver=raw", "file.driver=rbd", f"file.pool={_opt(pool)}",
                f"file.image={_opt(name)}", "file.conf=/dev/null",
                f"file.user={_opt(self.access.user)}", f"file.key-secret={SECRET_ID}"]  # fmt: skip
        for i, (host, port) in enumerate(self.access.monitors):
            opts += [f"file.server.{i}.host={_opt(host)}", f"file.server.{i}.port={port}"]
        return ",".join(opts)

    def _secret(self) -> list[str]:
        return ["--object", f"secret,id={SECRET_ID},file={_opt(self.access.keyfile)},format=base64"]

    def info(self, pool: str, name: str) -> RbdImage | None:
        """The image, or None when the pool has none of that name (one ``rbd info``; the
        pool is never listed)."""
        spec = f"{_checked('pool', pool)}/{_checked('image', name)}"
        try:
            found = json.loads(self._rbd("info", "--format", "json", spec))
        except RbdNotFound:
            return None
        parent = found.get("parent")
        if parent:
            space = f"{parent['pool_namespace']}/" if parent.get("pool_namespace") else ""
            parent = f"{parent['pool']}/{space}{parent['image']}@{parent['snapshot']}"
        snapshots: tuple[str, ...] = ()
        if found.get("snapshot_count"):
            snapshots = tuple(s["name"] for s in self._snapshots(pool, name) or ())
        created = _created(found.get("create_timestamp"))
        return RbdImage(name=found["name"], size=int(found["size"]), parent=parent or None,
                        snapshots=snapshots, created=created)  # fmt: skip

    def _snapshots(self, pool: str, name: str) -> list[dict] | None:
        """``rbd snap ls`` oldest first; None when there is no such image."""
        try:
            found = json.loads(self._rbd("snap", "ls", "--format", "json", f"{pool}/{name}"))
        except RbdNotFound:
            return None
        return sorted(found, key=lambda s: s["id"])

    def list_images(self, pool: str) -> list[str]:
        """Names of the pool's images (``rbd ls``: names only, no image is opened)."""
        return sorted(json.loads(self._rbd("ls", "--format", "json", _checked("pool", pool))))

    def children(self, pool: str, name: str) -> list[str]:
        """``pool/image`` of every clone of any snapshot of the image."""
        spec = f"{_checked('pool', pool)}/{_checked('image', name)}"
        found = json.loads(self._rbd("children", "--all", "--format", "json", spec))
        return sorted(f"{c['pool']}/{c['pool_namespace'] + '/' if c.get('pool_namespace') else ''}"
                      f"{c['image']}" for c in found)  # fmt: skip

    def import_image(
        self, pool: str, name: str, source: str, source_format: str, snapshot: str,
        timeout: float,
    ) -> int:  # fmt: skip
        """Write the file ``source`` (``raw`` or ``qcow2``) into a new raw image ``name``
        of its virtual size, check that the image reads back as the file's content
        (``qemu-img compare``), then take the snapshot ``snapshot`` and protect it (the
        parent of clones). All within ``timeout`` seconds. On any failure nothing named
        ``name`` is left. Returns the image's size in bytes. ``RbdBusy`` when an image of
        that name exists already (left alone)."""
        if source_format not in ("raw", "qcow2"):
            raise ValueError(f"not an image format to import: {source_format!r}")
        spec = f"{_checked('pool', pool)}/{_checked('image', name)}"
        snap = f"{spec}@{_checked('snapshot', snapshot)}"
        left = _deadline(timeout, f"importing {source} into {spec}")
        # an absolute path: never read as a protocol ("rbd:...", "json:...")
        file = (f"driver={source_format},file.driver=file,"
                f"file.filename={_opt(os.path.abspath(source))}")  # fmt: skip
        what = f"qemu-img info {source}"
        try:
            seen = json.loads(self._run(["qemu-img", "info", "--output=json", "--image-opts",
                                         file], left(), what).stdout)  # fmt: skip
        except RbdNotFound as exc:  # no such file: not a missing image
            raise RbdError(str(exc)) from None
        specific = (seen.get("format-specific") or {}).get("data") or {}
        if seen.get("backing-filename") or specific.get("data-file"):
            raise RbdError(f"{what}: the image names another file (backing or data file)")
        size = int(seen["virtual-size"])
        self._rbd("create", "--no-progress", "--size", f"{size}B", spec, bound=left())
        try:
            target = self._qemu_target(pool, name)
            self._run(["qemu-img", "convert", "-n", "--target-is-zero", *self._secret(),
                       "--image-opts", file, "--target-image-opts", target],
                      left(), f"qemu-img convert {source} to {spec}")  # fmt: skip
            what = f"qemu-img compare {source} {spec}"
            done = self._run(["qemu-img", "compare", *self._secret(), "--image-opts", file,
                              target], left(), what, ok=(0, 1))  # fmt: skip
            if done.returncode == 1:  # the images differ
                said = done.stdout.decode(errors="replace").strip()
                raise RbdError(f"{what}: the image does not read back as the file: {said}")
            self._rbd("snap", "create", "--no-progress", snap, bound=left())
            self._rbd("snap", "protect", snap, bound=left())
        except BaseException as exc:
            self._undo(exc, [lambda: self.remove_image(pool, name)], spec)
            raise
        return size

    def copy_flattened(
        self, pool: str, source: str, name: str, snapshot: str, timeout: float,
        on_snapshot: Callable[[], None] | None = None, beat: Callable[[], None] | None = None,
    ) -> int:  # fmt: skip
        """Make ``name`` a copy of image ``source`` as it is now that stands alone, without
        a byte of it passing through the API host: a snapshot of ``source`` (taken and
        protected here, named after ``name``), a clone of it, the clone flattened by the
        cluster's manager (its ``rbd_support`` task: :mod:`vmapi.hypervisor.rbd_tasks`;
        ``beat`` is called while it is waited for), the temporary snapshot removed again;
        then ``name`` gets its own protected snapshot ``snapshot``. All within
        ``timeout`` seconds; on any failure ``name`` and the temporary snapshot are gone
        again. Returns the size in bytes. ``RbdNotFound`` when ``source`` is missing,
        ``RbdBusy`` when ``name`` exists. ``on_snapshot`` is called as soon as the
        snapshot is taken (or its taking failed): what the caller froze for it may thaw
        (the copy then takes its time)."""
        from vmapi.hypervisor.rbd_tasks import flatten_in_cluster  # cycle: rbd -> rbd_tasks -> rbd

        spec = f"{_checked('pool', pool)}/{_checked('image', name)}"
        temp = f"{pool}/{_checked('image', source)}@{COPY_SNAPSHOT}{name}"
        snap = f"{spec}@{_checked('snapshot', snapshot)}"
        left = _deadline(timeout, f"copying {pool}/{source} to {spec}")
        if self.info(pool, name) is not None:
            raise RbdBusy(f"copying {pool}/{source} to {spec}: {spec} exists")
        try:
            self._rbd("snap", "create", "--no-progress", temp, bound=left())
        finally:
            if on_snapshot is not None:
                on_snapshot()
        undo: list[Callable[[], object]] = [lambda: self._drop_snapshot(temp)]
        try:
            self._rbd("snap", "protect", temp, bound=left())
            self._rbd("clone", temp, spec, bound=left())
            undo.insert(0, lambda: self.remove_image(pool, name))
            flatten_in_cluster(self, pool, name, left(), beat)
            self._drop_snapshot(temp, bound=left())
            undo.pop()
            self._rbd("snap", "create", "--no-progress", snap, bound=left())
            self._rbd("snap", "protect", snap, bound=left())
            made = self.info(pool, name)
            if made is None:
                raise RbdNotFound(f"rbd info {spec}: the copy is gone")
        except BaseException as exc:
            self._undo(exc, undo, spec)
            raise
        return made.size

    def _drop_snapshot(self, snap: str, protected: bool = True, bound: float | None = None) -> None:
        """Unprotect (unless known not to be protected) and remove ``pool/image@snap``."""
        if protected:
            try:
                self._rbd("snap", "unprotect", snap, bound=bound)
            except RbdError as exc:
                if "already unprotected" not in str(exc):
                    raise
        self._rbd("snap", "rm", "--no-progress", snap, bound=bound)

    @staticmethod
    def _undo(exc: BaseException, undo: list[Callable[[], object]], spec: str) -> None:
        """Take back what was made before ``exc`` (each step even when one before failed);
        what could not be taken back is added to the message of ``exc``."""
        left = []
        for step in undo:
            try:
                step()
            except RbdError as failed:
                log.warning("cleaning up after a failure on %s: %s", spec, failed)
                left.append(str(failed))
        if left and isinstance(exc, RbdError):
            exc.args = (f"{exc}; cleaning up failed too: {'; '.join(left)}",)
            exc.reason = exc.args[0]

    def remove_image(self, pool: str, name: str) -> bool:
        """Remove the image with every snapshot of it (unprotected first); False when there
        was none. ``RbdBusy`` (nothing removed) while a snapshot has clones or a client
        has it open."""
        spec = f"{_checked('pool', pool)}/{_checked('image', name)}"
        snapshots = self._snapshots(pool, name)
        if snapshots is None:
            return False
        if snapshots:
            clones = self.children(pool, name)
            if clones:
                raise RbdBusy(f"removing {spec}: its snapshots have clones: {', '.join(clones)}")
        status = json.loads(self._rbd("status", "--format", "json", spec))
        watchers = [w.get("address", "?") for w in status.get("watchers") or ()]
        if watchers:
            raise RbdBusy(f"removing {spec}: open by clients (watchers): {', '.join(watchers)}")
        for snap in snapshots:
            self._drop_snapshot(f"{spec}@{snap['name']}", snap.get("protected") == "true")
        try:
            self._rbd("rm", "--no-progress", spec)
        except RbdNotFound:
            return False
        return True

    def resize(self, pool: str, name: str, size: int) -> None:
        """Grow the image to ``size`` bytes (never shrinks: a smaller size is refused by
        the tool, ``RbdError``). ``RbdNotFound`` when there is none."""
        spec = f"{_checked('pool', pool)}/{_checked('image', name)}"
        self._rbd("resize", "--no-progress", "--size", f"{size}B", spec)

    def export(self, pool: str, name: str, timeout: float) -> Iterator[bytes]:
        """The image's raw bytes in chunks (``rbd export ... -``), within ``timeout``
        seconds; close the iterator to stop early (the tool is killed)."""
        spec = f"{_checked('pool', pool)}/{_checked('image', name)}"
        what = f"rbd export {spec} -"
        argv = self._rbd_args(("export", "--no-progress", spec, "-"), min(timeout, 60.0))
        with tempfile.TemporaryFile() as said:
            tool = subprocess.Popen(  # noqa: S603 - fixed words and checked names
                argv, stdout=subprocess.PIPE, stderr=said, env=_environment()
            )
            killed = threading.Event()
            timer = threading.Timer(timeout, lambda: (killed.set(), tool.kill()))
            timer.start()
            try:
                assert tool.stdout is not None
                while chunk := tool.stdout.read1(CHUNK):
                    yield chunk
                code = tool.wait()
            finally:
                timer.cancel()
                if tool.poll() is None:
                    tool.kill()
                    tool.wait()
                tool.stdout.close()  # type: ignore[union-attr]
            if killed.is_set():
                raise RbdTimeout(f"{what}: not done within {timeout:g} s (killed)", timeout)
            if code != 0:
                said.seek(0)
                raise self._failure(what, code, said.read()[-65536:])
