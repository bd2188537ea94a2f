"""Security groups: a customer's (or, with ``customer_id`` null, an admin's) named set of
allow rules, and which interfaces use which groups (API.md, "Network protection").

A rule only allows: ``ingress`` rules open the guest to what they name, ``egress`` rules
(when an interface's groups have any) limit what it may send. The guard and the groups
become libvirt network filters on the nodes (vmapi.services.network.filters); these rows
are the truth those filters are written from.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    column,
    or_,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from vmapi.extensions import db
from vmapi.models.catalog import one_of

DIRECTIONS = ("ingress", "egress")
ETHERTYPES = ("ipv4", "ipv6")
PROTOCOLS = ("tcp", "udp", "icmp", "icmpv6", "any")
#: the protocols a port range applies to
PORT_PROTOCOLS = ("tcp", "udp")


class SecurityGroup(db.Model):
    __tablename__ = "security_group"
    __table_args__ = (
        # one name per owner (admin groups: customer_id null, unique among themselves
        # through the partial index below)
        UniqueConstraint("customer_id", "name"),
        Index(
            "ix_security_group_admin_name",
            "name",
            unique=True,
            postgresql_where=column("customer_id").is_(None),
            sqlite_where=column("customer_id").is_(None),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    description: Mapped[str | None] = mapped_column(String(1000))
    customer_id: Mapped[int | None] = mapped_column(BigInteger, index=True)

    rules: Mapped[list[SecurityGroupRule]] = relationship(
        lazy="raise_on_sql", order_by="SecurityGroupRule.id", viewonly=True
    )


class SecurityGroupRule(db.Model):
    __tablename__ = "security_group_rule"
    __table_args__ = (
        CheckConstraint(one_of("direction", DIRECTIONS), name="direction"),
        CheckConstraint(one_of("ethertype", ETHERTYPES), name="ethertype"),
        CheckConstraint(one_of("protocol", PROTOCOLS), name="protocol"),
        CheckConstraint(
            or_(column("port_min").is_(None), column("port_min").between(1, 65535)),
            name="port_min_range",
        ),
        CheckConstraint(
            or_(column("port_max").is_(None), column("port_max").between(1, 65535)),
            name="port_max_range",
        ),
        CheckConstraint(
            or_(
                column("port_min").is_(None),
                column("port_max").is_(None),
                column("port_min") <= column("port_max"),
            ),
            name="port_order",
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    security_group_id: Mapped[int] = mapped_column(ForeignKey("security_group.id"), index=True)
    direction: Mapped[str] = mapped_column(String(8))
    ethertype: Mapped[str] = mapped_column(String(4))
    protocol: Mapped[str] = mapped_column(String(8))
    port_min: Mapped[int | None] = mapped_column(Integer)
    port_max: Mapped[int | None] = mapped_column(Integer)
    #: a network in CIDR notation of the rule's ethertype; null: any address
    remote_cidr: Mapped[str | None] = mapped_column(String(43))

    security_group: Mapped[SecurityGroup] = relationship(lazy="raise_on_sql", viewonly=True)


class InterfaceSecurityGroup(db.Model):
    """An interface uses a group (the pairs are the interface's ``security_groups``)."""

    __tablename__ = "interface_security_group"

    interface_id: Mapped[int] = mapped_column(ForeignKey("interface.id"), primary_key=True)
    security_group_id: Mapped[int] = mapped_column(
        ForeignKey("security_group.id"), primary_key=True, index=True
    )
