"""Blueprint of /vm (admins and customers; customers see only their own VMs)."""

from flask import request

from vmapi.api.actions import Action
from vmapi.api.resource import ALL_ROLES, ResourceApi
from vmapi.schemas.console import ConsoleSchema
from vmapi.schemas.vm import VmDeleteOptions, VmSchema, VmUpdateOptions
from vmapi.services.consoles import open_console
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

vm = ResourceApi(
    "vm",
    VmSchema,
    VmService(),
    read_roles=ALL_ROLES,
    write_roles=ALL_ROLES,
    summary="Virtual machines, created and changed on their node through libvirt.",
    update_options=VmUpdateOptions,
    delete_options=VmDeleteOptions,
    actions={"reboot": "reboot", "console": console},
    idempotent=True,
)

APIS = [vm]
