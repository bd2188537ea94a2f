"""A VM's domain on its host: reaching it, recording what it reports, removing it.

Shared by the VM use cases and reconcile (undo is :mod:`vmapi.services.undo`).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from sqlalchemy import select, update

from vmapi.error_ids import (
    VM_DISK_LEASED,
    VM_HYPERVISOR_ERROR,
    VM_HYPERVISOR_TIMEOUT,
    VM_NAME_TAKEN,
)
from vmapi.errors import ApiError, Conflict, HypervisorFailure, HypervisorTimedOut
from vmapi.extensions import db
from vmapi.hypervisor import (
    DiskLeased,
    DomainInfo,
    DomainNotFound,
    HypervisorError,
    HypervisorTimeout,
    HypervisorUnavailable,
)
from vmapi.models import Node, Vm, VmState
from vmapi.node_detail import NODE_DETAIL
from vmapi.scheduler import release
from vmapi.services.network.allocation import release_interfaces
from vmapi.services.nodes.hosts import Host, hypervisor

log = logging.getLogger(__name__)

BUILDING = "building"


_STATE_IDS: dict[tuple[str, str], int] = {}


def state_id(name: str) -> int:
    """The id of a seeded vm_state. Seeded rows can be neither deleted nor renamed, so
    the answer is cached per database (it was a query twice per create)."""
    key = (str(db.engine.url), name)
    if key not in _STATE_IDS:
        _STATE_IDS[key] = db.session.scalars(select(VmState.id).where(VmState.name == name)).one()
    return _STATE_IDS[key]


def hypervisor_failure(exc: HypervisorError, step: str, host: Host) -> ApiError:
    """A hypervisor failure as the API answers it; marks the node down when unreachable."""
    data = {"step": step, "node": {"id": host.node.id}}
    if isinstance(exc, HypervisorUnavailable | HypervisorTimeout):
        note_host_failure(host.node.id)
    if isinstance(exc, DiskLeased):
        return Conflict(
            f"Node {host.node.fqdn}'s lock manager refused a disk while {step}: another host "
            f"holds its lease, so a QEMU there has it open ({exc.reason}). Nothing ran; the "
            "request was undone.",
            error_id=VM_DISK_LEASED,
            data=data,
        )
    if isinstance(exc, HypervisorTimeout):
        return HypervisorTimedOut(
            f"Node {host.node.fqdn} did not answer within {exc.timeout:g} s while "
            f"{step}; the request was undone.",
            error_id=VM_HYPERVISOR_TIMEOUT,
            data=data,
        )
    return HypervisorFailure(
        f"Node {host.node.fqdn} failed while {step}: {exc.reason}",
        error_id=VM_HYPERVISOR_ERROR,
        data=data,
    )


def name_taken(
    exc: HypervisorError,
    name: str,
    host: Host,
    what: str = "a domain",
    error_id: str = VM_NAME_TAKEN,
    done: str = "nothing was created",
) -> Conflict:
    """409 ``vm/name_taken`` (or ``storage/name_taken``): something this database does
    not own has the name on the host; reconcile lists what is in the way. The node's
    name and libvirt's text are in ``data.node_detail`` (admins only)."""
    return Conflict(
        f"The node already has {what} named {name} that this database does not own; "
        f"{done}. Run `flask vmapi reconcile` to see what is in the way, and remove or "
        "rename it.",
        error_id=error_id,
        data={"name": name, "node": {"id": host.node.id}, **node_detail(exc, host)},
    )


def node_detail(exc: HypervisorError, host: Host) -> dict[str, str]:
    """``data.node_detail`` of an error: the node's name and libvirt's text (admins only)."""
    return {NODE_DETAIL: f"node {host.node.fqdn}: {exc.reason}"}


def note_host_failure(node_id: int) -> None:
    """Remember that the node's libvirt failed, so the scheduler skips it for a while."""
    try:
        db.session.rollback()
        db.session.execute(
            update(Node).where(Node.id == node_id).values(libvirt_failed_at=datetime.now(UTC))
        )
        db.session.commit()
    except Exception:
        db.session.rollback()
        log.exception("could not record the failure of node %s", node_id)


def end_cooloff(node: Node) -> None:
    """The node's libvirt answered after the failure this session saw on its row: the
    scheduler may use it again now rather than when LIBVIRT_COOLOFF runs out. Only the
    failure seen is cleared (compare-and-set), never one another request noted since; no
    statement at all when the row shows none. The caller commits."""
    failed_at = node.libvirt_failed_at
    if failed_at is None:
        return
    db.session.execute(
        update(Node)
        .where(Node.id == node.id, Node.libvirt_failed_at == failed_at)
        .values(libvirt_failed_at=None)
    )


def remove_domain(host: Host, name: str) -> bool:
    """Destroy and undefine; False when there was no such domain."""
    driver = hypervisor()
    try:
        driver.destroy(host.uri, name)
        driver.undefine(host.uri, name)
    except DomainNotFound:
        return False
    return True


def forget(vm: Vm) -> None:
    """Release the VM's claim, addresses and interfaces and delete its row, in one
    transaction (only once its domain is gone). Its storage must be gone first
    (:func:`vmapi.services.storage.volumes.delete_vm_volumes`): a row with volumes left is
    refused by its foreign keys rather than leak them."""
    row = db.session.scalars(select(Vm).where(Vm.id == vm.id).with_for_update()).first()
    if row is None:
        return
    release(row.node_id, row.cores, row.ram)
    release_interfaces(row.id)
    db.session.delete(row)
    db.session.commit()


def record_state(vm: Vm, info: DomainInfo, commit: bool = True) -> None:
    """Store the state libvirt reported; its node answered, so any cool-off ends."""
    vm.vm_state_id = state_id(info.state)
    end_cooloff(db.session.get(Node, vm.node_id))  # loaded by Host.of: no query
    if commit:
        db.session.commit()
