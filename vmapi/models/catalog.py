"""Catalog tables: states, virtualization methods, storage types and cache modes.

Rows with ``seeded`` true come from the migrations (or ``flask vmapi seed``); the API
refuses to delete or rename them because code and operators rely on their names.
"""

from __future__ import annotations

from sqlalchemy import Boolean, CheckConstraint, ColumnElement, String, column, false
from sqlalchemy.orm import Mapped, mapped_column

from vmapi.extensions import db

#: libvirt's domain types (``<domain type=...>``), the values ``virt_method.domain_type`` takes.
DOMAIN_TYPES = (
    "qemu", "kqemu", "kvm", "xen", "lxc", "uml", "openvz", "test", "vmware",
    "hyperv", "vbox", "phyp", "parallels", "bhyve", "vz", "ch", "hvf",
)  # fmt: skip
#: libvirt's disk cache modes (``<driver cache=...>``).
CACHE_MODES = ("none", "writethrough", "writeback", "directsync", "unsafe", "default")
STORAGE_FORMATS = ("qcow2", "raw")


def one_of(name: str, values: tuple[str, ...]) -> ColumnElement:
    """``name IN (values)`` for a CHECK constraint, written by SQLAlchemy's compiler."""
    return column(name).in_(values)


class SeededMixin:
    seeded: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class NodeState(SeededMixin, db.Model):
    __tablename__ = "node_state"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    schedulable: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class VmState(SeededMixin, db.Model):
    __tablename__ = "vm_state"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)


class VirtMethod(SeededMixin, db.Model):
    __tablename__ = "virt_method"
    __table_args__ = (CheckConstraint(one_of("domain_type", DOMAIN_TYPES), name="domain_type"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    domain_type: Mapped[str] = mapped_column(String(16))


class StorageType(SeededMixin, db.Model):
    __tablename__ = "storage_type"
    __table_args__ = (CheckConstraint(one_of("format", STORAGE_FORMATS), name="format"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(String(255), unique=True)
    pool: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(16))
    #: Every node sees the pool's volumes at the same path (NFS, a cluster filesystem): a
    #: moved VM keeps them where they are instead of having them copied.
    shared: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class CacheOption(SeededMixin, db.Model):
    __tablename__ = "cache_option"
    __table_args__ = (CheckConstraint(one_of("name", CACHE_MODES), name="name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(16), unique=True)
    description: Mapped[str] = mapped_column(String(255), unique=True)
