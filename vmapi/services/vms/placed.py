"""A new VM, placed: the steps of a create that a single create (:mod:`.create`) and an
array (:mod:`.arrays`) share, and the types they pass.

- :func:`place`: the first half, in the request's session: quota (and image), a node's
  capacity claimed, the row inserted as ``building`` with its interface (and root disk
  row); its undo goes on the stack;
- :func:`placed_spec`: the domain a placed VM is defined with (the one place both paths
  build it);
- :func:`finish`: the last step, the state its domain reports recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from flask import current_app
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.attributes import set_committed_value

from vmapi.error_ids import VM_NO_VALID_HOST, VM_UUID_CONFLICT
from vmapi.errors import Conflict
from vmapi.extensions import db
from vmapi.hypervisor import DomainInfo, DomainSpec
from vmapi.models import Node, Storage, VirtMethod, Vm
from vmapi.scheduler import (
    NoSuchGroup,
    NoValidHost,
    PlacementRequest,
    select_and_claim,
    unsuitable_reasons,
)
from vmapi.services.idempotency import commit_building, commit_made
from vmapi.services.names import domain_name
from vmapi.services.network.allocation import NewInterface, add_interface
from vmapi.services.network.filters import set_groups
from vmapi.services.nodes.domains import BUILDING, forget, record_state, state_id
from vmapi.services.nodes.hosts import Host
from vmapi.services.nodes.placement import claim_named, scheduler_defaults
from vmapi.services.quotas import check_vm_quota
from vmapi.services.undo import Undo
from vmapi.services.vms.boot import Boot, add_root_disk, check_image
from vmapi.services.vms.changes import ADMIN_FIELDS
from vmapi.services.vms.groups import missing
from vmapi.services.vms.rbd_boot import RbdClone
from vmapi.services.vms.specs import domain_spec, new_nic_specs
from vmapi.telemetry import PLACEMENT_SECONDS


@dataclass(frozen=True)
class NewVm:
    """A VM to create, checked: its fields, its virt_method row (read once; the domain is
    defined with it) and, when it boots from an image, that image and its root disk."""

    data: dict[str, Any]
    method: VirtMethod
    boot: Boot | None = None


@dataclass(frozen=True)
class Placed:
    """A new VM after the first half of its create: its row committed as building with
    its claim and interface (and its root disk's row), and its host."""

    vm: Vm
    host: Host
    interface: NewInterface  # with the addresses it holds: the domain's NICs come from it
    root: Storage | None = None


def claim_node(data: dict[str, Any], request: PlacementRequest) -> Node:
    """Claim capacity on the requested node, or on the node the scheduler picks; the
    node as the claim left it. A VM of a server group is placed holding the group's
    row lock (until the commit of its row); a group deleted since the create's checks is
    a 400 naming ``server_group``."""
    try:
        return _claim_node(data, request)
    except NoSuchGroup as exc:
        raise missing(exc.group_id) from exc


def _claim_node(data: dict[str, Any], request: PlacementRequest) -> Node:
    defaults = scheduler_defaults()
    node_id = data.get("node_id")
    if node_id is None:
        try:
            with PLACEMENT_SECONDS.time():
                weigher = current_app.config["SCHEDULER_WEIGHER"]
                return select_and_claim(request, defaults, weigher)
        except NoValidHost as exc:
            raise Conflict(
                "No node can take this VM; data.removed_by_filter says why.",
                error_id=VM_NO_VALID_HOST,
                data=exc.details,
            ) from exc
    reasons = unsuitable_reasons(node_id, request, defaults)
    if "uuid_free" in reasons:
        raise Conflict(
            f"Node {node_id} already holds a domain with UUID {request.uuid}.",
            error_id=VM_UUID_CONFLICT,
            data={"node": {"id": node_id}, "uuid": request.uuid},
        )
    return claim_named(node_id, request, defaults, "this VM", reasons)


def place(new: NewVm, undo: Undo, commit: bool = True, clone: RbdClone | None = None) -> Placed:
    """The first half of a create, in the request's session: check the quota (and the
    image), claim a node, insert the row as building with its interface (and root disk
    row: named by its ``clone`` when that was started already), commit; its undo (the
    claim, the row) goes on ``undo``. An array commits its elements together
    (``commit=False``): a failure rolls them all back."""
    data, boot = new.data, new.boot
    rbd_types = (boot.rbd_type_id,) if boot is not None and boot.rbd_type_id else ()
    request = PlacementRequest(data["cores"], data["ram"], data["virt_method_id"], data["uuid"],
                               image_id=data.get("image_id"), rbd_type_ids=rbd_types,
                               server_group_id=data.get("server_group_id"))  # fmt: skip
    root = None
    try:
        check_vm_quota(data.get("customer_id"), 1, data["cores"], data["ram"])
        if boot is not None:
            check_image(boot, data.get("customer_id"))
        node = claim_node(data, request)
        # the claimed row, still in the session (no query); a node whose stored URI
        # may not be opened fails here, before anything is written (409)
        host = Host.of(node.id)
        vm = Vm(
            cores=data["cores"],
            ram=data["ram"],
            customer_id=data.get("customer_id"),
            cputime_limit=data.get("cputime_limit"),
            **{key: data.get(key, default) for key, default in ADMIN_FIELDS.items()},
            hostname=data.get("hostname"),
            ssh_keys=data.get("ssh_keys", []),
            user_data=data.get("user_data"),
            uuid=data["uuid"],
            node_id=node.id,
            virt_method_id=data["virt_method_id"],
            vm_state_id=state_id(BUILDING),
            created_at=datetime.now(UTC),
            image_id=data.get("image_id"),
            server_group_id=data.get("server_group_id"),
        )
        db.session.add(vm)
        db.session.flush()
        # stored before the domain is made, so whatever happens next, the row names it
        vm.domain_name = domain_name(vm.id)
        vm.hostname = vm.hostname or vm.name
        made = add_interface(vm)
        if data.get("security_groups"):
            set_groups(made.row.id, data["security_groups"])
        if boot is not None:
            root = add_root_disk(vm, boot, clone)
        if commit:
            commit_building([vm.id])
    except IntegrityError as exc:  # a concurrent request took the UUID on that node
        db.session.rollback()
        raise Conflict(
            f"A VM with UUID {request.uuid} was placed on the same node concurrently.",
            error_id=VM_UUID_CONFLICT,
        ) from exc
    except BaseException:
        db.session.rollback()
        raise
    undo.push(f"forgetting vm-{vm.id}", lambda: forget(vm))
    return Placed(vm, host, made, root)


def placed_spec(new: NewVm, placed: Placed) -> DomainSpec:
    """The domain the placed VM is defined with: its one new interface, and its root disk
    (and seed) when it boots from an image. A new VM has no other storage: its disks are
    not read."""
    config = current_app.config
    vm, node = placed.vm, placed.host.node
    with db.session.no_autoflush:  # the log's path is written with the state, later
        nics = new_nic_specs([placed.interface], node, config)
        return domain_spec(vm, new.method, node, config, disks=placed.root is not None, nics=nics)


def finish(placed: Placed, info: DomainInfo, commit: bool = True) -> Vm:
    """The last step of a create: record the state its domain reports (commits, unless
    an array commits its elements together; under an Idempotency-Key the key's row
    names the VM in the same commit)."""
    record_state(placed.vm, info, commit=False)
    if commit:
        commit_made([placed.vm.id])
    # What the answer shows, known without reading it back: the one new interface.
    set_committed_value(placed.vm, "interfaces", [placed.interface.row])
    return placed.vm
