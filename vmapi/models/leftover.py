"""Leftovers: domains and volumes of this installation that a node still has but should
not, written down when they come about and removed by ``flask vmapi reconcile --fix``.

A move makes volumes on its target before the domain moves, and leaves the source's
behind once it has; an evacuation leaves everything on the dead node. Each such thing is
recorded here by the code that makes or abandons it, in the same transaction, so nothing
is ever deleted on a guess: reconcile removes exactly what is listed (once the node
answers, and only while no row of the database owns it there again).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, DateTime, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from vmapi.extensions import db
from vmapi.models.catalog import one_of

DOMAIN, VOLUME, LOG = "domain", "volume", "log"  # a log: a console log and its rotations


class Leftover(db.Model):
    __tablename__ = "leftover"
    __table_args__ = (
        CheckConstraint(one_of("kind", (DOMAIN, VOLUME, LOG)), name="kind"),
        CheckConstraint("(kind = 'domain') = (pool IS NULL)", name="domain_has_no_pool"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("node.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    pool: Mapped[str | None] = mapped_column(String(255))
    name: Mapped[str] = mapped_column(String(255))
    #: the VM it belonged to (no foreign key: the VM may be gone by the time it is removed)
    vm_id: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
