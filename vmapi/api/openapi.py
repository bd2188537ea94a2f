"""The OpenAPI 3 document, generated from the resource registry and marshmallow schemas.

It is built from the same :class:`ResourceApi` objects that serve requests, so routes,
fields, filters and role rules cannot drift from the document. ``UPDATE`` cannot be
named in OpenAPI 3.0 (only the standard methods can); it is documented as ``PATCH``,
which the server treats identically, and noted in ``x-method-aliases``. Fields and query
parameters are described by :mod:`vmapi.api.openapi_schemas`; the document is built once
per app, with that app's limits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Flask

from vmapi.api import openapi_schemas as js
from vmapi.api.actions import Action
from vmapi.api.openapi_errors import (
    ADMIN_ERRORS,
    TOKEN_ERRORS,
    error_responses,
    errors_of,
)
from vmapi.api.resource import ADMIN_ONLY, RESOURCES, ResourceApi
from vmapi.error_ids import (
    ACTION,
    CREATE,
    DELETE,
    GENERAL_UNAVAILABLE,
    LIST,
    READ,
    UPDATE,
    not_found,
)
from vmapi.release import __version__


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


def _only(operations: dict[str, Any], methods: list[str]) -> dict[str, Any]:
    """The operations of the HTTP methods a route takes (UPDATE is documented as patch)."""
    allowed = {m.lower() for m in methods} | ({"patch"} if "UPDATE" in methods else set())
    return {verb: op for verb, op in operations.items() if verb in allowed}


def _paths_for(
    spec: APISpec, plugin: MarshmallowPlugin, res: ResourceApi, config: Mapping[str, Any]
) -> None:
    name = res.name
    ref = {"$ref": f"#/components/schemas/{js.component_name(name)}"}
    creates = [js.create_body(plugin, res.schema_class)]
    answers = [ref]
    also = getattr(res, "creates_also", None)  # POST /ipv6 {network} makes an ipv6_pool
    if also is not None:
        creates.append(js.create_body(plugin, RESOURCES[also].schema_class))
        answers.append({"$ref": f"#/components/schemas/{js.component_name(also)}"})
    created = {"anyOf": [*answers, *(_keyed(a) for a in answers)]}
    change = js.change_body(plugin, res.schema_class, with_id=False)
    change_many = js.change_body(plugin, res.schema_class, with_id=True)
    nest = js.nest_parameter(res)
    roles = "admin only" if res.read_roles == ADMIN_ONLY else "admin and customer tokens"
    tags = [name]
    update_params = js.option_parameters(plugin, res.update_options)
    delete_params = js.option_parameters(plugin, res.delete_options)
    batch = config["MAX_BATCH"]
    aliases = {"x-method-aliases": {"UPDATE": "patch"}}
    collection_ops = {
        "get": {
            "tags": tags,
            "summary": f"List {name} objects ({roles} may read).",
            "parameters": js.list_parameters(res, config),
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
                **errors_of(name, LIST),
            },
        },
        "post": {
            "tags": tags,
            "summary": f"Create one {name} or an array of up to {batch} (all or nothing).",
            "requestBody": _body(js.one_or_many(creates, config), "One object or an array."),
            "responses": {
                "201": _success(created, "Created."),
                **errors_of(name, CREATE),
            },
        },
        "patch": {
            "tags": tags,
            "summary": f"Change {name} objects: body with id (or an array). Also UPDATE.",
            "parameters": update_params,
            "requestBody": _body(js.one_or_many([change_many], config), "Ids and changes."),
            "responses": {
                "200": _success({"anyOf": [ref, _keyed(ref)]}, "The changed objects."),
                **errors_of(name, UPDATE),
            },
            **aliases,
        },
        "delete": {
            "tags": tags,
            "summary": f"Delete {name} objects named by id (or an array).",
            "parameters": delete_params,
            "requestBody": _body(js.one_or_many([js.ID_ONLY], config), '{"id": N} or an array.'),
            "responses": {
                "200": _success({"anyOf": [ref, _keyed(ref)]}, "The deleted objects."),
                **errors_of(name, DELETE),
            },
        },
    }
    spec.path(path=f"/api/v1/{name}", operations=_only(collection_ops, res.collection_methods))
    ident = {
        "name": "ident",
        "in": "path",
        "required": True,
        "schema": js.ID,
    }
    item_ops = {
        "get": {
            "tags": tags,
            "summary": f"One {name}.",
            "parameters": [ident, *nest],
            "responses": {"200": _success(ref, "The object."), **errors_of(name, READ)},
        },
        "patch": {
            "tags": tags,
            "summary": f"Change one {name}. Also UPDATE.",
            "parameters": [ident, *update_params],
            "requestBody": _body(change, "The fields to change (an id must be the URL's)."),
            "responses": {
                "200": _success(ref, "The changed object."),
                **errors_of(name, UPDATE),
            },
            **aliases,
        },
        "delete": {
            "tags": tags,
            "summary": f"Delete one {name}.",
            "parameters": [ident, *delete_params],
            "responses": {
                "200": _success(ref, "The deleted object, as it was."),
                **errors_of(name, DELETE),
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
        operation = {
            "tags": tags,
            "summary": summary,
            "parameters": [ident],
            "responses": {**answer, **errors_of(name, ACTION)},
        }
        if isinstance(how, Action) and how.body is not None:
            body = f"{name.capitalize()}{action.capitalize()}Body"
            spec.components.schema(body, schema=how.body)
            required = any(field.required for field in how.body().fields.values())
            described = "The body." if required else "Optional: every field has a default."
            operation["requestBody"] = {
                **_body({"$ref": f"#/components/schemas/{body}"}, described),
                "required": required,
            }
        spec.path(path=f"/api/v1/{name}/{{ident}}/{action}", operations={"post": operation})
    for path, operations in res.extra_paths(_success, errors_of).items():
        spec.path(path=path, operations=operations)


EXTENSION = "vmapi.openapi"


def document_for(app: Flask) -> dict[str, Any]:
    """The app's document, built once per app: it tells that app's limits."""
    if EXTENSION not in app.extensions:
        app.extensions[EXTENSION] = openapi_document(app.config)
    return app.extensions[EXTENSION]


def openapi_document(config: Mapping[str, Any]) -> dict[str, Any]:
    """The whole document, with the limits of ``config`` (an app's configuration)."""
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
    js.install(plugin, config)
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
                    **error_responses([GENERAL_UNAVAILABLE]),
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
                "responses": {"200": _success({"type": "object"}, "Index."),
                              **error_responses(TOKEN_ERRORS)},
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
                }, **error_responses(ADMIN_ERRORS)},
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
                    "content": {"application/yaml": {"schema": js.ENC_ANSWER}},
                }, **error_responses([*ADMIN_ERRORS, not_found("node")])},
            }
        },
    )  # fmt: skip
    for res in RESOURCES.values():
        spec.components.schema(
            js.component_name(res.name), component=js.answer_component(plugin, res)
        )
    for res in RESOURCES.values():
        _paths_for(spec, plugin, res, config)
    return spec.to_dict()
