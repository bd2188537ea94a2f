"""Blueprint of /vm (admins and customers; customers see only their own VMs)."""

from flask import request

from vmapi.api.actions import Action
from vmapi.api.resource import ADMIN_ONLY, ALL_ROLES, ResourceApi
from vmapi.schemas.console import ConsoleSchema
from vmapi.schemas.vm import MigrateSchema, VmDeleteOptions, VmSchema, VmUpdateOptions
from vmapi.services.consoles import open_console
from vmapi.services.migrations import migrate_vm
from vmapi.services.vms import VmService

#: POST /vm/<id>/console: a VNC console through the proxy, for CONSOLE_TTL seconds
console = Action(
    open_console,
    ConsoleSchema,
    status=201,
    summary="A VNC console of one running vm: URL, token and display password, until "
    "expires_at. The token and password are in this answer only.",
    context=lambda: {"base_url": request.host_url},
)

#: POST /vm/<id>/migrate: move it to another node (admins only)
migrate = Action(
    migrate_vm,
    VmSchema,
    summary="Move one vm to another node (admins only): live when it runs or is paused, "
    "cold when it is shut off; the answer is the vm on its new node.",
    body=MigrateSchema,
    roles=ADMIN_ONLY,
)

vm = ResourceApi(
    "vm",
    VmSchema,
    VmService(),
    read_roles=ALL_ROLES,
    write_roles=ALL_ROLES,
    summary="Virtual machines, created and changed on their node through libvirt.",
    update_options=VmUpdateOptions,
    delete_options=VmDeleteOptions,
    actions={"reboot": "reboot", "console": console, "migrate": migrate},
    idempotent=True,
)

APIS = [vm]
