"""Catalog tables: states, virtualization methods, storage types and cache modes.

Rows with ``seeded`` true come from the migrations (or ``flask vmapi seed``); the API
refuses to delete or rename them because code and operators rely on their names.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    ColumnElement,
    String,
    and_,
    column,
    false,
    or_,
)
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
#: Where a storage type's volumes live: ``dir``, files in a libvirt pool's directory on
#: each node; ``rbd``, images in a Ceph pool every node reaches (libvirt's rbd pool).
DIR, RBD = "dir", "rbd"
STORAGE_BACKENDS = (DIR, RBD)
#: What an ``rbd`` type needs and a ``dir`` type never has.
CEPH_FIELDS = ("ceph_monitors", "ceph_pool", "ceph_user", "ceph_secret_uuid")


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


def _backend_fields() -> ColumnElement:
    """An ``rbd`` type has every Ceph field, is raw and shared; a ``dir`` type has none."""
    rbd = and_(
        column("backend") == RBD,
        *[column(name).is_not(None) for name in CEPH_FIELDS],
        column("format") == "raw",
        column("shared"),
    )
    plain = and_(column("backend") == DIR, *[column(name).is_(None) for name in CEPH_FIELDS])
    return or_(rbd, plain)


class StorageType(SeededMixin, db.Model):
    __tablename__ = "storage_type"
    __table_args__ = (
        CheckConstraint(one_of("format", STORAGE_FORMATS), name="format"),
        CheckConstraint(one_of("backend", STORAGE_BACKENDS), name="backend"),
        CheckConstraint(_backend_fields(), name="backend_fields"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(String(255), unique=True)
    pool: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(16))
    #: Every node sees the pool's volumes at the same path (NFS, a cluster filesystem): a
    #: moved VM keeps them where they are instead of having them copied.
    shared: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    backend: Mapped[str] = mapped_column(String(8), default=DIR, server_default=DIR)
    #: rbd only: the cluster's monitors as "host:port" (the msgr v1 port), the Ceph pool,
    #: the cephx user (without "client.") whose key is ``client.<user>.key`` in the
    #: directory VMAPI_CEPH_KEY_DIR names, and the UUID of the libvirt secret holding that
    #: key on every node (made by vmapi, one per user: a node's libvirt holds one secret
    #: per usage, client.<user>; kept while the user is)
    ceph_monitors: Mapped[list[Any] | None] = mapped_column(JSON(none_as_null=True))
    ceph_pool: Mapped[str | None] = mapped_column(String(255))
    ceph_user: Mapped[str | None] = mapped_column(String(255))
    ceph_secret_uuid: Mapped[str | None] = mapped_column(String(36))


class CacheOption(SeededMixin, db.Model):
    __tablename__ = "cache_option"
    __table_args__ = (CheckConstraint(one_of("name", CACHE_MODES), name="name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(16), unique=True)
    description: Mapped[str] = mapped_column(String(255), unique=True)
