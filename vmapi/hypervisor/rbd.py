"""The API host as a Ceph client: RBD images handled whole, from argument lists of the
``rbd`` and ``qemu-img`` tools (Debian's ceph-common and qemu-utils with
qemu-block-extra's rbd driver), never through a shell and never with the key on a
command line (it is read from its file: ``--keyfile`` for ``rbd``, a QEMU secret object
``file=`` for ``qemu-img``).

Why the tools and not Ceph's Python bindings (python3-rados/python3-rbd): the bindings
are compiled for Debian's own Python and cannot be installed into vmapi's virtualenv
from PyPI; the tools are what every Ceph admin already has, ``qemu-img convert`` turns a
qcow2 image into a raw RBD image in one pass without a temporary file, and every call
is bounded by a timeout that kills the tool.

Why here and not through libvirt: libvirt 9.0's rbd pools have no volume upload or
download streams, no clone across pools, and learn of an image another client made only
by a refresh that lists and opens every image of the pool (CloudStack #14188: 11.7 s for
950 images). What needs one image (is it there, how large, its parent) is one
``rbd info`` here.

Nothing here knows vmapi's database or Flask: a :class:`CephAccess` says how to reach
the cluster.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


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


class RbdError(Exception):
    """A command failed; the message names the command (never the key) and what the tool
    said."""


class RbdNotFound(RbdError):
    """No such image (or snapshot)."""


class RbdBusy(RbdError):
    """The image cannot go: a snapshot of it has clones (the message names them), or a
    client still has it open (watchers)."""


class RbdTimeout(RbdError):
    """A command ran past its bound and was killed."""


class RbdClient:
    """Whole-image operations on one cluster, as one user."""

    def __init__(self, access: CephAccess) -> None:
        self.access = access

    def info(self, pool: str, name: str) -> RbdImage | None:
        """The image, or None when the pool has none of that name (one ``rbd info``; the
        pool is never listed)."""
        raise NotImplementedError

    def list_images(self, pool: str) -> list[str]:
        """Names of the pool's images (``rbd ls``: names only, no image is opened)."""
        raise NotImplementedError

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
        raise NotImplementedError

    def copy_flattened(
        self, pool: str, source: str, name: str, snapshot: str, timeout: float
    ) -> int:
        """Make ``name`` a copy of image ``source`` as it is now that stands alone, without
        its bytes leaving the cluster through vmapi: a snapshot of ``source`` (taken and
        protected here, named after ``name``), a clone of it, the clone flattened (RBD's
        copy-up, done by librbd), the temporary snapshot removed again; then ``name``
        gets its own protected snapshot ``snapshot``. All within ``timeout`` seconds; on
        any failure ``name`` and the temporary snapshot are gone again. Returns the size
        in bytes. ``RbdNotFound`` when ``source`` is missing, ``RbdBusy`` when ``name``
        exists."""
        raise NotImplementedError

    def remove_image(self, pool: str, name: str) -> bool:
        """Remove the image with every snapshot of it (unprotected first); False when there
        was none. ``RbdBusy`` (nothing removed) while a snapshot has clones or a client
        has it open."""
        raise NotImplementedError

    def children(self, pool: str, name: str) -> list[str]:
        """``pool/image`` of every clone of any snapshot of the image."""
        raise NotImplementedError

    def export(self, pool: str, name: str, timeout: float) -> Iterator[bytes]:
        """The image's raw bytes in chunks (``rbd export ... -``), within ``timeout``
        seconds; close the iterator to stop early (the tool is killed)."""
        raise NotImplementedError
