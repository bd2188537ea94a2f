"""The audit trail: one row per change, written in the transaction that made it.

A row says who (the token's name and id, or ``cli``), when, through which request,
what (resource and id), the action, the fields before and after (changed fields for an
update, all fields for a create or delete; never a secret), and the outcome: ``ok``, or
the error id of a refused or failed request (then written on its own, as the change was
rolled back). ``customer_id`` is the owner of the object, so customers see their own.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from vmapi.extensions import db


class Event(db.Model):
    __tablename__ = "event"
    __table_args__ = (Index("ix_event_resource_object", "resource", "object_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    request_id: Mapped[str | None] = mapped_column(String(128), index=True)
    actor: Mapped[str] = mapped_column(String(255))
    token_id: Mapped[int | None] = mapped_column(Integer)
    customer_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    resource: Mapped[str] = mapped_column(String(64))
    object_id: Mapped[int | None] = mapped_column(BigInteger)
    action: Mapped[str] = mapped_column(String(32))
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    outcome: Mapped[str] = mapped_column(String(128), default="ok")
    status: Mapped[int | None] = mapped_column(Integer)
