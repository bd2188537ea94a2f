"""The OpenAPI 3 document, generated from the resource registry and marshmallow schemas.

It is built from the same :class:`ResourceApi` objects that serve requests, so routes,
fields, filters and role rules cannot drift from the document. ``UPDATE`` cannot be
named in OpenAPI 3.0 (only the standard methods can); it is documented as ``PATCH``,
which the server treats identically, and noted in ``x-method-aliases``.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from vmapi import __version__
from vmapi.api.actions import Action
from vmapi.api.resource import ADMIN_ONLY, RESOURCES, ResourceApi
from vmapi.schemas.base import Bool, Float, Int, Ref

ERROR_STATUSES = {
    400: "Invalid request (general/validation, general/malformed_body, general/version/malformed).",
    401: "No or bad token (general/authentication/required, general/authentication/failed).",
    403: "The token's role may not do this (general/authorization/forbidden).",
    404: "No such object or version ({resource}/not_found, general/not_found, "
    "general/version/unsupported).",
    405: "Method not allowed on this URL (general/method_not_allowed).",
    409: "Conflict ({resource}/duplicate, {resource}/in_use, {resource}/protected{extra}).",
    413: "Body larger than the configured limit (general/body_too_large).",
    415: "Body neither JSON nor MessagePack (general/unsupported_media_type).",
    500: "Unexpected failure; data.request_id names it in the server log (general/internal).",
    502: "The hypervisor failed; its message is in the answer{extra}.",
    504: "The hypervisor did not answer in time{extra}.",
}
EXTRA_ERRORS = {"node": {409: ["node/unreachable"]}, "virt_node": {409: ["node/unreachable"]}}


def _ref_property(self: Any, field: Any, **kwargs: Any) -> dict[str, Any]:
    if not isinstance(field, Ref):
        return {}
    ref = {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 1, "format": "int64"}},
        "required": ["id"],
        "additionalProperties": False,
        "description": f"Reference to a {field.resource}.",
    }
    if field.allow_none:
        ref["nullable"] = True
    return ref


def _error(code: int, resource: str) -> dict[str, Any]:
    ids = RESOURCES[resource].error_ids if resource in RESOURCES else {}
    extra_ids = ids.get(code, []) or EXTRA_ERRORS.get(resource, {}).get(code, [])
    extra = "".join(f", {i}" for i in extra_ids)
    if code in (502, 504) and extra_ids:
        extra = f" ({', '.join(extra_ids)})"
    text = ERROR_STATUSES[code].format(resource=resource, extra=extra)
    for i in extra_ids:
        if i not in text:
            text += f" Also: {i}."
    return {
        "description": text,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _success(schema: dict[str, Any], description: str) -> dict[str, Any]:
    envelope = {
        "type": "object",
        "required": ["status", "data"],
        "properties": {
            "status": {"type": "string", "enum": ["success"]},
            "data": schema,
            "message": {"type": "string", "description": "What takes effect later, or notes."},
        },
    }
    return {
        "description": description,
        "content": {
            "application/json": {"schema": envelope},
            "application/msgpack": {"schema": envelope},
            "text/html": {"schema": {"type": "string"}},
        },
    }


def _body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "required": True,
        "description": description,
        "content": {
            "application/json": {"schema": schema},
            "application/msgpack": {"schema": schema},
        },
    }


def _keyed(item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": item, "description": "Objects keyed by id."}


def _one_or_many(item: dict[str, Any]) -> dict[str, Any]:
    return {"oneOf": [item, {"type": "array", "items": item, "minItems": 1, "maxItems": 100}]}


def _only(operations: dict[str, Any], methods: list[str]) -> dict[str, Any]:
    """The operations of the HTTP methods a route takes (UPDATE is documented as patch)."""
    allowed = {m.lower() for m in methods} | ({"patch"} if "UPDATE" in methods else set())
    return {verb: op for verb, op in operations.items() if verb in allowed}


def _option_params(plugin: MarshmallowPlugin, schema: Any) -> list[dict[str, Any]]:
    """Query parameters of a verb's option schema (e.g. ``force``)."""
    if schema is None:
        return []
    return [
        {"name": key, "in": "query", "required": False, "schema": _query_schema(f),
         "description": (schema.__doc__ or "").strip().splitlines()[0]}
        for key, f in schema().fields.items()
    ]  # fmt: skip


def _query_schema(field: Any) -> dict[str, Any]:
    if isinstance(field, Ref):
        return {"type": "integer", "minimum": 1, "format": "int64"}
    if isinstance(field, Int):
        return {"type": "integer", "format": "int64"}
    if isinstance(field, Float):
        return {"type": "number"}
    if isinstance(field, Bool):
        return {"type": "boolean"}
    return {"type": "string"}


def _paths_for(spec: APISpec, plugin: MarshmallowPlugin, res: ResourceApi) -> None:
    name = res.name
    component = "".join(part.capitalize() for part in name.split("_"))
    spec.components.schema(component, schema=res.schema_class)
    ref = {"$ref": f"#/components/schemas/{component}"}
    props = plugin.converter.schema2jsonschema(res.schema_class)
    writable = {
        k: v for k, v in copy.deepcopy(props["properties"]).items() if not v.get("readOnly")
    }
    create = {
        "type": "object",
        "properties": {"id": {"description": "Ignored, whatever it is."}, **writable},
        "additionalProperties": False,
    }
    if props.get("required"):
        create["required"] = props["required"]
    change = {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 1, "format": "int64"}, **writable},
        "additionalProperties": False,
    }
    change_many = copy.deepcopy(change)
    change_many["required"] = ["id"]
    id_only = {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 1, "format": "int64"}},
        "required": ["id"],
        "additionalProperties": False,
    }
    roles = "admin only" if res.read_roles == ADMIN_ONLY else "admin and customer tokens"
    tags = [name]
    hypervisor_codes = tuple(c for c in (502, 504) if c in res.error_ids)

    def errs(*codes: int, writes: bool = False) -> dict[str, Any]:
        return {str(c): _error(c, name) for c in (*codes, *(hypervisor_codes if writes else ()))}

    update_params = _option_params(plugin, res.update_options)
    delete_params = _option_params(plugin, res.delete_options)
    filters = [
        {"name": key, "in": "query", "required": False, "schema": _query_schema(f),
         "description": f"Only objects whose {key} equals this."}
        for key, (_col, f) in sorted(res.filters.items())
    ]  # fmt: skip
    nest = {
        "name": "nest",
        "in": "query",
        "required": False,
        "schema": {"type": "string"},
        "description": "Comma-separated references to inline: " + (", ".join(res.refs) or "none"),
    }
    paging = [
        {"name": "limit", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
        {"name": "after", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 0, "format": "int64"},
         "description": "Keyset paging: objects with a larger id. See the Link header."},
    ]  # fmt: skip
    aliases = {"x-method-aliases": {"UPDATE": "patch"}}
    collection_ops = {
        "get": {
            "tags": tags,
            "summary": f"List {name} objects ({roles} may read).",
            "parameters": [*paging, nest, *filters],
            "responses": {
                "200": {
                    **_success(_keyed(ref), "One page, keyed by id, ordered by id."),
                    "headers": {
                        "Link": {
                            "schema": {"type": "string"},
                            "description": 'rel="next" when more follow.',
                        }
                    },
                },
                **errs(400, 401, 403, 404),
            },
        },
        "post": {
            "tags": tags,
            "summary": f"Create one {name} or an array of up to 100 (all or nothing).",
            "requestBody": _body(_one_or_many(create), "One object or an array."),
            "responses": {
                "201": _success({"oneOf": [ref, _keyed(ref)]}, "Created."),
                **errs(400, 401, 403, 404, 409, 413, 415, writes=True),
            },
        },
        "patch": {
            "tags": tags,
            "summary": f"Change {name} objects: body with id (or an array). Also UPDATE.",
            "parameters": update_params,
            "requestBody": _body(_one_or_many(change_many), "Objects with id and changes."),
            "responses": {
                "200": _success({"oneOf": [ref, _keyed(ref)]}, "The changed objects."),
                **errs(400, 401, 403, 404, 409, 413, 415, writes=True),
            },
            **aliases,
        },
        "delete": {
            "tags": tags,
            "summary": f"Delete {name} objects named by id (or an array).",
            "parameters": delete_params,
            "requestBody": _body(_one_or_many(id_only), '{"id": N} or an array of such.'),
            "responses": {
                "200": _success({"oneOf": [ref, _keyed(ref)]}, "The deleted objects."),
                **errs(400, 401, 403, 404, 409, 413, 415, writes=True),
            },
        },
    }
    spec.path(path=f"/api/v1/{name}", operations=_only(collection_ops, res.collection_methods))
    ident = {
        "name": "ident",
        "in": "path",
        "required": True,
        "schema": {"type": "integer", "minimum": 1, "format": "int64"},
    }
    item_ops = {
        "get": {
            "tags": tags,
            "summary": f"One {name}.",
            "parameters": [ident, nest],
            "responses": {"200": _success(ref, "The object."), **errs(400, 401, 403, 404)},
        },
        "patch": {
            "tags": tags,
            "summary": f"Change one {name}. Also UPDATE.",
            "parameters": [ident, *update_params],
            "requestBody": _body(change, "The fields to change."),
            "responses": {
                "200": _success(ref, "The changed object."),
                **errs(400, 401, 403, 404, 409, 413, 415, writes=True),
            },
            **aliases,
        },
        "delete": {
            "tags": tags,
            "summary": f"Delete one {name}.",
            "parameters": [ident, *delete_params],
            "responses": {
                "200": _success(ref, "The deleted object, as it was."),
                **errs(400, 401, 403, 404, 409, writes=True),
            },
        },
    }
    spec.path(path=f"/api/v1/{name}/{{ident}}", operations=_only(item_ops, res.item_methods))
    for action, how in res.actions.items():
        summary = f"{action.capitalize()} one {name}."
        answer = {"200": _success(ref, f"The {name} after the {action}.")}
        if isinstance(how, Action):
            component = f"{name.capitalize()}{action.capitalize()}"
            spec.components.schema(component, schema=how.schema)
            summary = how.summary or summary
            answer = {str(how.status): _success({"$ref": f"#/components/schemas/{component}"},
                                                f"The {action} of the {name}.")}  # fmt: skip
        spec.path(
            path=f"/api/v1/{name}/{{ident}}/{action}",
            operations={
                "post": {
                    "tags": tags,
                    "summary": summary,
                    "parameters": [ident],
                    "responses": {**answer, **errs(400, 401, 403, 404, 409, writes=True)},
                }
            },
        )


@cache
def openapi_document() -> dict[str, Any]:
    """The whole document (built once per process)."""
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="vmapi",
        version=__version__,
        openapi_version="3.0.3",
        plugins=[plugin],
        info={
            "description": "Runs a fleet of libvirt hypervisor hosts. Every response is an "
            "envelope; errors carry a stable error_id. The UPDATE method is accepted "
            "wherever PATCH is documented (x-method-aliases).",
        },
        servers=[{"url": "/"}],
        security=[{"bearer": []}],
    )
    plugin.converter.add_attribute_function(_ref_property)
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    spec.components.schema(
        "Error",
        component={
            "type": "object",
            "required": ["status", "status_code", "error_id", "message"],
            "properties": {
                "status": {"type": "string", "enum": ["error"]},
                "status_code": {"type": "integer"},
                "error_id": {"type": "string", "pattern": "^[a-z0-9_]+(/[a-z0-9_]+)+$"},
                "message": {"type": "string"},
                "data": {"description": "Details: bad fields, conflicting ids, index."},
            },
        },
    )
    spec.path(
        path="/health",
        operations={
            "get": {
                "summary": "200 when the database answers, 503 otherwise.",
                "security": [],
                "responses": {
                    "200": _success({"type": "object"}, "Healthy."),
                    "503": {"description": "Database down (general/unavailable)."},
                },
            }
        },
    )
    spec.path(
        path="/api/v1/openapi.json",
        operations={
            "get": {
                "summary": "This document.",
                "security": [],
                "responses": {"200": {
                    "description": "OpenAPI 3 document.",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }},
            }
        },
    )  # fmt: skip
    spec.path(
        path="/api/v1/",
        operations={
            "get": {
                "summary": "The resources this server offers.",
                "responses": {"200": _success({"type": "object"}, "Index."), **{
                    str(c): _error(c, "general") for c in (401,)}},
            }
        },
    )  # fmt: skip
    spec.path(
        path="/metrics",
        operations={
            "get": {
                "summary": "Prometheus metrics of every worker (admin token, or a peer in "
                "METRICS_ALLOW).",
                "responses": {"200": {
                    "description": "Prometheus text exposition format.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }, **{str(c): _error(c, "general") for c in (401, 403)}},
            }
        },
    )  # fmt: skip
    spec.path(
        path="/api/v1/node/{fqdn}/enc",
        operations={
            "get": {
                "parameters": [{"name": "fqdn", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "summary": "The node's Puppet ENC answer (YAML): class vmapi::hypervisor "
                "with its VMs, bridges or taps, VLANs and addresses.",
                "responses": {"200": {
                    "description": "ENC YAML (classes, parameters).",
                    "content": {"application/yaml": {"schema": {"type": "string"}}},
                }, "404": _error(404, "node"), **{
                    str(c): _error(c, "general") for c in (401, 403)}},
            }
        },
    )  # fmt: skip
    for res in RESOURCES.values():
        _paths_for(spec, plugin, res)
    return spec.to_dict()
