"""This installation's id, kept in its database (one row) when it is not configured.

The id goes into the libvirt names of every domain and volume the installation makes
(and into their metadata), so installations sharing hosts never collide. It is made
once per database by ``flask vmapi seed`` (or the migration that introduced it) and
never changes: names already made are stored on their rows anyway.
"""

from __future__ import annotations

from sqlalchemy import CheckConstraint, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from vmapi.extensions import db


class Installation(db.Model):
    __tablename__ = "installation"
    __table_args__ = (CheckConstraint("id = 1", name="one_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    installation_id: Mapped[str] = mapped_column(String(16))
