"""Virtual machines: size, owner, placement, the state libvirt last reported, and what
the guest is told (its host name, SSH keys and user data, and where its seed is)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from vmapi.extensions import db
from vmapi.guest_inputs import ssh_key_fingerprints
from vmapi.models.catalog import VirtMethod, VmState
from vmapi.models.image import Image
from vmapi.models.network import Interface
from vmapi.models.node import Node
from vmapi.models.server_group import ServerGroup


def vm_name(ident: int) -> str:
    """What people call the VM with this id (also written by services/vms/reads.py)."""
    return f"vm-{ident}"


class Vm(db.Model):
    __tablename__ = "vm"
    __table_args__ = (
        # libvirt refuses two domains with one UUID on one host; this is the last defence.
        UniqueConstraint("node_id", "uuid"),
        # a customer's VMs in id order: its keyset pages walk this index and stop, with
        # or without statistics (also serves lookups by customer_id alone)
        Index("ix_vm_customer_page", "customer_id", "id"),
        CheckConstraint("cores > 0", name="cores_positive"),
        CheckConstraint("ram > 0", name="ram_positive"),
        CheckConstraint("backup_keep IS NULL OR backup_keep > 0", name="backup_keep_positive"),
        CheckConstraint("ha_local_disks IN ('leave', 'rebuild')", name="ha_local_disks_known"),
        CheckConstraint(
            "cputime_limit IS NULL OR cputime_limit BETWEEN 1000 AND 1000000", name="cputime"
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    cores: Mapped[int] = mapped_column(Integer)
    ram: Mapped[int] = mapped_column(BigInteger)
    customer_id: Mapped[int | None] = mapped_column(BigInteger)
    cputime_limit: Mapped[int | None] = mapped_column(Integer)
    uuid: Mapped[str] = mapped_column(String(36), index=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("node.id"), index=True)
    virt_method_id: Mapped[int] = mapped_column(ForeignKey("virt_method.id"), index=True)
    vm_state_id: Mapped[int] = mapped_column(ForeignKey("vm_state.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    #: the domain's name in libvirt, with the installation's id; written in the
    #: transaction that makes the row (once the id is known) and never changed
    domain_name: Mapped[str | None] = mapped_column(String(64), unique=True)
    #: The node a move of the VM has claimed capacity on, set (with the claim) before the
    #: domain moves and cleared when the move is recorded or undone. Left set only by a
    #: process that died mid-move: the next move of the VM, or reconcile, settles it by
    #: where libvirt says the domain is (services/moves/books.py).
    migration_node_id: Mapped[int | None] = mapped_column(ForeignKey("node.id"), index=True)
    #: What the guest is told (API.md "Guest configuration"). ``ssh_keys`` and
    #: ``user_data`` are write-only: answers, the audit trail and logs never show them
    #: (services/audit.py records fingerprints and a flag instead).
    hostname: Mapped[str | None] = mapped_column(String(253))
    ssh_keys: Mapped[list[str]] = mapped_column(JSON, default=list, server_default=text("'[]'"))
    user_data: Mapped[str | None] = mapped_column(Text)
    #: Where the guest's cloud-init seed is (a raw ISO volume on the VM's node, attached
    #: read-only; never a /storage object): null for a VM without one (no image).
    seed_pool: Mapped[str | None] = mapped_column(String(255))
    seed_volume: Mapped[str | None] = mapped_column(String(255), unique=True)
    seed_path: Mapped[str | None] = mapped_column(String(1024))
    #: the image the VM boots from (its root disk is an overlay on the node's copy)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("image.id"), index=True)
    #: where the domain logs its serial console: a file in a vmapi-owned pool of its node
    #: (recorded when the domain is defined with it; null: defined before vmapi logged
    #: consoles, no log until it is next defined)
    console_log_pool: Mapped[str | None] = mapped_column(String(255))
    #: Backups: how many of its backup images ``flask vmapi backup run`` keeps (null: the
    #: VM is not backed up unless a run names it with ``--keep``)
    backup_keep: Mapped[int | None] = mapped_column(Integer)
    console_log_path: Mapped[str | None] = mapped_column(String(1024))
    #: the server group the VM joined when it was made (never changed): the scheduler
    #: places it, and moves it, by the group's policy (vmapi/scheduler/filters.py)
    server_group_id: Mapped[int | None] = mapped_column(ForeignKey("server_group.id"), index=True)
    #: High availability: restarted on another node when its node is fenced (null: the
    #: configuration's HA_DEFAULT decides), before VMs of a lower ``ha_priority``; a root
    #: disk on local storage is rebuilt from its image then only with ``ha_local_disks``
    #: ``rebuild`` (``leave``: the VM stays down with its node, and is reported)
    ha: Mapped[bool | None] = mapped_column(Boolean)
    ha_priority: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    ha_local_disks: Mapped[str] = mapped_column(String(8), default="leave",
                                                server_default="leave")  # fmt: skip

    node: Mapped[Node] = relationship(lazy="raise_on_sql", foreign_keys=[node_id])
    virt_method: Mapped[VirtMethod] = relationship(lazy="raise_on_sql")
    vm_state: Mapped[VmState] = relationship(lazy="raise_on_sql")
    image: Mapped[Image | None] = relationship(lazy="raise_on_sql", viewonly=True)
    server_group: Mapped[ServerGroup | None] = relationship(lazy="raise_on_sql", viewonly=True)
    interfaces: Mapped[list[Interface]] = relationship(
        lazy="raise_on_sql", order_by="Interface.id", viewonly=True
    )

    @property
    def name(self) -> str:
        """What people call the VM (its domain on the host is :attr:`domain_name`)."""
        return vm_name(self.id)

    @property
    def ssh_key_fingerprints(self) -> list[str]:
        """What answers show of ``ssh_keys`` (SHA256, as ``ssh-keygen -l`` prints them)."""
        return ssh_key_fingerprints(self.ssh_keys or [])

    @property
    def user_data_set(self) -> bool:
        """What answers show of ``user_data``."""
        return bool(self.user_data)

    @property
    def console_log_volume(self) -> str | None:
        """The log's volume name in its pool (a dir pool names a file's volume by the
        file's name)."""
        return self.console_log_path.rsplit("/", 1)[-1] if self.console_log_path else None
