"""Networking: VM interfaces, IPv4 and IPv6 addresses, IPv6 pools, VLANs.

An address belongs to at most one interface because it *is* one row with one
``interface_id``: holding an address twice cannot even be written down. Free addresses
are the rows whose ``interface_id`` is null (a partial index finds them at once).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from vmapi.extensions import db

if TYPE_CHECKING:
    from vmapi.models.security import SecurityGroup
    from vmapi.models.vm import Vm


class Vlan(db.Model):
    __tablename__ = "vlan"
    __table_args__ = (CheckConstraint("tag BETWEEN 1 AND 4094", name="tag_range"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    tag: Mapped[int] = mapped_column(Integer, unique=True)


class Interface(db.Model):
    __tablename__ = "interface"

    id: Mapped[int] = mapped_column(primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vm.id"), index=True)
    mac: Mapped[str] = mapped_column(String(17), unique=True)
    vlan_id: Mapped[int | None] = mapped_column(ForeignKey("vlan.id"), index=True)
    #: what names its host devices (tap ``vm<suffix>``, bridge ``br-<suffix>``), chosen
    #: when it is made so that a later scheme never renames a running VM's devices
    device_suffix: Mapped[str] = mapped_column(String(12), unique=True)
    #: the node's network filter holds the guest to this interface's MAC and addresses
    #: (API.md "Network protection"); admins may turn it off for an appliance that routes
    spoof_guard: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))

    vm: Mapped[Vm] = relationship(lazy="raise_on_sql", viewonly=True)
    vlan: Mapped[Vlan | None] = relationship(lazy="raise_on_sql")
    ipv4: Mapped[list[Ipv4Address]] = relationship(
        lazy="raise_on_sql", order_by="Ipv4Address.id", viewonly=True
    )
    ipv6: Mapped[list[Ipv6Address]] = relationship(
        lazy="raise_on_sql", order_by="Ipv6Address.id", viewonly=True
    )
    #: the security groups the interface uses (the rows of interface_security_group; those
    #: are what a change writes, this is how reads show them)
    security_groups: Mapped[list[SecurityGroup]] = relationship(
        secondary="interface_security_group",
        lazy="raise_on_sql",
        order_by="SecurityGroup.id",
        viewonly=True,
    )


class Ipv4Address(db.Model):
    __tablename__ = "ipv4_address"
    __table_args__ = (
        CheckConstraint("prefix BETWEEN 0 AND 32", name="prefix_range"),
        Index(
            "ix_ipv4_address_free",
            "id",
            postgresql_where=text("interface_id IS NULL"),
            sqlite_where=text("interface_id IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    address: Mapped[str] = mapped_column(String(15), unique=True)
    prefix: Mapped[int] = mapped_column(Integer)
    gateway: Mapped[str] = mapped_column(String(15))
    interface_id: Mapped[int | None] = mapped_column(ForeignKey("interface.id"), index=True)

    # read-only, for nest= (API.md: any reference may be nested)
    interface: Mapped[Interface | None] = relationship(lazy="raise_on_sql", viewonly=True)


class Ipv6Address(db.Model):
    __tablename__ = "ipv6_address"
    __table_args__ = (
        CheckConstraint("prefix BETWEEN 0 AND 128", name="prefix_range"),
        Index(
            "ix_ipv6_address_free",
            "id",
            postgresql_where=text("interface_id IS NULL"),
            sqlite_where=text("interface_id IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    address: Mapped[str] = mapped_column(String(39), unique=True)
    prefix: Mapped[int] = mapped_column(Integer)
    gateway: Mapped[str] = mapped_column(String(39))
    interface_id: Mapped[int | None] = mapped_column(ForeignKey("interface.id"), index=True)
    pool_id: Mapped[int | None] = mapped_column(ForeignKey("ipv6_pool.id"), index=True)

    # read-only, for nest= (API.md: any reference may be nested)
    interface: Mapped[Interface | None] = relationship(lazy="raise_on_sql", viewonly=True)
    pool: Mapped[Ipv6Pool | None] = relationship(lazy="raise_on_sql", viewonly=True)


class Ipv6Pool(db.Model):
    """An IPv6 network handing out addresses on demand: ``next_host`` counts up."""

    __tablename__ = "ipv6_pool"
    __table_args__ = (
        CheckConstraint("prefix BETWEEN 0 AND 128", name="prefix_range"),
        CheckConstraint("next_host >= 1", name="next_host_positive"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    network: Mapped[str] = mapped_column(String(43), unique=True)
    prefix: Mapped[int] = mapped_column(Integer)
    gateway: Mapped[str] = mapped_column(String(39))
    #: host number of the next address handed out (0, the subnet-router anycast, is skipped)
    next_host: Mapped[int] = mapped_column(BigInteger, default=1, server_default=text("1"))
    #: how many host numbers the pool hands out at most (capped so it fits a bigint)
    size: Mapped[int] = mapped_column(BigInteger)
