"""Idempotency keys: the first answer to a create, kept per token for replays."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from vmapi.extensions import db


class IdempotencyKey(db.Model):
    __tablename__ = "idempotency_key"
    __table_args__ = (UniqueConstraint("token_id", "key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    token_id: Mapped[int] = mapped_column(ForeignKey("api_token.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    #: SHA-256 of method, path and body: the same key with another request is a conflict
    fingerprint: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    #: null while the first request is still running
    status_code: Mapped[int | None] = mapped_column(Integer)
    mimetype: Mapped[str | None] = mapped_column(String(64))
    body: Mapped[bytes | None] = mapped_column(LargeBinary)
    #: the request running the key (a random token): a retry that took the key over from
    #: a dead request wrote its own, and the dead one's writes to the row match no more
    owner: Mapped[str | None] = mapped_column(String(32))
    #: ids (a JSON list) of the objects the request made, written in the transaction that
    #: commits each of them: what a retry answers when the request died before its answer
    made: Mapped[str | None] = mapped_column(Text)
    #: ids (a JSON list) of the VMs it committed as ``building`` (in that transaction):
    #: what a retry that takes the key over from a dead request removes
    building: Mapped[str | None] = mapped_column(Text)
