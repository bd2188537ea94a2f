"""Item actions with a use case of their own (``POST /vm/<id>/console``, ``/migrate``).

A plain action (``reboot``) is a service method name, takes no body and answers the
changed object. An :class:`Action` names its own use case, the schema of its answer and
its status, what the use case needs to know of the request (the views read it; services
never do), optionally a body schema whose fields become the use case's keyword
arguments, and the roles that may run it when they are fewer than the resource's
writers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Response
from marshmallow import Schema

from vmapi.api.errors import messages_for_the_caller
from vmapi.auth import Principal
from vmapi.representations import success_response
from vmapi.services.crud import Outcome


@dataclass(frozen=True)
class Action:
    """``run(ident, principal, **context())`` answered with ``schema`` and ``status``."""

    run: Callable[..., Any]
    schema: type[Schema]
    status: int = 200
    summary: str = ""
    #: keyword arguments the use case takes from the request (e.g. the API's own URL)
    context: Callable[[], dict[str, Any]] = field(default=dict)
    #: the body's schema (its fields are keyword arguments); None: no body is taken
    body: type[Schema] | None = None
    #: who may run it (None: the resource's write roles)
    roles: frozenset[str] | None = None

    def respond(self, ident: int, principal: Principal, given: dict[str, Any]) -> Response:
        """``given``: the loaded body (empty without one)."""
        result = self.run(ident, principal, **given, **self.context())
        if isinstance(result, Outcome):  # the changed object, with notes for the caller
            data = self.schema().dump(result.objects[0])
            messages = messages_for_the_caller(result.messages)
            return success_response(data, status=self.status, messages=messages)
        return success_response(self.schema().dump(result), status=self.status)
