"""Images in Ceph: written once into the Ceph pool of each rbd storage type that boots
them, the parent of every root disk of the image made there (RBD clones).

The first root disk of an image in an rbd type (or ``flask vmapi image push --storage-type``)
has the API host, as a Ceph client (:mod:`vmapi.hypervisor.rbd`), check the image's file
in the store against its sha256, write it into a raw RBD image
``<installation>-image-<image id>``, compare what the cluster holds with the file, and
take and protect the snapshot clones are made from; only then is it recorded
(:class:`~vmapi.models.ImageRbd`). No node is involved, and no node ever holds a copy:
every later root disk of the image in that type, on any node, is a clone made in a
fraction of a second. The write is bounded by ``IMAGE_COPY_TIMEOUT`` and beats the
worker's heartbeat while it runs.

Serialized per (image, rbd type) by the lock of :mod:`vmapi.services.images.locks`
(``where="rbd"``): exclusive to write or remove the RBD image, shared to clone it.

The RBD image goes when nobody uses it: when the request that wrote it is undone, and
when its image is deleted (which waits for its VMs: ``image/in_use``); RBD itself
refuses to remove a parent while clones of it exist. A cluster that cannot be reached
then keeps it, marked by a row whose image is gone, for ``flask vmapi reconcile --fix``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from flask import current_app
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from vmapi import heartbeat
from vmapi.error_ids import IMAGE_NOT_ACTIVE
from vmapi.errors import Conflict
from vmapi.extensions import db
from vmapi.hypervisor import HypervisorError
from vmapi.hypervisor.rbd import RbdBusy, RbdClient
from vmapi.models import Image, ImageRbd, Storage, StorageType
from vmapi.models.catalog import RBD
from vmapi.node_detail import NodeNote
from vmapi.services.images.copies import CopyGone, Source
from vmapi.services.images.locks import copy_lock
from vmapi.services.images.store import read_chunks
from vmapi.services.names import image_volume_name
from vmapi.services.storage.ceph import KeyUnreadable, rbd_client

log = logging.getLogger(__name__)
T = TypeVar("T")

#: the protected snapshot of an image's RBD image that root disks are cloned from
SNAPSHOT = "vmapi-base"
#: how often a worker waiting on the tools beats its heartbeat
BEAT_SECONDS = 1.0


@dataclass(frozen=True)
class HeldRbd:
    """An image's RBD image that stays while the block of :func:`held_rbd_image` runs;
    ``made``: by this call."""

    row: ImageRbd
    made: bool
    seconds: float = 0.0


def in_ceph_only(image: Image) -> Conflict:
    """409: an image saved from an RBD disk lives in its Ceph pool only (no file in the
    store): it boots as an RBD clone in that storage type and nowhere else."""
    return Conflict(
        f"Image {image.id} was saved from an RBD disk and lives in its Ceph pool only (no "
        "file in the image store): boot it with root_storage_type naming that rbd storage "
        "type; it cannot be copied to a node, into a volume or downloaded.",
        error_id=IMAGE_NOT_ACTIVE,
        data={"image": {"id": image.id}, "state": image.state,
              "storage_type": [{"id": i} for i in rbd_homes(image.id)]},
    )  # fmt: skip


def rbd_homes(image_id: int) -> list[int]:
    """The rbd types whose Ceph pool holds the image."""
    stmt = select(ImageRbd.storage_type_id).where(ImageRbd.image_id == image_id)
    return list(db.session.scalars(stmt.order_by(ImageRbd.storage_type_id)))


def find_rbd_image(image_id: int, storage_type_id: int) -> ImageRbd | None:
    stmt = select(ImageRbd).where(
        ImageRbd.image_id == image_id, ImageRbd.storage_type_id == storage_type_id
    )
    return db.session.scalars(stmt.execution_options(populate_existing=True)).first()


@contextmanager
def held_rbd_image(source: Source, storage_type: StorageType) -> Iterator[HeldRbd]:
    """The image's RBD image in the type's Ceph pool (written there when there is none),
    kept from removal while the block runs (clone it there)."""
    type_id = storage_type.id
    with rbd_image_if_there(source, storage_type) as row:
        if row is not None:
            yield HeldRbd(row, made=False)
            return
    with copy_lock(source.id, type_id, where="rbd"):
        row = find_rbd_image(source.id, type_id)
        db.session.commit()
        if row is not None:
            yield HeldRbd(row, made=False)
            return
        started = time.monotonic()
        row = write_rbd_image(source, storage_type)
        yield HeldRbd(row, made=True, seconds=time.monotonic() - started)


@contextmanager
def rbd_image_if_there(source: Source, storage_type: StorageType) -> Iterator[ImageRbd | None]:
    """The image's RBD image in the type's Ceph pool, kept from removal while the block
    runs (under the shared lock); None when it is not there (nothing is written)."""
    with copy_lock(source.id, storage_type.id, shared=True, where="rbd"):
        row = find_rbd_image(source.id, storage_type.id)
        db.session.commit()  # (only read) no transaction stays open across the tools
        yield row


def write_rbd_image(source: Source, storage_type: StorageType) -> ImageRbd:
    """Write the image into the type's Ceph pool, check it, record it (the caller holds
    the exclusive lock)."""
    client = rbd_client(storage_type)
    pool = storage_type.ceph_pool or ""
    name = image_volume_name(source.id)
    timeout = float(current_app.config["IMAGE_COPY_TIMEOUT"])
    deadline = time.monotonic() + timeout
    _check_file(source)

    def write() -> int:
        return client.import_image(pool, name, source.path, source.format, SNAPSHOT,
                                   max(deadline - time.monotonic(), 1.0))  # fmt: skip

    try:
        _beating(write)
    except RbdBusy:
        # Ours by its name, yet no row: left by a write whose request died. Its content
        # is unknown (and no root disk can be a clone of it: those are recorded), so it
        # is replaced.
        log.warning("replacing RBD image %s/%s, left by an unfinished write", pool, name)
        client.remove_image(pool, name)
        _beating(write)
    row = ImageRbd(image_id=source.id, storage_type_id=storage_type.id, ceph_pool=pool,
                   rbd_name=name, snapshot=SNAPSHOT)  # fmt: skip
    db.session.add(row)
    try:
        db.session.commit()
    except IntegrityError as exc:  # the image was deleted meanwhile
        db.session.rollback()
        _remove_quietly(client, pool, name)
        raise CopyGone(f"image {source.id} was deleted while it was written into Ceph") from exc
    except BaseException:
        db.session.rollback()
        _remove_quietly(client, pool, name)
        raise
    return row


def _check_file(source: Source) -> None:
    """The store's file is the image that was accepted (its sha256), before it is written
    anywhere."""
    digest = hashlib.sha256()
    with open(source.path, "rb") as handle:
        for chunk in read_chunks(handle):
            digest.update(chunk)
    if digest.hexdigest() != source.checksum:
        raise HypervisorError(
            "rbd:", f"the store's file of image {source.id} reads with sha256 "
            f"{digest.hexdigest()}, not the image's {source.checksum}; nothing was written",
        )  # fmt: skip


def _beating(work: Callable[[], T]) -> T:
    """Run ``work`` in a thread while this one beats the worker's heartbeat (a long write
    that keeps going outlives gunicorn's worker timeout, as a node's copy does)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vmapi-rbd") as pool:
        future = pool.submit(work)
        while True:
            try:
                return future.result(timeout=BEAT_SECONDS)
            except FutureTimeout:
                heartbeat.beat()


def _remove_quietly(client: RbdClient, pool: str, name: str) -> None:
    try:
        client.remove_image(pool, name)
    except HypervisorError:
        log.warning("could not remove RBD image %s/%s; reconcile reports it", pool, name,
                    exc_info=True)  # fmt: skip


def users(row: ImageRbd) -> list[int]:
    """The root disks cloned from it (storage ids)."""
    stmt = select(Storage.id).where(
        Storage.image_id == row.image_id, Storage.storage_type_id == row.storage_type_id
    )
    return list(db.session.scalars(stmt.order_by(Storage.id)))


def remove_rbd_if_unused(row_id: int, ignoring: int | None = None) -> bool:
    """Remove an image's RBD image (and row) that no root disk uses (but ``ignoring``,
    one that goes next: a failed create's); True when it went."""
    row = db.session.get(ImageRbd, row_id)
    if row is None:
        return False
    with copy_lock(row.image_id or 0, row.storage_type_id, where="rbd"):
        row = find_rbd_image_by_id(row_id)
        if row is None or (row.image_id is not None and set(users(row)) - {ignoring}):
            db.session.rollback()
            return False
        storage_type = db.session.get(StorageType, row.storage_type_id)
        pool, name = row.ceph_pool, row.rbd_name
        db.session.rollback()
        rbd_client(storage_type).remove_image(pool, name)
        db.session.delete(db.session.get(ImageRbd, row_id))
        db.session.commit()
        return True


def find_rbd_image_by_id(row_id: int) -> ImageRbd | None:
    stmt = select(ImageRbd).where(ImageRbd.id == row_id)
    return db.session.scalars(stmt.execution_options(populate_existing=True)).first()


def forget_image(image_id: int) -> list[int]:
    """In the transaction that deletes the image: mark its RBD images as to remove (image
    null); their ids, to remove once that transaction has committed."""
    ids = list(db.session.scalars(select(ImageRbd.id).where(ImageRbd.image_id == image_id)))
    if ids:
        db.session.execute(
            update(ImageRbd)
            .where(ImageRbd.id.in_(ids))
            .values(image_id=None)
            .execution_options(synchronize_session=False)
        )
    return ids


def remove_orphans(row_ids: list[int]) -> list[str]:
    """Remove RBD images whose image is gone; a note for each one a cluster kept (it could
    not be reached: reconcile removes it later)."""
    notes = []
    for row_id in row_ids:
        row = find_rbd_image_by_id(row_id)
        if row is None or row.image_id is not None:
            continue
        storage_type = db.session.get(StorageType, row.storage_type_id)
        pool, name = row.ceph_pool, row.rbd_name
        db.session.commit()  # (only read) nothing stays open while the cluster answers
        try:
            rbd_client(storage_type).remove_image(pool, name)
        except (HypervisorError, KeyUnreadable) as exc:
            notes.append(NodeNote(
                "The Ceph cluster kept the image's RBD image; `flask vmapi reconcile --fix` "
                "removes it later.", f"RBD image {pool}/{name}: {exc}"))  # fmt: skip
            continue
        db.session.delete(db.session.get(ImageRbd, row_id))
        db.session.commit()
    return notes


def push_to_ceph(image: Image, type_name: str) -> str:
    """``flask vmapi image push IMAGE --storage-type NAME``: the image written into the rbd
    type's pool unless it is there; what was done. ``ValueError`` for a type that is not
    an rbd type, or an image in Ceph only that is not in this one."""
    storage_type = db.session.scalars(
        select(StorageType).where(StorageType.name == type_name, StorageType.backend == RBD)
    ).first()
    if storage_type is None:
        raise ValueError(f"no rbd storage type named {type_name}")
    if image.file is None and find_rbd_image(image.id, storage_type.id) is None:
        raise ValueError(f"image {image.id} lives in Ceph only, not in {type_name}'s pool")
    with held_rbd_image(Source.of(image), storage_type) as held:
        where = f"{held.row.ceph_pool}/{held.row.rbd_name}"
        if held.made:
            return f"written  {type_name}: {where} in {held.seconds:.1f} s (content verified)"
        return f"ok       {type_name}: {where} is there already"
