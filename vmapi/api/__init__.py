"""The HTTP API: version handling, the routes (vmapi/api/routes.py) and what runs after
every write."""

from __future__ import annotations

from flask import Flask, Response, g, request
from werkzeug.routing import IntegerConverter

from vmapi.api.resource import RESOURCES
from vmapi.api.routes import register_routes
from vmapi.api.url_rule import LazyBuilderRule
from vmapi.api.version import check_version
from vmapi.services.audit import record_failure
from vmapi.telemetry import count_change

WRITE_METHODS = {"POST", "PUT", "PATCH", "UPDATE", "DELETE"}
ACTIONS = {"POST": "create", "DELETE": "delete"}  # PUT, PATCH and UPDATE: update


#: the largest id: PostgreSQL's bigint
MAX_ID = 2**63 - 1


def numbers_up_to(limit: int) -> str:
    """A regex of the numbers 1..``limit`` written in at most as many ASCII digits as
    ``limit`` (leading zeros allowed, as :class:`IntegerConverter` takes them)."""
    top = str(limit)
    width = len(top)
    below = [f"{top[:i]}[0-{int(d) - 1}][0-9]{{{width - 1 - i}}}" for i, d in enumerate(top)
             if d != "0"]  # fmt: skip
    # not only zeros; then fewer digits than limit (always smaller), or as many and not more
    return f"(?!0+(?![0-9]))(?:[0-9]{{1,{width - 1}}}|{'|'.join([*below, top])})"


class IdConverter(IntegerConverter):
    """Positive ids that fit in PostgreSQL's bigint, in ASCII digits (``\\d`` would take
    any Unicode digit); anything else is no route (404).

    The regex alone decides (``to_python`` never refuses): a URL has one rule per method
    (vmapi/api/routes.py), and werkzeug answers a value its converter refuses after the
    path matched with 405 if another rule of the URL was tried first -- DELETE /vm/0
    would be a 405 naming GET, not the 404 it is."""

    regex = numbers_up_to(MAX_ID)

    def __init__(self, map, *args, **kwargs) -> None:
        super().__init__(map, min=1, max=MAX_ID)


def register_api(app: Flask) -> None:
    # URL builders compiled on first use (vmapi/api/url_rule.py): a cheaper start
    app.url_rule_class = LazyBuilderRule
    app.url_map.converters["id"] = IdConverter
    app.jinja_env.globals["resources"] = set(RESOURCES)

    @app.url_value_preprocessor
    def pop_version(endpoint: str | None, values: dict | None) -> None:
        if values and "api_version" in values:
            check_version(values.pop("api_version"))

    register_write_hooks(app)
    register_routes(app)


def register_write_hooks(app: Flask) -> None:
    """Every authenticated write is counted (``vmapi_changes_total``, ok or its error id);
    a refused or failed one also gets an audit event of its own (successful changes are
    recorded with the change itself, in its transaction)."""

    @app.after_request
    def after_write(response: Response) -> Response:
        if (
            request.method not in WRITE_METHODS
            or g.get("principal") is None
            or g.get("resource_name") is None
        ):
            return response
        action = g.get("action") or ACTIONS.get(request.method, "update")  # run_action's
        outcome = g.get("error_id") or "general/unknown" if response.status_code >= 400 else "ok"
        count_change(g.resource_name, action, outcome)
        if response.status_code >= 400:
            record_failure(g.resource_name, (request.view_args or {}).get("ident"), action,
                           outcome, response.status_code)  # fmt: skip
        return response
