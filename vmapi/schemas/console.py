"""The answer of ``POST /vm/<id>/console`` (nothing of it is stored in the clear)."""

from __future__ import annotations

from vmapi.schemas.base import BaseSchema, Bool, Str, UtcDateTime


class ConsoleSchema(BaseSchema):
    url = Str(
        dump_only=True,
        metadata={"description": "The noVNC page that connects at once (CONSOLE_URL)."},
    )
    token = Str(
        dump_only=True,
        metadata={"description": "Opens the VM's display through the console proxy."},
    )
    password = Str(
        dump_only=True,
        metadata={"description": "The display's VNC password (8 characters), until expiry."},
    )
    expires_at = UtcDateTime(
        dump_only=True,
        metadata={"description": "When the token and the password stop being accepted."},
    )


class ConsoleLogSchema(BaseSchema):
    """The answer of ``GET /vm/<id>/console_log``."""

    text = Str(dump_only=True, metadata={"description": "The log's end, as UTF-8 text."})
    truncated = Bool(dump_only=True, metadata={"description": "Older output exists before it."})
