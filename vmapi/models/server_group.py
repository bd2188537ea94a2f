"""Server groups: a customer's (or, with ``customer_id`` null, an admin's) set of VMs that
the scheduler places by one policy (API.md "/server_group"). A VM joins one when it is
made (``vm.server_group_id``) and never leaves it but by its deletion."""

from __future__ import annotations

from sqlalchemy import BigInteger, CheckConstraint, String
from sqlalchemy.orm import Mapped, mapped_column

from vmapi.extensions import db
from vmapi.models.catalog import one_of

#: never two members on one node (a filter)
ANTI_AFFINITY = "anti-affinity"
#: every member on a node that holds one already (a filter; any node for the first)
AFFINITY = "affinity"
#: nodes with fewer members first (a weigher: no node is refused for it)
SOFT_ANTI_AFFINITY = "soft-anti-affinity"
POLICIES = (ANTI_AFFINITY, AFFINITY, SOFT_ANTI_AFFINITY)


class ServerGroup(db.Model):
    __tablename__ = "server_group"
    __table_args__ = (CheckConstraint(one_of("policy", POLICIES), name="policy"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    policy: Mapped[str] = mapped_column(String(32))
    customer_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
