"""/vm (admins and customers; customers see only their own VMs): the handlers of its
own operations -- create a VM, reboot, migrate, open a console, read the console log --
and the ResourceApi whose generic views serve the rest (vmapi/api/routes.py says which
URL reaches which)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Response, current_app, g, has_app_context, request
from marshmallow import ValidationError as MarshmallowError

from vmapi.api.actions import Action
from vmapi.api.resource import ADMIN_ONLY, ALL_ROLES, ResourceApi, principal
from vmapi.auth import Principal, require_role
from vmapi.config import DEFAULTS
from vmapi.error_ids import READ
from vmapi.errors import ValidationError
from vmapi.representations import JSON, MSGPACK_TYPES, success_response
from vmapi.schemas.base import Int
from vmapi.schemas.console import ConsoleLogSchema, ConsoleSchema
from vmapi.schemas.image import ImageSchema, SaveImageSchema
from vmapi.schemas.vm import MigrateSchema, VmDeleteOptions, VmSchema, VmUpdateOptions
from vmapi.services.consoles import sessions
from vmapi.services.consoles.log import DEFAULT_BYTES, read_console_log
from vmapi.services.crud import ListParams
from vmapi.services.images import saving
from vmapi.services.moves import migrate
from vmapi.services.vms.reads import get_vm_answer, list_vm_answers
from vmapi.services.vms.service import VmService

TEXT = "text/plain"
#: answered with the text/plain form: whether older output exists before the text
TRUNCATED_HEADER = "X-Console-Log-Truncated"

#: POST /vm/<id>/console: a VNC console through the proxy, for CONSOLE_TTL seconds
CONSOLE = Action(
    sessions.open_console,
    ConsoleSchema,
    status=201,
    summary="A VNC console of one running vm: URL, token and display password, until "
    "expires_at. The token and password are in this answer only.",
    context=lambda: {"base_url": public_base_url()},
)


def public_base_url() -> str:
    """The API's URL as its users reach it: PUBLIC_URL when configured (the request's
    Host header then plays no part), else the URL this request was sent to."""
    return current_app.config["PUBLIC_URL"] or request.host_url


#: POST /vm/<id>/migrate: move it to another node (admins only)
MIGRATE = Action(
    migrate.migrate_vm,
    VmSchema,
    summary="Move one vm to another node (admins only): live when it runs or is paused, "
    "cold when it is shut off; the answer is the vm on its new node.",
    body=MigrateSchema,
    roles=ADMIN_ONLY,
)


#: POST /vm/<id>/image: an image of its root disk as it is now
SAVE = Action(
    saving.save_vm,
    ImageSchema,
    status=201,
    summary="Save one vm's root disk as a new image (kind snapshot, owned by the vm's "
    "customer): flattened, standalone; a running vm is copied live without pausing it, "
    "its disk chain as before; the message says how consistent the copy is.",
    body=SaveImageSchema,
)


def save_vm_image(ident: int) -> Response:
    """``POST /vm/<id>/image``: the VM's root disk saved as an image (:data:`SAVE`)."""
    return vm.run_action("image", ident)


def create_vm() -> Response:
    """``POST /vm``: one VM or an array (all or nothing), each placed on a node by the
    scheduler and defined there; a repeated Idempotency-Key answers the first answer."""
    return vm.create_view()


def reboot_vm(ident: int) -> Response:
    """``POST /vm/<id>/reboot``: the VM restarted on its node; answers the VM."""
    return vm.run_action("reboot", ident)


def open_console(ident: int) -> Response:
    """``POST /vm/<id>/console``: a VNC console through the proxy (:data:`CONSOLE`)."""
    return vm.run_action("console", ident)


def migrate_vm(ident: int) -> Response:
    """``POST /vm/<id>/migrate``: the VM moved to another node, admins only
    (:data:`MIGRATE`)."""
    return vm.run_action("migrate", ident)


def console_log(ident: int) -> Response:
    """``GET /vm/<id>/console_log``: the end of the serial console log, as JSON or (on
    Accept: text/plain) as the text itself."""
    g.resource_name = vm.name
    who = principal()
    require_role(who, vm.read_roles, f"read {vm.name}")
    unknown = [key for key in request.args if key != "bytes"]
    if unknown:
        raise ValidationError(data={key: ["Unknown query parameter."] for key in unknown})
    size = None
    if "bytes" in request.args:
        try:
            size = Int().parse_query(request.args["bytes"])
        except MarshmallowError as exc:
            raise ValidationError(data={"bytes": exc.messages}) from exc
    found = read_console_log(ident, who, size)
    offered = [JSON, *MSGPACK_TYPES, "text/html", TEXT]
    if request.accept_mimetypes.best_match(offered, default=JSON) == TEXT:
        response = Response(found.text, mimetype=TEXT)
        response.headers[TRUNCATED_HEADER] = "true" if found.truncated else "false"
        response.headers["Vary"] = "Accept"
        return response
    return success_response(ConsoleLogSchema().dump(found))


class VmApi(ResourceApi):
    """The VM's reads answered without the ORM, and the console log's OpenAPI entry."""

    def read_one(self, ident: int, who: Principal, nest: list[str]) -> dict[str, Any]:
        if nest:
            return super().read_one(ident, who, nest)
        return get_vm_answer(self.service, ident, who)  # one Core SELECT, no ORM, no schema

    def read_page(self, who: Principal, params: ListParams) -> tuple[dict[str, Any], bool]:
        if params.nest:
            return super().read_page(who, params)
        return list_vm_answers(self.service, who, params)

    def extra_paths(self, success: Callable, errors: Callable) -> dict[str, dict[str, Any]]:
        ident = {"name": "ident", "in": "path", "required": True,
                 "schema": {"type": "integer", "minimum": 1, "format": "int64"}}  # fmt: skip
        # the document is built with an app's configuration (document_for), else defaults
        limit = current_app.config if has_app_context() else {}
        limit = int(limit.get("CONSOLE_LOG_MAX", DEFAULTS["CONSOLE_LOG_MAX"][0]))
        size = {"name": "bytes", "in": "query", "required": False,
                "description": f"How many bytes from the end (default {DEFAULT_BYTES}, at "
                "most VMAPI_CONSOLE_LOG_MAX).",
                "schema": {"type": "integer", "minimum": 1, "maximum": limit}}  # fmt: skip
        answer = {
            "type": "object",
            "required": ["text", "truncated"],
            "properties": {
                "text": {"type": "string", "description": "The log's end, as UTF-8 text."},
                "truncated": {"type": "boolean",
                              "description": "Older output exists before text."},
            },
        }  # fmt: skip
        ok = success(answer, "The end of the serial console log.")
        ok["content"][TEXT] = {"schema": {"type": "string"}}
        return {
            f"/api/v1/{self.name}/{{ident}}/console_log": {
                "get": {
                    "tags": [self.name],
                    "summary": "The end of the vm's serial console log, read through its "
                    "node's libvirt (text/plain on Accept: text/plain).",
                    "parameters": [ident, size],
                    "responses": {"200": ok, **errors(self.name, READ)},
                }
            }
        }


vm = VmApi(
    "vm",
    VmSchema,
    VmService(),
    read_roles=ALL_ROLES,
    write_roles=ALL_ROLES,
    summary="Virtual machines, created and changed on their node through libvirt.",
    update_options=VmUpdateOptions,
    delete_options=VmDeleteOptions,
    actions={"reboot": "reboot", "console": CONSOLE, "migrate": MIGRATE, "image": SAVE},
    idempotent=True,
)
