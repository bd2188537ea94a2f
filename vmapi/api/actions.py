"""Item actions whose answer is not the resource itself (``POST /vm/<id>/console``).

A plain action (``reboot``) is a service method name and answers the changed object. An
:class:`Action` names its own use case, the schema of its answer and its status, and
what the use case needs to know of the request (the views read it; services never do).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Response
from marshmallow import Schema

from vmapi.auth import Principal
from vmapi.representations import success_response


@dataclass(frozen=True)
class Action:
    """``run(ident, principal, **context())`` answered with ``schema`` and ``status``."""

    run: Callable[..., Any]
    schema: type[Schema]
    status: int = 200
    summary: str = ""
    #: keyword arguments the use case takes from the request (e.g. the API's own URL)
    context: Callable[[], dict[str, Any]] = field(default=dict)

    def respond(self, ident: int, principal: Principal) -> Response:
        result = self.run(ident, principal, **self.context())
        return success_response(self.schema().dump(result), status=self.status)
