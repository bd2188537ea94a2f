"""Every route of the API and its handler, in one table to read top to bottom.

A request finds its handler here: the table maps ``METHOD path`` to a function (a view
of its own for an operation of its own, such as :func:`~vmapi.api.vm.create_vm`) or to
one of the generic per-verb views of a resource's :class:`~vmapi.api.resource.ResourceApi`
(``node.create_view``: POST /node). The last column is who may call it, as the handler
checks it (``tests/api/test_routes.py`` holds the table to that). PATCH and UPDATE are
one operation: the rows with the same path and handler become one URL rule. The
endpoint shown by ``flask routes`` is ``<resource>.<handler>`` (``vm.create_vm``,
``node.create``): the resource of a generic view, the module of a function.

A method a URL does not take answers 405 with the error envelope (werkzeug joins the
methods of every rule of the URL; vmapi/api/errors.py writes the answer); HEAD comes with
GET, and OPTIONS is answered once per URL from the same methods.
"""

from __future__ import annotations

from collections.abc import Callable

from flask import Blueprint, Flask, Response

from vmapi.api.catalog import cache_option, node_state, storage_type, virt_method, vm_state
from vmapi.api.enc import node_enc
from vmapi.api.event import event
from vmapi.api.image import download_image_file, image, refusal_header, upload_image_file
from vmapi.api.meta import health, index, metrics, openapi
from vmapi.api.network import interface, ipv4, ipv6, ipv6_pool, vlan
from vmapi.api.node import node, virt_node
from vmapi.api.quota import quota
from vmapi.api.resource import ADMIN_ONLY, ALL_ROLES, ResourceApi
from vmapi.api.security_groups import security_group, security_group_rule
from vmapi.api.server_group import server_group
from vmapi.api.storage import save_storage_image, storage
from vmapi.api.vm import (
    console_log,
    create_vm,
    migrate_vm,
    open_console,
    reboot_vm,
    rebuild_vm,
    save_vm_image,
    vm,
)

#: who may call a route that needs no token
NO_TOKEN: frozenset[str] = frozenset()
#: the versioned API's prefix, before every path of :data:`API_ROUTES`
API_PREFIX = "/api/<api_version>"

Handler = Callable[..., Response]

#: Outside the versioned API.
ROUTES: tuple[tuple[str, Handler, frozenset[str]], ...] = (
    # method and path                     handler                         who may call it
    ("GET /health",                       health,                         NO_TOKEN),
    # (from a peer in METRICS_ALLOW, also without a token)
    ("GET /metrics",                      metrics,                        ADMIN_ONLY),
)  # fmt: skip

#: Under /api/<api_version>; ``<id:ident>`` is a positive id (vmapi/api/__init__.py).
API_ROUTES: tuple[tuple[str, Handler, frozenset[str]], ...] = (
    # method and path                     handler                         who may call it
    ("GET /openapi.json",                 openapi,                        NO_TOKEN),
    ("GET /",                             index,                          ALL_ROLES),
    # node_state
    ("GET /node_state",                   node_state.list_view,           ADMIN_ONLY),
    ("POST /node_state",                  node_state.create_view,         ADMIN_ONLY),
    ("PATCH /node_state",                 node_state.update_many_view,    ADMIN_ONLY),
    ("UPDATE /node_state",                node_state.update_many_view,    ADMIN_ONLY),
    ("DELETE /node_state",                node_state.delete_many_view,    ADMIN_ONLY),
    ("GET /node_state/<id:ident>",        node_state.read_view,           ADMIN_ONLY),
    ("PATCH /node_state/<id:ident>",      node_state.update_view,         ADMIN_ONLY),
    ("UPDATE /node_state/<id:ident>",     node_state.update_view,         ADMIN_ONLY),
    ("DELETE /node_state/<id:ident>",     node_state.delete_view,         ADMIN_ONLY),
    # vm_state
    ("GET /vm_state",                     vm_state.list_view,             ALL_ROLES),
    ("POST /vm_state",                    vm_state.create_view,           ADMIN_ONLY),
    ("PATCH /vm_state",                   vm_state.update_many_view,      ADMIN_ONLY),
    ("UPDATE /vm_state",                  vm_state.update_many_view,      ADMIN_ONLY),
    ("DELETE /vm_state",                  vm_state.delete_many_view,      ADMIN_ONLY),
    ("GET /vm_state/<id:ident>",          vm_state.read_view,             ALL_ROLES),
    ("PATCH /vm_state/<id:ident>",        vm_state.update_view,           ADMIN_ONLY),
    ("UPDATE /vm_state/<id:ident>",       vm_state.update_view,           ADMIN_ONLY),
    ("DELETE /vm_state/<id:ident>",       vm_state.delete_view,           ADMIN_ONLY),
    # virt_method
    ("GET /virt_method",                  virt_method.list_view,          ALL_ROLES),
    ("POST /virt_method",                 virt_method.create_view,        ADMIN_ONLY),
    ("PATCH /virt_method",                virt_method.update_many_view,   ADMIN_ONLY),
    ("UPDATE /virt_method",               virt_method.update_many_view,   ADMIN_ONLY),
    ("DELETE /virt_method",               virt_method.delete_many_view,   ADMIN_ONLY),
    ("GET /virt_method/<id:ident>",       virt_method.read_view,          ALL_ROLES),
    ("PATCH /virt_method/<id:ident>",     virt_method.update_view,        ADMIN_ONLY),
    ("UPDATE /virt_method/<id:ident>",    virt_method.update_view,        ADMIN_ONLY),
    ("DELETE /virt_method/<id:ident>",    virt_method.delete_view,        ADMIN_ONLY),
    # storage_type
    ("GET /storage_type",                 storage_type.list_view,         ALL_ROLES),
    ("POST /storage_type",                storage_type.create_view,       ADMIN_ONLY),
    ("PATCH /storage_type",               storage_type.update_many_view,  ADMIN_ONLY),
    ("UPDATE /storage_type",              storage_type.update_many_view,  ADMIN_ONLY),
    ("DELETE /storage_type",              storage_type.delete_many_view,  ADMIN_ONLY),
    ("GET /storage_type/<id:ident>",      storage_type.read_view,         ALL_ROLES),
    ("PATCH /storage_type/<id:ident>",    storage_type.update_view,       ADMIN_ONLY),
    ("UPDATE /storage_type/<id:ident>",   storage_type.update_view,       ADMIN_ONLY),
    ("DELETE /storage_type/<id:ident>",   storage_type.delete_view,       ADMIN_ONLY),
    # cache_option
    ("GET /cache_option",                 cache_option.list_view,         ALL_ROLES),
    ("POST /cache_option",                cache_option.create_view,       ADMIN_ONLY),
    ("PATCH /cache_option",               cache_option.update_many_view,  ADMIN_ONLY),
    ("UPDATE /cache_option",              cache_option.update_many_view,  ADMIN_ONLY),
    ("DELETE /cache_option",              cache_option.delete_many_view,  ADMIN_ONLY),
    ("GET /cache_option/<id:ident>",      cache_option.read_view,         ALL_ROLES),
    ("PATCH /cache_option/<id:ident>",    cache_option.update_view,       ADMIN_ONLY),
    ("UPDATE /cache_option/<id:ident>",   cache_option.update_view,       ADMIN_ONLY),
    ("DELETE /cache_option/<id:ident>",   cache_option.delete_view,       ADMIN_ONLY),
    # node
    ("GET /node",                         node.list_view,                 ADMIN_ONLY),
    ("POST /node",                        node.create_view,               ADMIN_ONLY),
    ("PATCH /node",                       node.update_many_view,          ADMIN_ONLY),
    ("UPDATE /node",                      node.update_many_view,          ADMIN_ONLY),
    ("DELETE /node",                      node.delete_many_view,          ADMIN_ONLY),
    ("GET /node/<id:ident>",              node.read_view,                 ADMIN_ONLY),
    ("PATCH /node/<id:ident>",            node.update_view,               ADMIN_ONLY),
    ("UPDATE /node/<id:ident>",           node.update_view,               ADMIN_ONLY),
    ("DELETE /node/<id:ident>",           node.delete_view,               ADMIN_ONLY),
    ("GET /node/<fqdn>/enc",              node_enc,                       ADMIN_ONLY),
    # virt_node
    ("GET /virt_node",                    virt_node.list_view,            ADMIN_ONLY),
    ("POST /virt_node",                   virt_node.create_view,          ADMIN_ONLY),
    ("PATCH /virt_node",                  virt_node.update_many_view,     ADMIN_ONLY),
    ("UPDATE /virt_node",                 virt_node.update_many_view,     ADMIN_ONLY),
    ("DELETE /virt_node",                 virt_node.delete_many_view,     ADMIN_ONLY),
    ("GET /virt_node/<id:ident>",         virt_node.read_view,            ADMIN_ONLY),
    ("PATCH /virt_node/<id:ident>",       virt_node.update_view,          ADMIN_ONLY),
    ("UPDATE /virt_node/<id:ident>",      virt_node.update_view,          ADMIN_ONLY),
    ("DELETE /virt_node/<id:ident>",      virt_node.delete_view,          ADMIN_ONLY),
    # vm
    ("GET /vm",                           vm.list_view,                   ALL_ROLES),
    ("POST /vm",                          create_vm,                      ALL_ROLES),
    ("PATCH /vm",                         vm.update_many_view,            ALL_ROLES),
    ("UPDATE /vm",                        vm.update_many_view,            ALL_ROLES),
    ("DELETE /vm",                        vm.delete_many_view,            ALL_ROLES),
    ("GET /vm/<id:ident>",                vm.read_view,                   ALL_ROLES),
    ("PATCH /vm/<id:ident>",              vm.update_view,                 ALL_ROLES),
    ("UPDATE /vm/<id:ident>",             vm.update_view,                 ALL_ROLES),
    ("DELETE /vm/<id:ident>",             vm.delete_view,                 ALL_ROLES),
    ("POST /vm/<id:ident>/reboot",        reboot_vm,                      ALL_ROLES),
    ("POST /vm/<id:ident>/console",       open_console,                   ALL_ROLES),
    ("POST /vm/<id:ident>/migrate",       migrate_vm,                     ADMIN_ONLY),
    ("POST /vm/<id:ident>/rebuild",       rebuild_vm,                     ALL_ROLES),
    ("POST /vm/<id:ident>/image",         save_vm_image,                  ALL_ROLES),
    ("GET /vm/<id:ident>/console_log",    console_log,                    ALL_ROLES),
    # interface
    ("GET /interface",                    interface.list_view,            ALL_ROLES),
    ("PATCH /interface",                  interface.update_many_view,     ALL_ROLES),
    ("UPDATE /interface",                 interface.update_many_view,     ALL_ROLES),
    ("GET /interface/<id:ident>",         interface.read_view,            ALL_ROLES),
    ("PATCH /interface/<id:ident>",       interface.update_view,          ALL_ROLES),
    ("UPDATE /interface/<id:ident>",      interface.update_view,          ALL_ROLES),
    # ipv4
    ("GET /ipv4",                         ipv4.list_view,                 ALL_ROLES),
    ("POST /ipv4",                        ipv4.create_view,               ADMIN_ONLY),
    ("PATCH /ipv4",                       ipv4.update_many_view,          ADMIN_ONLY),
    ("UPDATE /ipv4",                      ipv4.update_many_view,          ADMIN_ONLY),
    ("DELETE /ipv4",                      ipv4.delete_many_view,          ADMIN_ONLY),
    ("GET /ipv4/<id:ident>",              ipv4.read_view,                 ALL_ROLES),
    ("PATCH /ipv4/<id:ident>",            ipv4.update_view,               ADMIN_ONLY),
    ("UPDATE /ipv4/<id:ident>",           ipv4.update_view,               ADMIN_ONLY),
    ("DELETE /ipv4/<id:ident>",           ipv4.delete_view,               ADMIN_ONLY),
    # ipv6
    ("GET /ipv6",                         ipv6.list_view,                 ALL_ROLES),
    ("POST /ipv6",                        ipv6.create_view,               ADMIN_ONLY),
    ("PATCH /ipv6",                       ipv6.update_many_view,          ADMIN_ONLY),
    ("UPDATE /ipv6",                      ipv6.update_many_view,          ADMIN_ONLY),
    ("DELETE /ipv6",                      ipv6.delete_many_view,          ADMIN_ONLY),
    ("GET /ipv6/<id:ident>",              ipv6.read_view,                 ALL_ROLES),
    ("PATCH /ipv6/<id:ident>",            ipv6.update_view,               ADMIN_ONLY),
    ("UPDATE /ipv6/<id:ident>",           ipv6.update_view,               ADMIN_ONLY),
    ("DELETE /ipv6/<id:ident>",           ipv6.delete_view,               ADMIN_ONLY),
    # ipv6_pool
    ("GET /ipv6_pool",                    ipv6_pool.list_view,            ADMIN_ONLY),
    ("POST /ipv6_pool",                   ipv6_pool.create_view,          ADMIN_ONLY),
    ("PATCH /ipv6_pool",                  ipv6_pool.update_many_view,     ADMIN_ONLY),
    ("UPDATE /ipv6_pool",                 ipv6_pool.update_many_view,     ADMIN_ONLY),
    ("DELETE /ipv6_pool",                 ipv6_pool.delete_many_view,     ADMIN_ONLY),
    ("GET /ipv6_pool/<id:ident>",         ipv6_pool.read_view,            ADMIN_ONLY),
    ("PATCH /ipv6_pool/<id:ident>",       ipv6_pool.update_view,          ADMIN_ONLY),
    ("UPDATE /ipv6_pool/<id:ident>",      ipv6_pool.update_view,          ADMIN_ONLY),
    ("DELETE /ipv6_pool/<id:ident>",      ipv6_pool.delete_view,          ADMIN_ONLY),
    # vlan
    ("GET /vlan",                         vlan.list_view,                 ADMIN_ONLY),
    ("POST /vlan",                        vlan.create_view,               ADMIN_ONLY),
    ("PATCH /vlan",                       vlan.update_many_view,          ADMIN_ONLY),
    ("UPDATE /vlan",                      vlan.update_many_view,          ADMIN_ONLY),
    ("DELETE /vlan",                      vlan.delete_many_view,          ADMIN_ONLY),
    ("GET /vlan/<id:ident>",              vlan.read_view,                 ADMIN_ONLY),
    ("PATCH /vlan/<id:ident>",            vlan.update_view,               ADMIN_ONLY),
    ("UPDATE /vlan/<id:ident>",           vlan.update_view,               ADMIN_ONLY),
    ("DELETE /vlan/<id:ident>",           vlan.delete_view,               ADMIN_ONLY),
    # security_group
    ("GET /security_group",               security_group.list_view,       ALL_ROLES),
    ("POST /security_group",              security_group.create_view,     ALL_ROLES),
    ("PATCH /security_group",             security_group.update_many_view, ALL_ROLES),
    ("UPDATE /security_group",            security_group.update_many_view, ALL_ROLES),
    ("DELETE /security_group",            security_group.delete_many_view, ALL_ROLES),
    ("GET /security_group/<id:ident>",    security_group.read_view,       ALL_ROLES),
    ("PATCH /security_group/<id:ident>",  security_group.update_view,     ALL_ROLES),
    ("UPDATE /security_group/<id:ident>", security_group.update_view,     ALL_ROLES),
    ("DELETE /security_group/<id:ident>", security_group.delete_view,     ALL_ROLES),
    # security_group_rule
    ("GET /security_group_rule",          security_group_rule.list_view,  ALL_ROLES),
    ("POST /security_group_rule",         security_group_rule.create_view, ALL_ROLES),
    ("PATCH /security_group_rule",        security_group_rule.update_many_view, ALL_ROLES),
    ("UPDATE /security_group_rule",       security_group_rule.update_many_view, ALL_ROLES),
    ("DELETE /security_group_rule",       security_group_rule.delete_many_view, ALL_ROLES),
    ("GET /security_group_rule/<id:ident>", security_group_rule.read_view,  ALL_ROLES),
    ("PATCH /security_group_rule/<id:ident>", security_group_rule.update_view, ALL_ROLES),
    ("UPDATE /security_group_rule/<id:ident>", security_group_rule.update_view, ALL_ROLES),
    ("DELETE /security_group_rule/<id:ident>", security_group_rule.delete_view, ALL_ROLES),
    # server_group
    ("GET /server_group",                 server_group.list_view,         ALL_ROLES),
    ("POST /server_group",                server_group.create_view,       ALL_ROLES),
    ("PATCH /server_group",               server_group.update_many_view,  ALL_ROLES),
    ("UPDATE /server_group",              server_group.update_many_view,  ALL_ROLES),
    ("DELETE /server_group",              server_group.delete_many_view,  ALL_ROLES),
    ("GET /server_group/<id:ident>",      server_group.read_view,         ALL_ROLES),
    ("PATCH /server_group/<id:ident>",    server_group.update_view,       ALL_ROLES),
    ("UPDATE /server_group/<id:ident>",   server_group.update_view,       ALL_ROLES),
    ("DELETE /server_group/<id:ident>",   server_group.delete_view,       ALL_ROLES),
    # storage
    ("GET /storage",                      storage.list_view,              ALL_ROLES),
    ("POST /storage",                     storage.create_view,            ALL_ROLES),
    ("PATCH /storage",                    storage.update_many_view,       ALL_ROLES),
    ("UPDATE /storage",                   storage.update_many_view,       ALL_ROLES),
    ("DELETE /storage",                   storage.delete_many_view,       ALL_ROLES),
    ("GET /storage/<id:ident>",           storage.read_view,              ALL_ROLES),
    ("PATCH /storage/<id:ident>",         storage.update_view,            ALL_ROLES),
    ("UPDATE /storage/<id:ident>",        storage.update_view,            ALL_ROLES),
    ("DELETE /storage/<id:ident>",        storage.delete_view,            ALL_ROLES),
    ("POST /storage/<id:ident>/image",    save_storage_image,             ALL_ROLES),
    # quota
    ("GET /quota",                        quota.list_view,                ALL_ROLES),
    ("POST /quota",                       quota.create_view,              ADMIN_ONLY),
    ("PATCH /quota",                      quota.update_many_view,         ADMIN_ONLY),
    ("UPDATE /quota",                     quota.update_many_view,         ADMIN_ONLY),
    ("DELETE /quota",                     quota.delete_many_view,         ADMIN_ONLY),
    ("GET /quota/<id:ident>",             quota.read_view,                ALL_ROLES),
    ("PATCH /quota/<id:ident>",           quota.update_view,              ADMIN_ONLY),
    ("UPDATE /quota/<id:ident>",          quota.update_view,              ADMIN_ONLY),
    ("DELETE /quota/<id:ident>",          quota.delete_view,              ADMIN_ONLY),
    # event
    ("GET /event",                        event.list_view,                ALL_ROLES),
    ("GET /event/<id:ident>",             event.read_view,                ALL_ROLES),
    # image
    ("GET /image",                        image.list_view,                ALL_ROLES),
    ("POST /image",                       image.create_view,              ALL_ROLES),
    ("PATCH /image",                      image.update_many_view,         ALL_ROLES),
    ("UPDATE /image",                     image.update_many_view,         ALL_ROLES),
    ("DELETE /image",                     image.delete_many_view,         ALL_ROLES),
    ("GET /image/<id:ident>",             image.read_view,                ALL_ROLES),
    ("PATCH /image/<id:ident>",           image.update_view,              ALL_ROLES),
    ("UPDATE /image/<id:ident>",          image.update_view,              ALL_ROLES),
    ("DELETE /image/<id:ident>",          image.delete_view,              ALL_ROLES),
    ("GET /image/<id:ident>/file",        download_image_file,            ALL_ROLES),
    ("PUT /image/<id:ident>/file",        upload_image_file,              ALL_ROLES),
)  # fmt: skip

#: hooks run after every request of one resource's routes
AFTER_REQUEST = {image.name: [refusal_header]}  # nginx reads an upload check's refusal


def endpoint_of(handler: Handler) -> tuple[str, str]:
    """(blueprint, endpoint) of a handler: a generic view's resource and verb
    (``node``, ``create``), or a function's module and name (``vm``, ``create_vm``)."""
    owner = getattr(handler, "__self__", None)
    if isinstance(owner, ResourceApi):
        return owner.name, handler.__name__.removesuffix("_view")
    return handler.__module__.rsplit(".", 1)[1], handler.__name__


def url_rules() -> list[tuple[str, Handler, list[str]]]:
    """(rule, handler, methods) of every route, rows of one path and handler merged (PATCH
    and UPDATE), in the table's order."""
    merged: dict[tuple[str, Handler], list[str]] = {}
    for prefix, table in (("", ROUTES), (API_PREFIX, API_ROUTES)):
        for spec, handler, _roles in table:
            method, path = spec.split(" ", 1)
            merged.setdefault((prefix + path, handler), []).append(method)
    return [(rule, handler, methods) for (rule, handler), methods in merged.items()]


def register_routes(app: Flask) -> None:
    """Every route of the tables, in one blueprint per resource (and ``meta``, ``enc``)."""
    blueprints: dict[str, Blueprint] = {}
    answered_options: set[str] = set()
    for rule, handler, methods in url_rules():
        group, endpoint = endpoint_of(handler)
        if group not in blueprints:
            blueprints[group] = Blueprint(group, __name__)
            for hook in AFTER_REQUEST.get(group, []):
                blueprints[group].after_request(hook)
        # OPTIONS once per URL: Flask answers it with the methods of all the URL's rules
        first = rule not in answered_options
        blueprints[group].add_url_rule(
            rule,
            endpoint,
            handler,
            methods=[*methods, "OPTIONS"] if first else methods,
            provide_automatic_options=first,
        )
        answered_options.add(rule)
    for blueprint in blueprints.values():
        app.register_blueprint(blueprint)
