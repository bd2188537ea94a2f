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
STATES = ("queued", "active", "error")
QUEUED, ACTIVE, ERROR = STATES
SIZES = ("size", "virtual_size", "min_ram")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Image(db.Model):
    __tablename__ = "image"
    __table_args__ = (
        CheckConstraint(column("format").in_(FORMATS), name="format_known"),
        CheckConstraint(column("state").in_(STATES), name="state_known"),
        # an active image has a file, and the figures read from it
        CheckConstraint(
            or_(
                column("state") != ACTIVE,
                column("file").is_not(None)
                & column("size").is_not(None)
                & column("virtual_size").is_not(None)
                & column("checksum").is_not(None),
            ),
            name="active_has_file",
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
