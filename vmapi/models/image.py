"""Images: what a VM boots from. The catalog row here; the bytes in the image store.

An image is made ``queued`` (metadata only); an accepted upload makes it ``active``
with its size, virtual size and sha256. ``file`` names its file in the store
(``VMAPI_IMAGE_DIR``); each accepted upload gets a fresh name, so an upload that loses
a race, or is undone, never touches the file of another.

An :class:`ImageCopy` is an image's base volume on one node (made through libvirt by
:mod:`vmapi.services.images.copies`), shared by the root disks of every VM of that image
there.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    String,
    UniqueConstraint,
    column,
    or_,
)
from sqlalchemy.orm import Mapped, mapped_column

from vmapi.extensions import db

FORMATS = ("qcow2", "raw")
#: ``saving``: an image being made from a VM's or a volume's disk (never uploaded to)
STATES = ("queued", "active", "error", "saving")
QUEUED, ACTIVE, ERROR, SAVING = STATES
#: how the image's file came: uploaded, saved from a disk by a request, or by a backup run
KINDS = ("upload", "snapshot", "backup")
UPLOAD, SNAPSHOT, BACKUP = KINDS
SIZES = ("size", "virtual_size", "min_ram")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Image(db.Model):
    __tablename__ = "image"
    __table_args__ = (
        CheckConstraint(column("format").in_(FORMATS), name="format_known"),
        CheckConstraint(column("state").in_(STATES), name="state_known"),
        CheckConstraint(column("kind").in_(KINDS), name="kind_known"),
        # a saved image names the disk it was saved from; an upload names none
        CheckConstraint(
            or_(
                column("kind") == UPLOAD,
                column("source_vm_id").is_not(None) | column("source_storage_id").is_not(None),
            ),
            name="saved_has_source",
        ),
        # an active image has its figures, and a file with its checksum -- or neither: a
        # raw image saved from an RBD disk lives in Ceph only (its ImageRbd row)
        CheckConstraint(
            or_(
                column("state") != ACTIVE,
                column("size").is_not(None)
                & column("virtual_size").is_not(None)
                & (
                    (column("file").is_not(None) & column("checksum").is_not(None))
                    | (column("file").is_(None) & (column("format") == "raw"))
                ),
            ),
            name="active_has_content",
        ),
        *[
            CheckConstraint(or_(column(name).is_(None), column(name) >= 0), name=name)
            for name in SIZES
        ],
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(8))
    state: Mapped[str] = mapped_column(String(8), default=QUEUED)
    #: the owner; null: a public image (made by an admin), seen by every customer
    customer_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    size: Mapped[int | None] = mapped_column(BigInteger)
    virtual_size: Mapped[int | None] = mapped_column(BigInteger)
    #: sha256 (hex): the one given at creation until the file arrives, then the file's
    checksum: Mapped[str | None] = mapped_column(String(64))
    min_ram: Mapped[int | None] = mapped_column(BigInteger)
    description: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: the file's name in the image store (null until an upload is accepted)
    file: Mapped[str | None] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(8), default=UPLOAD, server_default=UPLOAD)
    #: What a saved image was saved from: a VM's root disk, or a data volume (of VM
    #: ``source_vm_id``). Plain ids, not keys: the image outlives both. A backup run finds
    #: a VM's backups by ``source_vm_id``.
    source_vm_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    source_storage_id: Mapped[int | None] = mapped_column(BigInteger)

    @property
    def source(self) -> dict[str, dict[str, int]] | None:
        """What answers show: ``{vm: {id}}``, ``{storage: {id}}`` or null (an upload)."""
        if self.kind == UPLOAD:
            return None
        if self.source_storage_id is not None:
            return {"storage": {"id": self.source_storage_id}}
        return {"vm": {"id": self.source_vm_id}} if self.source_vm_id is not None else None


class ImageCopy(db.Model):
    """An image's base volume on a node: where it is, recorded when the copy was checked.

    One per image and node. ``image_id`` becomes null when the image is deleted while the
    node could not be reached: the row then marks a copy to remove, which ``flask vmapi
    reconcile --fix`` does once the node answers.
    """

    __tablename__ = "image_copy"
    __table_args__ = (UniqueConstraint("image_id", "node_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    # (looked up by image and node: the unique constraint's index serves it)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("image.id", ondelete="SET NULL"))
    node_id: Mapped[int] = mapped_column(ForeignKey("node.id"), index=True)
    pool: Mapped[str] = mapped_column(String(255))
    #: ``<installation>-image-<image id>`` (:func:`vmapi.services.names.image_volume_name`)
    volume_name: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ImageRbd(db.Model):
    """An image written once into the Ceph pool of an rbd storage type: a raw RBD image
    with a protected snapshot, the parent of every root disk of that image made in the
    type (RBD clones). Recorded when its content was checked against the image's file.

    One per image and rbd type. ``image_id`` becomes null when the image is deleted while
    the cluster could not be reached: the row then marks an RBD image to remove, which
    ``flask vmapi reconcile --fix`` does once it can.
    """

    __tablename__ = "image_rbd"
    __table_args__ = (UniqueConstraint("image_id", "storage_type_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("image.id", ondelete="SET NULL"))
    storage_type_id: Mapped[int] = mapped_column(ForeignKey("storage_type.id"), index=True)
    #: the Ceph pool (the type's ``ceph_pool`` when it was written)
    ceph_pool: Mapped[str] = mapped_column(String(255))
    #: ``<installation>-image-<image id>``
    rbd_name: Mapped[str] = mapped_column(String(255))
    #: the protected snapshot clones are made from
    snapshot: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
