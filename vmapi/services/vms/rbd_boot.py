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
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import select

from vmapi.extensions import db
from vmapi.hypervisor import HypervisorError
from vmapi.hypervisor.rbd import RbdBusy
from vmapi.models import Storage, StorageType, Vm
from vmapi.models.catalog import RBD
from vmapi.models.leftover import VOLUME
from vmapi.services.images.copies import Source
from vmapi.services.images.rbd_copies import held_rbd_image, remove_rbd_if_unused
from vmapi.services.leftovers import Left
from vmapi.services.nodes.domains import hypervisor_failure, name_taken
from vmapi.services.nodes.hosts import Host
from vmapi.services.storage.ceph import (
    KeyUnreadable,
    Steps,
    ensure_rbd_pool,
    key_unreadable,
    librbd_client,
)
from vmapi.services.storage.volumes import delete_volume
from vmapi.services.undo import Undo

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


def make_rbd_root(
    vm: Vm, root: Storage, source: Source, size: int, host: Host, undo: Undo
) -> Callable[[], None]:
    """The node's Ceph access, the image in Ceph (written if missing), then the clone
    (grown to ``size``), which goes on while the create does (the seed, the domain's
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
        steps.step = "writing the image into Ceph"
        client = librbd_client(storage_type)
        with held_rbd_image(source, storage_type) as held:
            if held.made:  # (this root disk's row goes after it: it does not count)
                row_id, root_id = held.row.id, root.id
                undo.push(f"removing image {source.id} from Ceph pool "
                          f"{storage_type.ceph_pool} unless used",
                          lambda: remove_rbd_if_unused(row_id, ignoring=root_id))  # fmt: skip
                messages.append(f"Image {source.id} was written into Ceph pool "
                                f"{storage_type.ceph_pool} ({held.seconds:.1f} s).")  # fmt: skip
            steps.step = "creating the root disk"
            pool, name = held.row.ceph_pool, root.volume_name or ""
            parent, snapshot = held.row.rbd_name, held.row.snapshot
            # (the image cannot go once the clone is started: this root disk's row,
            # committed with the VM's claim, is a user of it, and RBD keeps a parent
            # with clones)
            cloning = Cloning(lambda: client.clone(pool, parent, snapshot, name, size))

            def unclone() -> None:
                if cloning.wait():  # (a failed clone made nothing; a taken name is not ours)
                    delete_volume(root, host)

            undo.push(f"deleting root disk {pool}/{name}", unclone,
                      Left(host.node.id, VOLUME, name, vm.id, root.pool))  # fmt: skip
            root.path = f"{pool}/{name}"
    except KeyUnreadable as exc:
        raise key_unreadable(exc, storage_type) from exc
    except HypervisorError as exc:
        raise hypervisor_failure(exc, steps.step, host) from exc
    for message in messages:
        log.info("vm-%s: %s", vm.id, message)
    db.session.add(root)
    db.session.commit()

    def ready() -> None:
        if cloning.wait():
            return
        exc = cloning.error
        if isinstance(exc, RbdBusy):  # not ours (ours are recorded before they are made)
            raise name_taken(exc, root.path or name, host, "an RBD image") from exc
        if isinstance(exc, HypervisorError):
            raise hypervisor_failure(exc, "creating the root disk", host) from exc
        raise exc  # type: ignore[misc]

    return ready
