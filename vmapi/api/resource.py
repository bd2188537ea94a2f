"""The generic per-verb views every uniform resource is served by (API.md §1).

A :class:`ResourceApi` couples a resource name, its marshmallow schema, its service and
its role rules, and has one view per verb: GET/POST/DELETE/UPDATE/PATCH on the
collection, GET/DELETE/UPDATE/PATCH on items, and its item actions. Which URL and method
reach which view is written in vmapi/api/routes.py. Views here only parse, call the
service and dump.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from flask import Response, current_app, g, request
from marshmallow import Schema
from marshmallow import ValidationError as MarshmallowError

from vmapi.api.actions import Action
from vmapi.api.errors import messages_for_the_caller
from vmapi.api.idempotent import idempotent_create
from vmapi.auth import ADMIN, CUSTOMER, Principal, authenticate, require_role
from vmapi.errors import Forbidden, ValidationError, at_index
from vmapi.representations import parse_body, success_response
from vmapi.schemas.base import Bool, Float, IdSchema, Int, Ref, RefList, Str
from vmapi.services.crud import CrudService, ListParams, Outcome

ALL_ROLES = frozenset({ADMIN, CUSTOMER})
ADMIN_ONLY = frozenset({ADMIN})
COLLECTION_METHODS = ["GET", "POST", "DELETE", "UPDATE", "PATCH"]
ITEM_METHODS = ["GET", "DELETE", "UPDATE", "PATCH"]
LIST_ARGS = {"limit", "after", "nest"}

#: Every resource by name: for nest=, links in HTML, and the OpenAPI document.
RESOURCES: dict[str, ResourceApi] = {}


def principal() -> Principal:
    """The caller, authenticated once per request."""
    if "principal" not in g:
        g.principal = authenticate(request.headers.get("Authorization"))
    return g.principal


class ResourceApi:
    """HTTP face of one resource."""

    def __init__(
        self,
        name: str,
        schema: type[Schema],
        service: CrudService,
        *,
        read_roles: frozenset[str] = ALL_ROLES,
        write_roles: frozenset[str] = ADMIN_ONLY,
        summary: str = "",
        update_options: type[Schema] | None = None,
        delete_options: type[Schema] | None = None,
        actions: dict[str, str | Action] | None = None,
        collection_methods: list[str] = COLLECTION_METHODS,
        item_methods: list[str] = ITEM_METHODS,
        idempotent: bool = False,
    ) -> None:
        self.name = name
        self.schema_class = schema
        self.schema = schema()
        self.service = service
        self.read_roles = read_roles
        self.write_roles = write_roles
        self.summary = summary
        #: query options a verb accepts (e.g. ``?force=true``); none when None
        self.update_options = update_options
        self.delete_options = delete_options
        #: item actions: ``POST /<name>/<id>/<action>`` -> service method name, or an Action
        #: (:meth:`run_action` runs it; its handler has a row in vmapi/api/routes.py)
        self.actions = actions or {}
        #: the verbs this resource takes, as the OpenAPI document tells them; the routes of
        #: vmapi/api/routes.py serve the same (tests/api/test_routes.py), others answer 405
        self.collection_methods = collection_methods
        self.item_methods = item_methods
        #: POST honours the Idempotency-Key header
        self.idempotent = idempotent
        #: what ``nest=`` takes: every reference answers show, single or a list
        #: (``interfaces``); not a write-only one (POST /vm's ``security_groups``)
        self.nestable: dict[str, Ref | RefList] = {
            key: f
            for key, f in self.schema.fields.items()
            if isinstance(f, Ref | RefList) and not f.load_only
        }
        self.filters = self._filterable()
        RESOURCES[name] = self

    # ------------------------------------------------------------------ wiring
    def extra_paths(self, success: Any, errors: Any) -> dict[str, dict[str, Any]]:
        """OpenAPI operations (path -> operations) of the resource's routes beyond the
        collection, its items and its actions (vmapi/api/routes.py); ``success`` builds an
        answer, ``errors(resource, operation)`` the error responses the registry names."""
        return {}

    def run_action(self, action: str, ident: int) -> Response:
        """``POST /<name>/<id>/<action>``: the action's use case, as :attr:`actions` says."""
        how = self.actions[action]
        roles = how.roles if isinstance(how, Action) and how.roles else self.write_roles
        g.resource_name, g.action = self.name, action
        who = principal()
        require_role(who, roles, f"{action} {self.name}")
        self.parse_options(request.args, None)
        body = parse_body()
        if isinstance(how, Action) and how.body is not None:
            if not isinstance(body, dict | None):
                raise ValidationError(f"The body of {action} must be an object.")
            try:
                given = how.body().load(body or {})
            except MarshmallowError as exc:
                raise ValidationError(data=exc.messages) from exc
            return how.respond(ident, who, given)
        if body not in (None, {}):
            raise ValidationError(f"{action} takes no body.")
        if isinstance(how, Action):
            return how.respond(ident, who, {})
        outcome = getattr(self.service, self.actions[action])(ident, who)
        return self.answer(outcome, indexed=False)

    def _filterable(self) -> dict[str, tuple[str, Any]]:
        """Query keys -> (model column, field that parses the value)."""
        columns = set(self.service.model.__table__.columns.keys())
        found: dict[str, tuple[str, Any]] = {}
        for key, f in self.schema.fields.items():
            column = f.attribute or key
            if column not in columns or f.load_only:  # write-only values are no filter
                continue
            if isinstance(f, Ref):
                found[f"{key}.id"] = (column, f)
            elif isinstance(f, Int | Float | Bool | Str):
                found[key] = (column, f)
        return found

    # ------------------------------------------------------------------ views
    # One view per verb; vmapi/api/routes.py maps each (method, path) to one of them, and
    # the endpoint is ``<name>.<view without _view>`` (``node.create``: POST /node).
    def list_view(self) -> Response:
        """``GET /<name>``: one page of objects, keyed by id; filters in the query."""
        who = self._caller(self.read_roles, "read")
        return self.list_objects(who)

    def create_view(self) -> Response:
        """``POST /<name>``: one object or an array (all or nothing)."""
        who = self._caller(self.write_roles, "change")
        if self.idempotent and "Idempotency-Key" in request.headers:
            return idempotent_create(self, who)
        return self.create(who)

    def update_many_view(self) -> Response:
        """``PATCH /<name>`` (or UPDATE): objects named by id in the body, changed."""
        return self.update_collection(self._caller(self.write_roles, "change"))

    def delete_many_view(self) -> Response:
        """``DELETE /<name>``: objects named by id in the body, deleted."""
        return self.delete_collection(self._caller(self.write_roles, "change"))

    def read_view(self, ident: int) -> Response:
        """``GET /<name>/<id>``: one object, references nested on request."""
        who = self._caller(self.read_roles, "read")
        nest = self.parse_nest(request.args, who, allowed={"nest"})
        return success_response(self.read_one(ident, who, nest))

    def update_view(self, ident: int) -> Response:
        """``PATCH /<name>/<id>`` (or UPDATE): the body's fields changed."""
        who = self._caller(self.write_roles, "change")
        options = self.parse_options(request.args, self.update_options)
        body = parse_body()
        if not isinstance(body, dict):
            raise ValidationError("The body must be an object with the fields to change.")
        if "id" in body and body.pop("id") != ident:
            raise ValidationError(data={"id": ["Does not match the id in the URL."]})
        data = self.load(body, partial=True)
        outcome = self.service.update_many([(ident, data)], who, False, options)
        return self.answer(outcome, indexed=False)

    def delete_view(self, ident: int) -> Response:
        """``DELETE /<name>/<id>``: the object deleted; the answer is it as it was."""
        who = self._caller(self.write_roles, "change")
        options = self.parse_options(request.args, self.delete_options)
        if parse_body() is not None:
            raise ValidationError("DELETE on an item takes no body; its id is in the URL.")
        outcome = self.service.delete_many([ident], who, options, indexed=False)
        return self.answer(outcome, indexed=False)

    def _caller(self, roles: frozenset[str], doing: str) -> Principal:
        """The caller, who must hold one of ``roles`` to be ``doing`` this resource."""
        g.resource_name = self.name
        who = principal()
        require_role(who, roles, f"{doing} {self.name}")
        return who

    def answer(self, outcome: Outcome, indexed: bool, status: int = 200) -> Response:
        """The objects of a write: one object, or keyed by id for an array request (or a
        request that made many, such as an IPv4 network)."""
        objs = outcome.objects
        data = self.dump_keyed(objs) if indexed or outcome.keyed else self.dump(objs[0])
        messages = messages_for_the_caller(outcome.messages)
        return success_response(data, status=status, messages=messages)

    def list_objects(self, who: Principal) -> Response:
        params = self.parse_list(request.args, who)
        data, more = self.read_page(who, params)
        headers = None
        if more and data:
            query = request.args.to_dict(flat=False)
            query["after"] = [next(reversed(data))]  # the last id on this page
            headers = {"Link": f'<{request.base_url}?{urlencode(query, doseq=True)}>; rel="next"'}
        return success_response(data, headers=headers)

    # ------------------------------------------------------------------ reading
    # A resource whose hot reads are answered without the ORM (vm) overrides these two and
    # hands back exactly what they would: the same keys in the same order, the same types.
    def read_one(self, ident: int, who: Principal, nest: list[str]) -> dict[str, Any]:
        """The data of ``GET /<name>/<id>``: the service's object, dumped by the schema."""
        return self.dump(self.service.get(ident, who, nest), nest)

    def read_page(self, who: Principal, params: ListParams) -> tuple[dict[str, Any], bool]:
        """The data of one page of ``GET /<name>`` (objects keyed by id, in id order) and
        whether more follow."""
        objs, more = self.service.list_page(who, params)
        return self.dump_keyed(objs, params.nest), more

    def create(self, who: Principal) -> Response:
        self.parse_options(request.args, None)
        items, indexed = self.body_items()
        loaded = []
        for index, item in enumerate(items):
            item.pop("id", None)  # API.md: id on POST is ignored
            loaded.append(self.load(item, index=index if indexed else None))
        outcome = self.service.create_many(loaded, who, indexed)
        return self.answer(outcome, indexed, status=201)

    def update_collection(self, who: Principal) -> Response:
        options = self.parse_options(request.args, self.update_options)
        items, indexed = self.body_items()
        loaded = []
        for index, item in enumerate(items):
            ident = self.load_id(item.pop("id", None), index if indexed else None)
            loaded.append((ident, self.load(item, partial=True, index=index if indexed else None)))
        outcome = self.service.update_many(loaded, who, indexed, options)
        return self.answer(outcome, indexed)

    def delete_collection(self, who: Principal) -> Response:
        options = self.parse_options(request.args, self.delete_options)
        items, indexed = self.body_items()
        ids = []
        for index, item in enumerate(items):
            with at_index(index if indexed else None):
                try:
                    ids.append(IdSchema().load(item)["id"])
                except MarshmallowError as exc:
                    raise ValidationError(data=exc.messages) from exc
        outcome = self.service.delete_many(ids, who, options, indexed)
        return self.answer(outcome, indexed)

    # ------------------------------------------------------------------ parsing
    def body_items(self) -> tuple[list[dict[str, Any]], bool]:
        """The body as a list of objects, and whether it was an array."""
        body = parse_body()
        if isinstance(body, dict):
            return [body], False
        if isinstance(body, list):
            limit = current_app.config["MAX_BATCH"]
            if not body:
                raise ValidationError("The array is empty; send at least one object.")
            if len(body) > limit:
                raise ValidationError(
                    f"The array has {len(body)} elements; at most {limit} are accepted.",
                    data={"limit": limit, "count": len(body)},
                )
            for index, item in enumerate(body):
                if not isinstance(item, dict):
                    raise ValidationError(
                        "Each element of the array must be an object.", data={"index": index}
                    )
            return body, True
        if body is None:
            raise ValidationError("A body is required: an object or an array of objects.")
        raise ValidationError("The body must be an object or an array of objects.")

    def load(self, item: dict[str, Any], partial: bool = False, index: int | None = None) -> dict:
        with at_index(index):
            try:
                return self.schema.load(item, partial=partial)
            except MarshmallowError as exc:
                raise ValidationError(data=exc.messages) from exc

    @staticmethod
    def load_id(value: Any, index: int | None) -> int:
        with at_index(index):
            try:
                return IdSchema().load({"id": value})["id"]
            except MarshmallowError as exc:
                msg = "Each object needs the id of the object to change."
                data = {"id": exc.messages.get("id", ["Missing."])}
                raise ValidationError(msg, data=data) from exc

    @staticmethod
    def parse_options(args: Mapping[str, str], schema: type[Schema] | None) -> dict[str, Any]:
        """Query options of a write, parsed by the verb's option schema (none by default)."""
        if schema is None:
            if args:
                raise ValidationError(data={key: ["Unknown query parameter."] for key in args})
            return {}
        try:
            return schema().load(dict(args))
        except MarshmallowError as exc:
            raise ValidationError(data=exc.messages) from exc

    def parse_list(self, args: Mapping[str, str], who: Principal) -> ListParams:
        errors: dict[str, list[str]] = {}
        params = ListParams(limit=current_app.config["PAGE_DEFAULT_LIMIT"])
        params.nest = self.parse_nest(args, who, allowed=LIST_ARGS | set(self.filters))
        for key in args:
            values = args.getlist(key) if hasattr(args, "getlist") else [args[key]]
            if len(values) > 1:
                errors[key] = ["Give this parameter once."]
                continue
            raw = values[0]
            try:
                if key == "limit":
                    params.limit = self._parse_limit(raw)
                elif key == "after":
                    params.after = Ref("any").parse_query(raw) if raw != "0" else 0
                elif key == "nest":
                    continue
                elif key in self.filters:
                    column, f = self.filters[key]
                    params.filters.append((column, f.parse_query(raw)))
                else:
                    errors[key] = [
                        "Unknown filter; use one of: " + ", ".join(sorted(self.filters)) + "."
                    ]
            except MarshmallowError as exc:
                errors[key] = exc.messages if isinstance(exc.messages, list) else [str(exc)]
        if errors:
            raise ValidationError(data=errors)
        return params

    @staticmethod
    def _parse_limit(raw: str) -> int:
        maximum = current_app.config["PAGE_MAX_LIMIT"]
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 7) or not 1 <= int(raw) <= maximum:
            raise MarshmallowError(f"Must be a whole number from 1 to {maximum}.")
        return int(raw)

    def parse_nest(self, args: Mapping[str, str], who: Principal, allowed: set[str]) -> list[str]:
        unknown = [key for key in args if key not in allowed]
        if unknown:
            raise ValidationError(data={key: ["Unknown query parameter."] for key in unknown})
        raw = args.get("nest")
        if raw is None:
            return []
        names = [n.strip() for n in raw.split(",") if n.strip()]
        bad = [n for n in names if n not in self.nestable]
        if bad or not names:
            choices = ", ".join(sorted(self.nestable)) or "nothing on this resource"
            raise ValidationError(
                data={
                    "nest": [f"Cannot nest {', '.join(bad) or 'nothing'}; choose from {choices}."]
                }
            )
        for n in names:
            target = RESOURCES.get(self.nestable[n].resource)
            if target is not None and who.role not in target.read_roles:
                raise Forbidden(action=f"read {target.name}")
        return list(dict.fromkeys(names))

    # ------------------------------------------------------------------ dumping
    def dump(
        self, obj: Any, nest: list[str] | tuple[str, ...] = (), seen: dict | None = None
    ) -> dict[str, Any]:
        """``obj`` with its ``nest`` references embedded; ``seen`` keeps the nested
        objects already dumped for this answer (a page of 100 VMs on 5 nodes dumps 5)."""
        data = self.schema.dump(obj)
        seen = {} if seen is None else seen
        for name in nest:
            schema = RESOURCES[self.nestable[name].resource].schema
            related = getattr(obj, name)
            if related is None:
                data[name] = None
            elif isinstance(related, list):
                data[name] = [self._dump_once(schema, name, item, seen) for item in related]
            else:
                data[name] = self._dump_once(schema, name, related, seen)
        return data

    @staticmethod
    def _dump_once(schema: Schema, name: str, related: Any, seen: dict) -> dict[str, Any]:
        key = (name, related.id)
        if key not in seen:
            seen[key] = schema.dump(related)
        return seen[key]

    def dump_keyed(self, objs: list[Any], nest: list[str] | tuple[str, ...] = ()) -> dict:
        seen: dict = {}
        return {str(obj.id): self.dump(obj, nest, seen) for obj in objs}
