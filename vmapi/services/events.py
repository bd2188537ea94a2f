"""Reading the audit trail (written by :mod:`vmapi.services.audit`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import delete

from vmapi.extensions import db
from vmapi.models import Event
from vmapi.services.crud import CrudService


class EventService(CrudService[Event]):
    """Admins read every event; a customer reads those about its own objects."""

    def __init__(self) -> None:
        super().__init__(Event, "event")

    def customer_scope(self, stmt, customer_id: int | None):
        return stmt.where(Event.customer_id == customer_id)


def purge_events(days: int) -> int:
    """Delete the events older than ``days`` days (retention); how many went."""
    cutoff = datetime.now(UTC) - timedelta(days=days)
    deleted = db.session.execute(delete(Event).where(Event.at < cutoff)).rowcount
    db.session.commit()
    return deleted
