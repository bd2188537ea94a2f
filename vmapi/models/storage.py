"""Block storage: volumes in a libvirt pool on the VM's node, attached as virtio disks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    String,
    UniqueConstraint,
    column,
    false,
    or_,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from vmapi.extensions import db

if TYPE_CHECKING:
    from vmapi.models.catalog import CacheOption, StorageType
    from vmapi.models.image import Image
    from vmapi.models.vm import Vm

LIMITS = ("write_iops_limit", "read_iops_limit", "write_bps_limit", "read_bps_limit")


class Storage(db.Model):
    __tablename__ = "storage"
    __table_args__ = (
        # one target device per VM; the last defence against two disks racing for vdb
        UniqueConstraint("vm_id", "target"),
        CheckConstraint("size > 0", name="size_positive"),
        # a root disk is made from an image
        CheckConstraint(or_(~column("boot"), column("image_id").is_not(None)), name="boot_image"),
        *[
            CheckConstraint(or_(column(limit).is_(None), column(limit) >= 0), name=limit)
            for limit in LIMITS
        ],
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vm.id"), index=True)
    storage_type_id: Mapped[int] = mapped_column(ForeignKey("storage_type.id"), index=True)
    cache_option_id: Mapped[int | None] = mapped_column(ForeignKey("cache_option.id"), index=True)
    write_iops_limit: Mapped[int | None] = mapped_column(BigInteger)
    read_iops_limit: Mapped[int | None] = mapped_column(BigInteger)
    write_bps_limit: Mapped[int | None] = mapped_column(BigInteger)
    read_bps_limit: Mapped[int | None] = mapped_column(BigInteger)
    #: the guest's device name (vdb, vdc, ...), chosen without clashes per VM
    target: Mapped[str] = mapped_column(String(8))
    #: Where the volume is, recorded when the row is made and used from then on (never
    #: re-read from the storage type, whose pool may be another by then): the node, the
    #: pool, the volume's name (with the installation's id; written in the transaction
    #: that makes the row, once the id is known) and its path as libvirt reported it
    #: (null until the volume exists).
    node_id: Mapped[int] = mapped_column(ForeignKey("node.id"), index=True)
    pool: Mapped[str] = mapped_column(String(255))
    volume_name: Mapped[str | None] = mapped_column(String(255), unique=True)
    path: Mapped[str | None] = mapped_column(String(1024))
    #: A VM's root disk (``boot``): made with the VM from ``image`` as a qcow2 overlay on
    #: the node's copy of it, target ``vda``; it grows, but never moves or goes alone.
    boot: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    image_id: Mapped[int | None] = mapped_column(ForeignKey("image.id"), index=True)

    # read-only, for nest= (API.md: any reference may be nested)
    vm: Mapped[Vm] = relationship(lazy="raise_on_sql", viewonly=True)
    storage_type: Mapped[StorageType] = relationship(lazy="raise_on_sql", viewonly=True)
    cache_option: Mapped[CacheOption | None] = relationship(lazy="raise_on_sql", viewonly=True)
    image: Mapped[Image | None] = relationship(lazy="raise_on_sql", viewonly=True)
