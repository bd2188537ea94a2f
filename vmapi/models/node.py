"""Physical hosts (``node``) and their hypervisor roles (``virt_node``)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    column,
    or_,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from vmapi.config import INTERFACE_MODES
from vmapi.extensions import db
from vmapi.models.catalog import NodeState, VirtMethod, one_of

#: A node's high-availability state (``ha_state``): ``ok`` (answering), ``suspect`` (it
#: missed checks, fewer than HA_MISSES), ``fencing`` (its agent is powering it off),
#: ``fenced`` (its agent said off: its HA VMs are restarted elsewhere), ``fence_failed``
#: (no agent, or the agent failed: nothing of it restarts until an admin confirms with
#: ``flask vmapi node fenced``), ``recovered`` (it answers again after it was fenced;
#: an admin brings it back)
HA_STATES = ("ok", "suspect", "fencing", "fenced", "fence_failed", "recovered")


class Node(db.Model):
    __tablename__ = "node"
    __table_args__ = (
        CheckConstraint("cores > 0", name="cores_positive"),
        CheckConstraint("ram > 0", name="ram_positive"),
        CheckConstraint("allocated_cores >= 0", name="allocated_cores_nonneg"),
        CheckConstraint("allocated_ram >= 0", name="allocated_ram_nonneg"),
        CheckConstraint("cpu_allocation_ratio > 0", name="cpu_ratio_positive"),
        CheckConstraint("ram_allocation_ratio > 0", name="ram_ratio_positive"),
        CheckConstraint("reserved_ram >= 0", name="reserved_ram_nonneg"),
        CheckConstraint(column("ha_state").in_(HA_STATES), name="ha_state_known"),
        CheckConstraint(
            or_(column("interface_mode").is_(None), one_of("interface_mode", INTERFACE_MODES)),
            name="interface_mode",
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    fqdn: Mapped[str] = mapped_column(String(253), unique=True)
    ipv4_addr_ext: Mapped[str] = mapped_column(String(64))
    ipv6_addr_ext: Mapped[str] = mapped_column(String(64))
    ipv4_gw_ext: Mapped[str] = mapped_column(String(64))
    ipv6_gw_ext: Mapped[str] = mapped_column(String(64))
    location: Mapped[str | None] = mapped_column(String(255))
    bond_interfaces: Mapped[str | None] = mapped_column(String(255))
    node_state_id: Mapped[int] = mapped_column(ForeignKey("node_state.id"), index=True)
    libvirt_uri: Mapped[str | None] = mapped_column(String(1024))
    cores: Mapped[int] = mapped_column(Integer)
    ram: Mapped[int] = mapped_column(BigInteger)
    cpu_allocation_ratio: Mapped[float | None] = mapped_column(Float)
    ram_allocation_ratio: Mapped[float | None] = mapped_column(Float)
    reserved_ram: Mapped[int | None] = mapped_column(BigInteger)
    interface_mode: Mapped[str | None] = mapped_column(String(16))
    #: The bridge template of NICs in bridge mode (vmapi.bridges); null: BRIDGE_TEMPLATE.
    bridge: Mapped[str | None] = mapped_column(String(64))
    #: The address VM displays (VNC) listen on; null: the configured CONSOLE_ADDRESS.
    console_address: Mapped[str | None] = mapped_column(String(64))
    #: How another node's libvirtd reaches this one to move a VM here (null: libvirt_uri,
    #: or the template's URI), and where QEMU's migration stream connects (an address or
    #: a tcp:// URI; null: libvirt picks the node's host name).
    migration_uri: Mapped[str | None] = mapped_column(String(1024))
    migration_address: Mapped[str | None] = mapped_column(String(255))
    allocated_cores: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    allocated_ram: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    #: Schedulable capacity minus allocation, kept by every claim and node write (see
    #: vmapi.scheduler.capacity); what the scheduler filters and weighs on.
    free_cores: Mapped[float] = mapped_column(Float, default=0, server_default=text("0"))
    free_ram: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    #: When the API last failed to reach the node's libvirt; the scheduler skips the node
    #: for LIBVIRT_COOLOFF seconds after it.
    libvirt_failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: Host health (``flask vmapi node check``): when its libvirt last answered, the last
    #: probe's error, and since when it is unreachable (the scheduler skips it meanwhile).
    last_seen_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(String(1000))
    unreachable_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: Whether the node's libvirt has the network filter driver (nwfilter), as a check or a
    #: call last found it (null: not yet known). A node without it takes no new VMs whose
    #: NICs it would have to guard (``bridge`` and ``ethernet`` modes).
    network_filters: Mapped[bool | None] = mapped_column(Boolean)
    #: Its filters differ from the database since a change could not reach it: the next
    #: check that reaches it (or ``reconcile --fix``) brings them in line.
    filters_pending: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=text("false")
    )

    #: High availability: the fence agent that powers the node off (one of the installed
    #: ``fence_*`` agents; null: the node cannot be fenced, so nothing of it is restarted
    #: elsewhere), the address of its power controller and the user there. The password
    #: is read from ``<HA_FENCE_PASSWORD_DIR>/<fqdn>`` on the API host, never stored here.
    fence_agent: Mapped[str | None] = mapped_column(String(64))
    fence_address: Mapped[str | None] = mapped_column(String(255))
    fence_user: Mapped[str | None] = mapped_column(String(255))
    #: What ``flask vmapi ha watch`` last made of the node (:data:`HA_STATES`)
    ha_state: Mapped[str] = mapped_column(String(16), default="ok", server_default="ok")
    #: consecutive checks the node missed (the watcher's count; 0 once it answers)
    ha_misses: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    #: when it entered ``ha_state`` (the watcher's clock for alerts and the bench)
    ha_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    node_state: Mapped[NodeState] = relationship(lazy="raise_on_sql")


# The scheduler's weighers walk these in order (spread: most free RAM first; pack: least
# first; ties to the lowest id), so a placement reads a handful of rows whatever the
# fleet's size.
Index("ix_node_spread", Node.free_ram.desc(), Node.id)
Index("ix_node_pack", Node.free_ram, Node.id)


class VirtNode(db.Model):
    __tablename__ = "virt_node"
    __table_args__ = (
        UniqueConstraint("node_id", "virt_method_id"),
        CheckConstraint("local_storage_gb IS NULL OR local_storage_gb >= 0", name="storage_gb"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("node.id"), index=True)
    virt_method_id: Mapped[int] = mapped_column(ForeignKey("virt_method.id"))
    local_storage_gb: Mapped[int | None] = mapped_column(Integer)
    vg_name: Mapped[str | None] = mapped_column(String(255))
    local_storage_path: Mapped[str | None] = mapped_column(String(1024))

    node: Mapped[Node] = relationship(lazy="raise_on_sql")
    virt_method: Mapped[VirtMethod] = relationship(lazy="raise_on_sql")


# A method's nodes (``?virt_method.id=``), and the scheduler's per-node check "has this
# method": both columns in the index condition whichever index the planner picks for it
# (with this one or the unique (node_id, virt_method_id)), never a scan of the method's
# every node per node visited.
Index("ix_virt_node_method_node", VirtNode.virt_method_id, VirtNode.node_id)


class NodeStorageAccess(db.Model):
    """Whether a node reached the cluster of an rbd storage type when ``flask vmapi node
    check`` last probed it. No row: never checked, which the scheduler counts as
    reachable."""

    __tablename__ = "node_storage_access"

    node_id: Mapped[int] = mapped_column(ForeignKey("node.id", ondelete="CASCADE"),
                                         primary_key=True)  # fmt: skip
    storage_type_id: Mapped[int] = mapped_column(
        ForeignKey("storage_type.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    reachable: Mapped[bool] = mapped_column(Boolean)
    checked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
