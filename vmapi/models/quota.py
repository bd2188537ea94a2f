"""Per-customer limits on VMs, vCPUs, RAM and storage bytes (null: unlimited)."""

from __future__ import annotations

from sqlalchemy import BigInteger, CheckConstraint, column, or_
from sqlalchemy.orm import Mapped, mapped_column

from vmapi.extensions import db

LIMITS = (
    "max_vms",
    "max_cores",
    "max_ram",
    "max_storage",
    "max_security_groups",
    "max_security_rules",
)


class Quota(db.Model):
    __tablename__ = "quota"
    __table_args__ = tuple(
        CheckConstraint(or_(column(limit).is_(None), column(limit) >= 0), name=limit)
        for limit in LIMITS
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(BigInteger, unique=True)
    max_vms: Mapped[int | None] = mapped_column(BigInteger)
    max_cores: Mapped[int | None] = mapped_column(BigInteger)
    max_ram: Mapped[int | None] = mapped_column(BigInteger)
    max_storage: Mapped[int | None] = mapped_column(BigInteger)
    max_security_groups: Mapped[int | None] = mapped_column(BigInteger)
    max_security_rules: Mapped[int | None] = mapped_column(BigInteger)
