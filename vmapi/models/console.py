"""Console tokens: a VM's VNC console for whoever holds the token, until it expires.

Only a SHA-256 hash of each token is stored (like API tokens): the token is a 256-bit
random secret shown once, in the answer of ``POST /vm/<id>/console``. The console proxy
(:mod:`vmapi.console_proxy`) finds the VM by the hash when a browser connects. A VM's
tokens go with its row (ON DELETE CASCADE) and are deleted when it moves.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from vmapi.extensions import db


class ConsoleToken(db.Model):
    __tablename__ = "console_token"

    id: Mapped[int] = mapped_column(primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vm.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    #: the display password set with the token expires at the same second
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)

    @staticmethod
    def digest(token: str) -> str:
        """What is stored of a token (a hash: the token itself is never kept)."""
        return hashlib.sha256(token.encode("utf-8")).hexdigest()
