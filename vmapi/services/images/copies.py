"""Images on nodes: one base volume per image and node, copied through libvirt, shared.

The first VM of an image on a node (or ``flask vmapi image push``) copies the image's file
from the store into the node's pool (the ``local-qcow2`` type's) with a volume upload
stream on the node's libvirt connection — no ssh, no shared filesystem — then reads the
copy back and compares its sha256 with the image's checksum, and only then records it
(:class:`~vmapi.models.ImageCopy`). Every later VM of that image on the node makes its
root disk as a qcow2 overlay on that copy. The whole copy is bounded by
``IMAGE_COPY_TIMEOUT``; each chunk moved beats the worker's heartbeat, so a long copy
that keeps moving outlives gunicorn's worker timeout.

Who may touch a copy is serialized per (image, node) (:mod:`vmapi.services.images.locks`):
making or removing a copy takes the lock exclusively; making an overlay on one takes it
shared, so a copy is never removed under an overlay being made on it. Two requests
racing to copy one image to one node make one copy: the second waits, then finds the
first's.

A copy is removed when nobody uses it: when the request that made it is undone, and
when its image is deleted; a node that cannot be reached then keeps its copy, marked by
a row whose image is gone, for ``flask vmapi reconcile --fix``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from flask import current_app
from sqlalchemy import delete as delete_rows
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from vmapi import heartbeat
from vmapi.extensions import db
from vmapi.hypervisor import HypervisorError, HypervisorTimeout, VolumeExists, VolumeNotFound
from vmapi.models import Image, ImageCopy, Node, NodeState, Storage, StorageType, VirtNode
from vmapi.node_detail import NodeNote
from vmapi.services.images.locks import copy_lock
from vmapi.services.images.store import read_chunks
from vmapi.services.names import image_volume_name
from vmapi.services.nodes.hosts import Host, hypervisor, on_hosts

log = logging.getLogger(__name__)

#: Nodes asked at once when an image's copies are removed.
REMOVAL_WORKERS = 16

Progress = Callable[[int], None]
#: The seeded storage type of root disks and of the copies they are made on.
ROOT_TYPE = "local-qcow2"


class CopyGone(Exception):
    """The image was deleted while its copy was being made (nothing is left)."""


@dataclass(frozen=True)
class Source:
    """What a copy needs of its image (read before any libvirt call)."""

    id: int
    format: str
    size: int
    checksum: str
    path: str  # the file in the image store
    virtual_size: int = 0  # the disk's size it holds (0: not known)

    @classmethod
    def of(cls, image: Image) -> Source:
        store = os.path.abspath(current_app.config["IMAGE_DIR"])
        return cls(image.id, image.format, image.size or 0, image.checksum or "",
                   os.path.join(store, image.file or ""), image.virtual_size or 0)  # fmt: skip


@dataclass(frozen=True)
class Held:
    """A copy that stays while the block of :func:`held_copy` runs; ``made``: by this call."""

    copy: ImageCopy
    made: bool
    seconds: float = 0.0  # how long the copy took (0 when it was there already)


def root_type() -> StorageType:
    """The seeded ``local-qcow2`` type (seeded rows are never deleted or renamed), read
    under a share lock as a volume's type is: its pool cannot change under a root disk."""
    stmt = select(StorageType).where(StorageType.name == ROOT_TYPE)
    return db.session.scalars(stmt.with_for_update(read=True)).one()


def pool_directory(node_id: int, pool: str, virt_method_id: int | None = None) -> str:
    """Where a missing pool is made on the node: its virt_node's local_storage_path (the
    VM's method's, when known), else STORAGE_POOL_DIR/<pool> (as for data volumes)."""
    stmt = select(VirtNode.local_storage_path).where(
        VirtNode.node_id == node_id, VirtNode.local_storage_path.is_not(None)
    )
    if virt_method_id is not None:
        stmt = stmt.where(VirtNode.virt_method_id == virt_method_id)
    configured = db.session.scalars(stmt.order_by(VirtNode.id)).first()
    return configured or f"{current_app.config['STORAGE_POOL_DIR']}/{pool}"


def find_copy(image_id: int, node_id: int) -> ImageCopy | None:
    stmt = select(ImageCopy).where(ImageCopy.image_id == image_id, ImageCopy.node_id == node_id)
    return db.session.scalars(stmt.execution_options(populate_existing=True)).first()


@contextmanager
def held_copy(
    source: Source, host: Host, pool: str, directory: str, progress: Progress | None = None
) -> Iterator[Held]:
    """The node's copy of the image in ``pool`` (made there, in a dir pool at
    ``directory`` if the pool is missing, when there is none), kept from removal while
    the block runs (make the overlay on it there)."""
    node_id = host.node.id
    with copy_lock(source.id, node_id, shared=True):
        copy = find_copy(source.id, node_id)
        db.session.commit()  # (only read) no transaction stays open across libvirt calls
        if copy is not None and copy.pool == pool:
            yield Held(copy, made=False)
            return
    with copy_lock(source.id, node_id):
        copy = find_copy(source.id, node_id)
        db.session.commit()
        if copy is not None and copy.pool != pool:
            # The type's pool changed (possible only while no storage uses it): the copy in
            # the old pool serves nobody any more.
            _remove_if_unused(copy.id)
            copy = None
        if copy is not None:
            yield Held(copy, made=False)
            return
        started = time.monotonic()
        copy = make_copy(source, host, pool, directory, progress)
        yield Held(copy, made=True, seconds=time.monotonic() - started)


def make_copy(
    source: Source, host: Host, pool: str, directory: str, progress: Progress | None = None
) -> ImageCopy:
    """Copy the image to the node, check it, record it (the caller holds the lock)."""
    driver = hypervisor()
    uri = host.uri
    timeout = float(current_app.config["IMAGE_COPY_TIMEOUT"])
    deadline = time.monotonic() + timeout
    name = image_volume_name(source.id)
    driver.ensure_pool(uri, pool, directory)
    try:
        path = _upload(source, uri, pool, name, timeout, progress)
    except VolumeExists:
        # Ours by its name, yet no row: left by a copy whose request died. Its content is
        # unknown, so it is replaced.
        log.warning("replacing %s/%s on %s, left by an unfinished copy", pool, name, uri)
        driver.delete_volume(uri, pool, name)
        path = _upload(source, uri, pool, name, timeout, progress)
    try:
        found = volume_sha256(uri, pool, name, deadline, timeout)
        if found != source.checksum:
            raise HypervisorError(
                uri, f"the copy of image {source.id} reads back with sha256 {found}, not the "
                f"image's {source.checksum}",
            )  # fmt: skip
        copy = ImageCopy(image_id=source.id, node_id=host.node.id, pool=pool, volume_name=name,
                         path=path)  # fmt: skip
        db.session.add(copy)
        try:
            db.session.commit()
        except IntegrityError as exc:  # the image was deleted meanwhile
            db.session.rollback()
            raise CopyGone(f"image {source.id} was deleted while it was being copied") from exc
    except BaseException:
        db.session.rollback()
        _delete_quietly(uri, pool, name)
        raise
    return copy


def _upload(source: Source, uri: str, pool: str, name: str, timeout: float,
            progress: Progress | None) -> str:  # fmt: skip
    def chunks(handle_chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in handle_chunks:
            heartbeat.beat()
            if progress is not None:
                progress(len(chunk))
            yield chunk

    with open(source.path, "rb") as handle:
        return hypervisor().upload_volume(uri, pool, name, source.size,
                                          chunks(read_chunks(handle)), timeout)  # fmt: skip


def volume_sha256(uri: str, pool: str, name: str, deadline: float, timeout: float) -> str:
    """The copy's sha256 as the node reads it back, within what is left of the copy's
    time. (The driver's ``volume_sha256`` does the same without beating the heartbeat.)"""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise HypervisorTimeout(uri, timeout)
    digest = hashlib.sha256()
    for chunk in hypervisor().download_volume(uri, pool, name, remaining):
        heartbeat.beat()
        digest.update(chunk)
    return digest.hexdigest()


def _delete_quietly(uri: str, pool: str, name: str) -> None:
    try:
        hypervisor().delete_volume(uri, pool, name)
    except VolumeNotFound:
        pass
    except HypervisorError:
        log.warning("could not delete %s/%s on %s; reconcile reports it", pool, name, uri,
                    exc_info=True)  # fmt: skip


def users(copy: ImageCopy) -> list[int]:
    """The root disks made on the copy (storage ids)."""
    stmt = select(Storage.id).where(
        Storage.image_id == copy.image_id,
        Storage.node_id == copy.node_id,
        Storage.pool == copy.pool,
    )
    return list(db.session.scalars(stmt.order_by(Storage.id)))


def remove_if_unused(copy_id: int, ignoring: int | None = None) -> bool:
    """Remove a copy (volume and row) that no root disk uses (but ``ignoring``, one that
    goes next: a failed create's); True when it went."""
    copy = db.session.get(ImageCopy, copy_id)
    if copy is None:
        return False
    with copy_lock(copy.image_id or 0, copy.node_id):
        return _remove_if_unused(copy_id, ignoring)


def _remove_if_unused(copy_id: int, ignoring: int | None = None) -> bool:
    copy = db.session.scalars(
        select(ImageCopy).where(ImageCopy.id == copy_id).execution_options(populate_existing=True)
    ).first()
    if copy is None or (copy.image_id is not None and set(users(copy)) - {ignoring}):
        db.session.rollback()
        return False
    db.session.rollback()
    host = Host.of(copy.node_id)
    with suppress(VolumeNotFound):
        hypervisor().delete_volume(host.uri, copy.pool, copy.volume_name)
    db.session.delete(copy)
    db.session.commit()
    return True


def forget_image(image_id: int) -> list[int]:
    """In the transaction that deletes the image: mark its copies as copies to remove
    (image null); their ids, to remove once that transaction has committed."""
    ids = list(db.session.scalars(select(ImageCopy.id).where(ImageCopy.image_id == image_id)))
    if ids:
        db.session.execute(
            update(ImageCopy)
            .where(ImageCopy.id.in_(ids))
            .values(image_id=None)
            .execution_options(synchronize_session=False)
        )
    return ids


def remove_orphans(copy_ids: list[int]) -> list[str]:
    """Remove copies whose image is gone, from every node at once; a note for each node
    that kept its copy (it could not be reached: reconcile removes it later)."""
    stmt = select(ImageCopy).where(ImageCopy.id.in_(copy_ids), ImageCopy.image_id.is_(None))
    # plain values: the calls run in threads of their own, without the session
    where = {
        copy.id: (Host.of(copy.node_id), copy.pool, copy.volume_name)
        for copy in db.session.scalars(stmt)
    }
    db.session.commit()  # (only read) nothing stays open while the nodes answer
    driver = hypervisor()

    def delete(ident: int) -> bool:
        host, pool, name = where[ident]
        with suppress(VolumeNotFound):
            driver.delete_volume(host.uri, pool, name)
        return True

    results = on_hosts({ident: ident for ident in where}, delete, REMOVAL_WORKERS)
    notes = []
    for ident, result in results.items():
        host, pool, name = where[ident]
        if isinstance(result, HypervisorError):
            notes.append(
                NodeNote(
                    "A node could not be reached; it keeps a copy of the image until "
                    "`flask vmapi reconcile --fix` removes it.",
                    f"node {host.node.fqdn}, copy {pool}/{name}: {result.reason}",
                )
            )
            continue
        db.session.execute(delete_rows(ImageCopy).where(ImageCopy.id == ident))
    db.session.commit()
    return notes


@dataclass(frozen=True)
class Pushed:
    """What ``flask vmapi image push`` did on one node."""

    fqdn: str
    made: bool = False
    seconds: float = 0.0
    error: str | None = None


def push_nodes(fqdn: str | None) -> list[Node]:
    """The node named, or every node that takes new VMs."""
    stmt = select(Node).order_by(Node.id)
    if fqdn is not None:
        return list(db.session.scalars(stmt.where(Node.fqdn == fqdn)))
    schedulable = select(NodeState.id).where(NodeState.schedulable.is_(True))
    return list(db.session.scalars(stmt.where(Node.node_state_id.in_(schedulable))))


def push(
    image: Image, nodes: list[Node], progress: Callable[[Node], Progress | None]
) -> list[Pushed]:
    """Copy an active image to each node that lacks it, one node after another;
    ``progress(node)`` gives the callback that counts the bytes sent there."""
    source = Source.of(image)
    done = []
    for node in nodes:
        host = Host.of(node.id)
        pool = root_type().pool
        directory = pool_directory(node.id, pool)
        db.session.rollback()
        try:
            with held_copy(source, host, pool, directory, progress(node)) as held:
                done.append(Pushed(node.fqdn, held.made, held.seconds))
        except HypervisorError as exc:
            done.append(Pushed(node.fqdn, error=exc.reason))
        except CopyGone as exc:
            done.append(Pushed(node.fqdn, error=str(exc)))
            break
    return done
