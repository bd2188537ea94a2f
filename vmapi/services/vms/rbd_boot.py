"""A root disk in an rbd storage type: an RBD clone of the image, written once into the
type's Ceph pool (:mod:`vmapi.services.images.rbd_copies`), grown to ``root_size``.

The steps, each with its inverse on the create's undo stack: the node's secret and rbd
pool (:func:`vmapi.services.storage.ceph.ensure_rbd_pool`: QEMU there reaches the image
through them); the image's RBD image (written when missing: "writing the image into
Ceph"); the clone (``creating the root disk``). The clone is made by the API host's Ceph
client rather than by ``vol-create-from`` in the node's libvirt pool: libvirt knows an
image another client wrote only after a refresh of the pool, which lists and opens
every image in it (the slowness CloudStack #14188 reports), while ``rbd clone`` touches
the one parent. The domain reaches the clone as a network disk, never through the pool.

The clone is made by the API host in-process, through Ceph's Python bindings on this
process's connection to the cluster (:mod:`vmapi.hypervisor.librbd`: no ``rbd`` process
starting and connecting for each create), and grown to ``root_size`` before anything
opens it: the guest never sees the image's size. It runs in a thread while the create
goes on with the seed and the domain's definition; the create waits for it before the
domain starts. Its undo waits for it too, then removes it (a failed clone made nothing).
When the image is in the Ceph pool already, the clone starts even before the create's
claim (:func:`early_clone`: it needs no node), its row's id taken from the sequence.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from vmapi.extensions import db
from vmapi.hypervisor import HypervisorError
from vmapi.hypervisor.librbd import LibRbdClient
from vmapi.hypervisor.rbd import RbdBusy
from vmapi.models import ImageRbd, Storage, StorageType, Vm
from vmapi.models.catalog import RBD
from vmapi.models.leftover import VOLUME
from vmapi.services.images.rbd_copies import (
    held_rbd_image,
    rbd_image_if_there,
    remove_rbd_if_unused,
)
from vmapi.services.leftovers import Left
from vmapi.services.names import volume_name
from vmapi.services.nodes.domains import hypervisor_failure, name_taken
from vmapi.services.nodes.hosts import Host
from vmapi.services.storage.ceph import (
    KeyUnreadable,
    Steps,
    ensure_rbd_pool,
    key_unreadable,
    librbd_client,
    remove_rbd_volume,
)
from vmapi.services.undo import Undo

if TYPE_CHECKING:  # (a cycle otherwise: boot imports this module)
    from vmapi.services.vms.boot import Boot

log = logging.getLogger(__name__)

#: a root disk's target (vmapi.services.vms.boot's too)
ROOT_TARGET = "vda"


def rbd_type(type_id: int) -> StorageType:
    """An rbd type, read under a share lock as a volume's type is (its Ceph fields cannot
    change under a root disk being made)."""
    stmt = select(StorageType).where(StorageType.id == type_id, StorageType.backend == RBD)
    return db.session.scalars(stmt.with_for_update(read=True)).one()


class Cloning:
    """The root disk's clone, made by the API host's in-process Ceph client in a thread
    of its own while the create goes on (no database, no Flask: the client calls
    librbd only)."""

    def __init__(self, make: Callable[[], None]) -> None:
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(make,), daemon=True,
                                        name="vmapi-rbd-clone")  # fmt: skip
        self._thread.start()

    def _run(self, make: Callable[[], None]) -> None:
        try:
            make()
        except BaseException as exc:  # (handed to the request's thread by wait())
            self.error = exc

    def wait(self) -> bool:
        """Wait for the clone (each of its calls is bounded by Ceph's timeouts, set from
        the client's); True when it was made."""
        self._thread.join()
        return self.error is None


@dataclass
class RbdClone:
    """A root disk's clone, started (:class:`Cloning`): its storage row's id, and where
    it is; ``left``: what an undo that cannot remove it lists (None until the VM's node
    is known: then a failed removal is only logged, and reconcile reports the image as
    unowned_volume, then as abandoned_clone once older than BUILD_TIMEOUT, which --fix
    removes)."""

    storage_id: int
    storage_type_id: int
    pool: str  # the Ceph pool
    name: str
    cloning: Cloning
    left: Left | None = None

    @property
    def path(self) -> str:
        """As libvirt reports RBD volumes: ``<ceph pool>/<name>``."""
        return f"{self.pool}/{self.name}"

    def placed(self, node_id: int, vm_id: int, libvirt_pool: str | None) -> None:
        """Its VM's row is placed on ``node_id``: an undo that fails lists it there."""
        self.left = Left(node_id, VOLUME, self.name, vm_id, libvirt_pool)

    def remove(self) -> None:
        """Undo: wait for the clone, then remove it (a failed clone made nothing; a taken
        name is not ours)."""
        if self.cloning.wait():
            storage_type = db.session.get(StorageType, self.storage_type_id)
            assert storage_type is not None
            remove_rbd_volume(storage_type, self.name)

    def ready(self, host: Host) -> None:
        """Before the domain starts: wait for the clone; its failure as POST /vm's steps
        answer."""
        if self.cloning.wait():
            return
        exc = self.cloning.error
        if isinstance(exc, RbdBusy):  # not ours (its id came from the sequence: never twice)
            raise name_taken(exc, self.path, host, "an RBD image") from exc
        if isinstance(exc, HypervisorError):
            raise hypervisor_failure(exc, "creating the root disk", host) from exc
        raise exc  # type: ignore[misc]


def start_clone(
    client: LibRbdClient, parent: ImageRbd, storage_id: int, size: int, undo: Undo
) -> RbdClone:
    """Start the clone of ``parent``'s snapshot for the root disk of storage row
    ``storage_id`` (grown to ``size``); its undo (waits for it, removes it) goes on
    ``undo``."""
    name = volume_name(storage_id)
    pool, image, snapshot = parent.ceph_pool, parent.rbd_name, parent.snapshot
    cloning = Cloning(lambda: client.clone(pool, image, snapshot, name, size))
    clone = RbdClone(storage_id, parent.storage_type_id, pool, name, cloning)
    undo.push(f"deleting root disk {clone.path}", clone.remove, lambda: clone.left)
    return clone


@contextmanager
def early_clone(boot: Boot | None, undo: Undo) -> Iterator[RbdClone | None]:
    """A root disk in an rbd type whose image is in its Ceph pool already: its clone
    started before the create's claim (the quota, the placement, the VM's row), which
    the block makes meanwhile (:func:`vmapi.services.vms.placed.place`, recording the
    clone's name and path on the root disk's row). The clone needs no node: it is made
    in the type's Ceph pool by the API host's client, whatever node the VM gets.

    The root disk's row id, which names the clone, is taken from its sequence first
    (PostgreSQL ``nextval``). The image's RBD image is held (the shared lock of
    :func:`~vmapi.services.images.rbd_copies.rbd_image_if_there`) while the block runs,
    until the root disk's row, a user of it, is committed. The clone's undo is on
    ``undo`` from its start: any failure of the create (the quota, no valid host, the
    UUID, the database, the node) removes it.

    None (nothing started: the clone is made after the claim, :func:`make_rbd_root`)
    for any other VM, an image not in Ceph yet (the create writes it there once it is
    placed: a refused request writes nothing), a Ceph key this host cannot read, and on
    SQLite (no sequence to take an id from before the row's insert)."""
    if boot is None or boot.rbd_type_id is None or db.engine.dialect.name != "postgresql":
        yield None
        return
    storage_type = db.session.get(StorageType, boot.rbd_type_id)
    assert storage_type is not None  # (checked by plan_boot; a type in use stays)
    try:
        client = librbd_client(storage_type)
    except KeyUnreadable:  # (answered at its step once the VM is placed, as before)
        yield None
        return
    with rbd_image_if_there(boot.source, storage_type) as parent:
        if parent is None:
            yield None
            return
        sequence = func.pg_get_serial_sequence(Storage.__tablename__, "id")
        storage_id = db.session.scalar(select(func.nextval(sequence)))
        db.session.commit()  # (a sequence's value is taken for good) nothing stays open
        yield start_clone(client, parent, storage_id, boot.root_size, undo)


def make_rbd_root(
    vm: Vm, root: Storage, boot: Boot, host: Host, undo: Undo, clone: RbdClone | None
) -> Callable[[], None]:
    """The node's Ceph access, then (unless ``clone`` was started before the claim,
    :func:`early_clone`) the image in Ceph (written if missing) and the clone (grown to
    the root disk's size), which goes on while the create does (the seed, the domain's
    definition): call what this returns before the domain starts (it waits for the
    clone and raises its failure). The row records the clone's path (``<ceph
    pool>/<name>``, as libvirt reports RBD volumes). Failures answer as POST /vm's steps
    do, with ``data.step``; ``CopyGone`` when the image was deleted meanwhile. What was
    made for the first time is logged."""
    messages: list[str] = []
    storage_type = db.session.get(StorageType, root.storage_type_id)
    assert storage_type is not None
    db.session.commit()  # (only read) nothing stays open across the node and the cluster
    steps = Steps()  # (the step a failure names: ensure_rbd_pool moves it along too)
    try:
        ensure_rbd_pool(storage_type, host, undo, messages, steps)
        if clone is None:
            steps.step = "writing the image into Ceph"
            client = librbd_client(storage_type)
            with held_rbd_image(boot.source, storage_type) as held:
                if held.made:  # (this root disk's row goes after it: it does not count)
                    row_id, root_id = held.row.id, root.id
                    image = f"image {boot.source.id}"
                    where = f"Ceph pool {storage_type.ceph_pool}"
                    undo.push(f"removing {image} from {where} unless used",
                              lambda: remove_rbd_if_unused(row_id, ignoring=root_id))  # fmt: skip
                    messages.append(f"{image.capitalize()} was written into {where} "
                                    f"({held.seconds:.1f} s).")  # fmt: skip
                steps.step = "creating the root disk"
                # (the image cannot go once the clone is started: this root disk's row,
                # committed with the VM's claim, is a user of it, and RBD keeps a parent
                # with clones)
                clone = start_clone(client, held.row, root.id, boot.root_size, undo)
                clone.placed(host.node.id, vm.id, root.pool)
                root.path = clone.path
    except KeyUnreadable as exc:
        raise key_unreadable(exc, storage_type) from exc
    except HypervisorError as exc:
        raise hypervisor_failure(exc, steps.step, host) from exc
    for message in messages:
        log.info("vm-%s: %s", vm.id, message)
    db.session.add(root)
    db.session.commit()
    made = clone
    return lambda: made.ready(host)
