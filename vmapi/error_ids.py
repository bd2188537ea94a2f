"""Every stable error id vmapi answers, in one registry (as OpenStack Placement's errors.py).

An error id (``area/what``) is part of the contract: once answered it keeps its meaning
and is never reused. Each is registered here once, as a constant, with its HTTP status, a
one-line meaning, and where it may be answered: which resources, on which operations.
The per-resource families (``<resource>/not_found``, ``/duplicate``, ``/in_use``,
``/protected``) are spelled out per resource in :data:`RESOURCE_FAMILIES`.

Code raises by constant (``Conflict(..., error_id=VM_BUSY)``) or family function
(``error_ids.not_found("vm")``), never by string literal. The OpenAPI document and the table in
docs/API.md are generated from here, and tests/unit/test_error_ids.py fails when code
answers an id this registry does not hold. ``python -m vmapi.error_table`` prints
the table; ``--write docs/API.md`` refreshes it there (:mod:`vmapi.error_table`).

This module imports nothing of the app: every layer may use it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# What a request on a resource can do (a GET of the collection lists, of an item reads;
# an action is POST /<resource>/<id>/<action>); the OpenAPI document has one per operation.
LIST, READ, CREATE, UPDATE, DELETE, ACTION = "list", "read", "create", "update", "delete", "action"
OPERATIONS = (LIST, READ, CREATE, UPDATE, DELETE, ACTION)
WRITES = frozenset({CREATE, UPDATE, DELETE, ACTION})
EVERY = frozenset(OPERATIONS)
#: Answered by no operation the document describes (a method the URL does not take, or
#: the default of an exception class that every raise replaces with a precise id).
NOWHERE: frozenset[str] = frozenset()
#: The key of :attr:`ErrorId.where` that means "a request on any resource".
ANY_RESOURCE = "*"


@dataclass(frozen=True)
class ErrorId:
    """One stable error id: its status, what it means, and where it may be answered."""

    id: str
    status: int
    meaning: str
    #: resource name (or :data:`ANY_RESOURCE`) -> the operations that may answer it
    where: Mapping[str, frozenset[str]]

    def answered_by(self, resource: str, operation: str) -> bool:
        return any(
            operation in ops for key, ops in self.where.items() if key in (resource, ANY_RESOURCE)
        )


@dataclass(frozen=True)
class Family:
    """An id every resource of :data:`RESOURCE_FAMILIES` that names it may answer."""

    what: str
    status: int
    meaning: str  # "{resource}" stands for the resource's name
    operations: frozenset[str]

    def of(self, resource: str) -> str:
        return f"{resource}/{self.what}"


REGISTRY: dict[str, ErrorId] = {}


def _register(
    error_id: str,
    status: int,
    meaning: str,
    where: Mapping[str, Iterable[str]] | None = None,
) -> str:
    if error_id in REGISTRY:
        raise ValueError(f"error id {error_id} is registered twice")
    spots = {ANY_RESOURCE: EVERY} if where is None else where
    frozen = {key: frozenset(ops) for key, ops in spots.items()}
    REGISTRY[error_id] = ErrorId(error_id, status, meaning, frozen)
    return error_id


# ---------------------------------------------------------------------- general
# One id a statement: name, status, meaning, and where it is answered (default: every
# request on any resource). Laid out by hand as a table.
# fmt: off
GENERAL_VALIDATION = _register("general/validation", 400,
    "The request is invalid; data maps each bad field or parameter to its messages.")
GENERAL_MALFORMED_BODY = _register("general/malformed_body", 400,
    "The body does not parse as JSON or MessagePack, or holds what JSON cannot.",
    {ANY_RESOURCE: WRITES})
GENERAL_BAD_REQUEST = _register("general/bad_request", 400,
    "The web server could not read the request (e.g. the body broke off).", {ANY_RESOURCE: WRITES})
GENERAL_VERSION_MALFORMED = _register("general/version/malformed", 400,
    "The version in the URL is not vX, vX.Y or vX.Y.Z.")
GENERAL_AUTHENTICATION_REQUIRED = _register("general/authentication/required", 401,
    "No token: send 'Authorization: Bearer' and the token.")
GENERAL_AUTHENTICATION_FAILED = _register("general/authentication/failed", 401,
    "The token is unknown, revoked or expired.")
GENERAL_AUTHORIZATION_FORBIDDEN = _register("general/authorization/forbidden", 403,
    "The token's role may not do this.")
GENERAL_NOT_FOUND = _register("general/not_found", 404,
    "No such route: an unknown path, or an id that is not a positive 64-bit integer.")
GENERAL_VERSION_UNSUPPORTED = _register("general/version/unsupported", 404,
    "The API version in the URL is not served here.")
GENERAL_METHOD_NOT_ALLOWED = _register("general/method_not_allowed", 405,
    "The URL does not take this method; data.allowed and Allow name those it takes.",
    {ANY_RESOURCE: NOWHERE})
GENERAL_IDEMPOTENCY_CONFLICT = _register("general/idempotency_conflict", 409,
    "The Idempotency-Key was used for another request, or its first request is still running.",
    {"vm": {CREATE}, "storage": {CREATE}})
GENERAL_CONFLICT = _register("general/conflict", 409,
    "A conflict without a more precise id (the exception's default; none is answered today).",
    {ANY_RESOURCE: NOWHERE})
GENERAL_TOO_MANY_REQUESTS = _register("general/too_many_requests", 429,
    "The customer (through nginx: the token) has VMAPI_TRANSFERS_PER_CUSTOMER image transfers "
    "in flight; retry after Retry-After seconds.", {"image": {READ, UPDATE}})
GENERAL_BODY_TOO_LARGE = _register("general/body_too_large", 413,
    "The body is larger than the configured limit.", {ANY_RESOURCE: WRITES})
GENERAL_UNSUPPORTED_MEDIA_TYPE = _register("general/unsupported_media_type", 415,
    "The body is neither JSON nor MessagePack.", {ANY_RESOURCE: WRITES})
GENERAL_INTERNAL = _register("general/internal", 500,
    "An unexpected failure; data.request_id names it in the server log.")
GENERAL_HYPERVISOR_ERROR = _register("general/hypervisor_error", 502,
    "A hypervisor failed (the exception's default; answers say vm/hypervisor_error).",
    {ANY_RESOURCE: NOWHERE})
GENERAL_UNAVAILABLE = _register("general/unavailable", 503,
    "The database did not answer, or the API host cannot read what the request needs (an "
    "rbd storage type's Ceph key: data.step says so); the request was undone, retry (the "
    "database's: after Retry-After seconds).")
GENERAL_HYPERVISOR_TIMEOUT = _register("general/hypervisor_timeout", 504,
    "A hypervisor did not answer (the exception's default; answers say vm/hypervisor_timeout).",
    {ANY_RESOURCE: NOWHERE})

# ---------------------------------------------------------------------- vm
#: Changes of a VM: its own, and those of its disks and interface, which take its lock and
#: redefine its domain.
_VM_CHANGES = {"vm": {UPDATE, DELETE, ACTION}, "storage": WRITES,
               "interface": {UPDATE}}
VM_IMMUTABLE_FIELD = _register("vm/immutable_field", 400,
    "A field that cannot change after the VM is made.", {"vm": {UPDATE}})
VM_STATE_NOT_SETTABLE = _register("vm/state_not_settable", 400,
    "Only running, shutoff and paused can be set as vm_state.", {"vm": {UPDATE}})
VM_QUOTA_EXCEEDED = _register("vm/quota_exceeded", 403,
    "The customer's quota of VMs, cores, RAM or storage (a root disk) would be passed; "
    "data says which.",
    {"vm": {CREATE, UPDATE, ACTION}})
VM_NODE_NOT_FOUND = _register("vm/node_not_found", 404,
    "The node the body names does not exist.", {"vm": {CREATE, ACTION}})
VM_IMAGE_NOT_FOUND = _register("vm/image_not_found", 404,
    "The image the body names does not exist, or the VM's owner may not boot from it.",
    {"vm": {CREATE, ACTION}})
VM_NO_VALID_HOST = _register("vm/no_valid_host", 409,
    "No node can take the VM; data.removed_by_filter says why.", {"vm": {CREATE, ACTION}})
VM_NODE_UNSUITABLE = _register("vm/node_unsuitable", 409,
    "The chosen node cannot take the VM (data.reasons), or the VM's own lacks the room to "
    "grow.", {"vm": {CREATE, UPDATE, ACTION}})
VM_UUID_CONFLICT = _register("vm/uuid_conflict", 409,
    "The node already holds a domain with this UUID.", {"vm": {CREATE}})
VM_STATE_CONFLICT = _register("vm/state_conflict", 409,
    "The VM's present state does not allow this change.", {"vm": {UPDATE, ACTION}})
VM_NO_FREE_IPV4 = _register("vm/no_free_ipv4", 409,
    "No free IPv4 address is left; add some with POST /ipv4.", {"vm": {CREATE}})
VM_NO_FREE_IPV6 = _register("vm/no_free_ipv6", 409,
    "No free IPv6 address is left; add a pool with POST /ipv6.", {"vm": {CREATE}})
VM_NO_FREE_MAC = _register("vm/no_free_mac", 409,
    "No unused MAC address was found; retry.", {"vm": {CREATE}})
VM_NO_GUEST_AGENT = _register("vm/no_guest_agent", 409,
    "quiesce was asked, but no guest agent answers in the VM; save without quiesce (a "
    "crash-consistent copy) or start the agent in the guest.",
    {"vm": {ACTION}, "storage": {ACTION}})
VM_NO_ROOT_DISK = _register("vm/no_root_disk", 409,
    "The VM was made without an image: it has no root disk to save or rebuild.",
    {"vm": {ACTION}})
VM_NO_CONSOLE = _register("vm/no_console", 409,
    "The VM's domain has no console display yet (it gets one when next defined and "
    "started).", {"vm": {ACTION}})
VM_NO_CONSOLE_LOG = _register("vm/no_console_log", 409,
    "The VM's domain has no console log yet (it gets one when it is next defined).",
    {"vm": {READ}})
VM_NAME_TAKEN = _register("vm/name_taken", 409,
    "Something this database does not own has the name of the domain (or of its cloud-init "
    "seed volume) on the node; see `flask vmapi reconcile`.",
    {"vm": {CREATE, UPDATE, ACTION}, "interface": {UPDATE}})
VM_HAS_STORAGE = _register("vm/has_storage", 409,
    "The VM still has storage; delete it or send ?cascade=storage.", {"vm": {DELETE}})
VM_BUSY = _register("vm/busy", 409,
    "Another operation on the VM held it past VMAPI_VM_LOCK_TIMEOUT; retry.", _VM_CHANGES)
VM_HYPERVISOR_ERROR = _register("vm/hypervisor_error", 502,
    "The VM's hypervisor failed; the message has libvirt's, and the request was undone.",
    {**_VM_CHANGES, "vm": WRITES})
VM_DISK_LEASED = _register("vm/disk_leased", 409,
    "The node's lock manager refused a disk of the VM: another host holds its lease (its "
    "QEMU has the disk open). Nothing ran; the request was undone.",
    {"vm": {UPDATE, ACTION}})
VM_HYPERVISOR_TIMEOUT = _register("vm/hypervisor_timeout", 504,
    "The VM's hypervisor did not answer within VMAPI_LIBVIRT_TIMEOUT; the request was undone.",
    {**_VM_CHANGES, "vm": WRITES})

# ---------------------------------------------------------------------- storage
STORAGE_SHRINK_FORBIDDEN = _register("storage/shrink_forbidden", 400,
    "Volumes only grow.", {"storage": {UPDATE}})
STORAGE_QUOTA_EXCEEDED = _register("storage/quota_exceeded", 403,
    "The customer's storage quota would be passed.", {"storage": {CREATE, UPDATE}})
STORAGE_NAME_TAKEN = _register("storage/name_taken", 409,
    "Something this database does not own has the volume's name in the pool; see "
    "`flask vmapi reconcile`.", {"storage": {CREATE}})
STORAGE_NODE_MISMATCH = _register("storage/node_mismatch", 409,
    "Volumes move only between VMs of one node.", {"storage": {UPDATE}})
STORAGE_NO_FREE_TARGET = _register("storage/no_free_target", 409,
    "The VM has no free disk device name left.", {"storage": {CREATE, UPDATE}})
STORAGE_ROOT_DISK = _register("storage/root_disk", 409,
    "A VM's root disk may grow, but never moves to another VM or goes on its own (it goes "
    "with its VM).", {"storage": {UPDATE, DELETE}})
STORAGE_DETACH_FAILED = _register("storage/detach_failed", 409,
    "The running guest did not release the disk in time; shut the VM off and retry.",
    {"storage": {UPDATE, DELETE}})

# ---------------------------------------------------------------------- images
# PUT /image/<id>/file changes the image (an update); GET of the file reads it.
IMAGE_INVALID = _register("image/invalid", 400,
    "The uploaded file was refused (format, backing file, size or checksum, or it broke off or "
    "arrived below VMAPI_TRANSFER_MIN_RATE); the message says why, and nothing was kept.",
    {"image": {UPDATE}})
IMAGE_IMMUTABLE_FIELD = _register("image/immutable_field", 400,
    "A field of an image that cannot change once it is set.", {"image": {UPDATE}})
IMAGE_QUOTA_EXCEEDED = _register("image/quota_exceeded", 403,
    "A customer's own image would pass the storage quota (an upload, or an image saved from a "
    "VM's or a volume's disk).", {"image": {UPDATE}, "vm": {ACTION}, "storage": {ACTION}})
IMAGE_IMMUTABLE = _register("image/immutable", 409,
    "The image already has its file; a file never changes.", {"image": {UPDATE}})
IMAGE_BUSY = _register("image/busy", 409,
    "Another upload of the image's file is in progress (at most one at a time), or the image "
    "is being saved from a disk.",
    {"image": {UPDATE}})
IMAGE_NOT_ACTIVE = _register("image/not_active", 409,
    "The image has no accepted file yet.",
    {"image": {READ}, "vm": {CREATE, ACTION}, "storage": {CREATE}})

# ---------------------------------------------------------------------- interfaces
INTERFACE_ADDRESS_TAKEN = _register("interface/address_taken", 409,
    "An address the body gives the interface is held by another one; data names them.",
    {"interface": {UPDATE}})

# ---------------------------------------------------------------------- security groups
SECURITY_GROUP_QUOTA_EXCEEDED = _register("security_group/quota_exceeded", 403,
    "The customer's quota of security groups or of their rules would be passed; data says "
    "which.", {"security_group": {CREATE}, "security_group_rule": {CREATE}})
# (also the not_found of the security_group family; registered here for where else it is
# answered: a body that gives an interface groups its owner may not use)
SECURITY_GROUP_NOT_FOUND = _register("security_group/not_found", 404,
    "A security group the body names does not exist, or is neither the owner's nor an "
    "admin group.", {"vm": {CREATE}, "interface": {UPDATE}})

# ---------------------------------------------------------------------- nodes, addresses
NODE_UNREACHABLE = _register("node/unreachable", 409,
    "The node's libvirt could not be asked for its capacity; give cores and ram.",
    {"node": {CREATE, UPDATE}})
NODE_UNSAFE_URI = _register("node/unsafe_uri", 409,
    "The node's stored libvirt_uri or migration_uri is not one vmapi may open (stored before "
    "the rules, or the configuration changed): nothing was connected; UPDATE the node's URI.",
    {**_VM_CHANGES, "vm": WRITES, "node": {UPDATE}})
IPV4_OVERLAP = _register("ipv4/overlap", 409,
    "The network overlaps addresses already registered.", {"ipv4": {CREATE}})
IPV6_OVERLAP = _register("ipv6/overlap", 409,
    "The address lies in a pool, which hands it out itself.", {"ipv6": {CREATE}})
IPV6_POOL_OVERLAP = _register("ipv6_pool/overlap", 409,
    "The network overlaps a pool or addresses added one by one.", {"ipv6_pool": {CREATE}})

# ---------------------------------------------------------------------- families
NOT_FOUND = Family("not_found", 404,
    "No {resource} with this id (or none the token may see).",
    frozenset({READ, UPDATE, DELETE, ACTION}))
DUPLICATE = Family("duplicate", 409,
    "Another {resource} holds these unique values; data names it.",
    frozenset({CREATE, UPDATE}))
IN_USE = Family("in_use", 409,
    "Rows still reference the {resource}, or one it references changed meanwhile; data "
    "lists them.",
    frozenset({CREATE, UPDATE, DELETE}))
PROTECTED = Family("protected", 409,
    "A seeded {resource}: it cannot be deleted and its name cannot change.",
    frozenset({UPDATE, DELETE}))
# fmt: on
FAMILIES = (NOT_FOUND, DUPLICATE, IN_USE, PROTECTED)

_CATALOG = (NOT_FOUND, DUPLICATE, IN_USE, PROTECTED)  # seeded rows, unique names, referenced
_CRUD = (NOT_FOUND, DUPLICATE, IN_USE)  # unique columns, foreign keys
#: Every resource and the families its service answers. vm and storage write through
#: their own use cases (no generic unique or reference checks: they answer precise ids).
RESOURCE_FAMILIES: dict[str, tuple[Family, ...]] = {
    "node_state": _CATALOG,
    "vm_state": _CATALOG,
    "virt_method": _CATALOG,
    "storage_type": _CATALOG,
    "cache_option": _CATALOG,
    "node": _CRUD,
    "virt_node": _CRUD,
    "vm": (NOT_FOUND,),
    "interface": (NOT_FOUND, IN_USE),  # only its vlan changes: nothing unique to clash
    "ipv4": _CRUD,
    "ipv6": _CRUD,
    "ipv6_pool": _CRUD,
    "vlan": _CRUD,
    "storage": (NOT_FOUND,),
    "image": (NOT_FOUND, IN_USE),  # in use while VMs boot from it
    "quota": (NOT_FOUND, DUPLICATE),  # referenced by nothing, references nothing
    "security_group": (NOT_FOUND, DUPLICATE, IN_USE),  # in use while interfaces use it
    "security_group_rule": (NOT_FOUND, IN_USE),  # its group deleted meanwhile
    "server_group": (NOT_FOUND, IN_USE),  # in use while it has VMs; names need not be unique
    "event": (NOT_FOUND,),  # read-only
}
#: A create on the key may create the value too, answering its create errors
#: (POST /virt_node with a whole node; POST /ipv6 with a network registers a pool).
CREATES_ALSO = {"virt_node": "node", "ipv6": "ipv6_pool"}


def not_found(resource: str) -> str:
    return NOT_FOUND.of(resource)


def duplicate(resource: str) -> str:
    return DUPLICATE.of(resource)


def in_use(resource: str) -> str:
    return IN_USE.of(resource)


def protected(resource: str) -> str:
    return PROTECTED.of(resource)


# Werkzeug's HTTP errors that have no id of their own (none is expected: routing,
# methods and body limits have theirs) answer general/http_<status>.
HTTP_FALLBACK = "general/http_<status>"
_HTTP_FALLBACK = re.compile(r"^general/http_[1-5][0-9][0-9]$")


def http_fallback(status: int) -> str:
    return f"general/http_{status}"


# ---------------------------------------------------------------------- questions
def answered_by(resource: str, operation: str) -> list[tuple[str, int, str]]:
    """``(id, status, meaning)`` of every id an operation on ``resource`` may answer,
    ordered by status then id (the OpenAPI document lists exactly these)."""
    found: dict[str, tuple[str, int, str]] = {}
    for name in (resource, CREATES_ALSO.get(resource) if operation == CREATE else None):
        if name is None:
            continue
        for entry in REGISTRY.values():
            if entry.answered_by(name, operation):
                found[entry.id] = (entry.id, entry.status, entry.meaning)
        for family in RESOURCE_FAMILIES.get(name, ()):
            if operation in family.operations:
                meaning = family.meaning.format(resource=name)
                found[family.of(name)] = (family.of(name), family.status, meaning)
    return sorted(found.values(), key=lambda item: (item[1], item[0]))


def holds(error_id: str) -> bool:
    """Whether ``error_id`` is one this registry holds (a constant or a family member)."""
    if error_id in REGISTRY or _HTTP_FALLBACK.match(error_id):
        return True
    resource, _, what = error_id.rpartition("/")
    return any(f.what == what for f in RESOURCE_FAMILIES.get(resource, ()))


def status_of(error_id: str) -> int:
    """The HTTP status ``error_id`` is answered with."""
    if error_id in REGISTRY:
        return REGISTRY[error_id].status
    if _HTTP_FALLBACK.match(error_id):
        return int(error_id.rsplit("_", 1)[1])
    what = error_id.rpartition("/")[2]
    return next(f.status for f in FAMILIES if f.what == what)
