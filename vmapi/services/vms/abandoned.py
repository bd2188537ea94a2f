"""A create whose request is gone: its ``building`` VM removed from its node and the
database — its volumes, domain, seed and console log, then its claim, addresses and
row. ``flask vmapi reconcile --fix`` does it for a VM building longer than
BUILD_TIMEOUT (``stale_building``); a retry that takes an Idempotency-Key over from a
dead request does it at once for the VMs that request committed as building (the key's
row names them, written in the same transaction), so the retry's VM is the only one.
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from vmapi.errors import ApiError
from vmapi.extensions import db
from vmapi.hypervisor import HypervisorError
from vmapi.models import Vm
from vmapi.services.consoles.log import delete_console_log
from vmapi.services.nodes.domains import BUILDING, forget, remove_domain, state_id
from vmapi.services.nodes.hosts import Host
from vmapi.services.storage.volumes import delete_vm_volumes
from vmapi.services.vms.cloud_init import delete_seed

log = logging.getLogger(__name__)


def remove_building(vm: Vm, host: Host, domain: bool = True) -> list[str]:
    """Remove the building VM (its domain only if ``domain``: it may be there); notes
    of what its node kept. Hypervisor errors (and 4xx/5xx of its steps) are the
    caller's, with the row still there."""
    notes = delete_vm_volumes(vm, host)
    if domain:
        remove_domain(host, vm.domain_name or vm.name)
    delete_seed(vm, host)
    notes += delete_console_log(vm, host)
    forget(vm)
    return notes


def remove_abandoned(vm_ids: list[int]) -> None:
    """Remove those of ``vm_ids`` that are still building (their request is gone); one
    whose node does not answer stays for reconcile."""
    stmt = select(Vm).where(Vm.id.in_(vm_ids), Vm.vm_state_id == state_id(BUILDING))
    for vm in db.session.scalars(stmt.order_by(Vm.id)).all():
        try:
            remove_building(vm, Host.of(vm.node_id))
            log.warning("vm-%s: building when its request died; removed", vm.id)
        except (ApiError, HypervisorError) as exc:
            db.session.rollback()
            log.warning("vm-%s: building when its request died; left for reconcile (%s)",
                        vm.id, getattr(exc, "message", exc))  # fmt: skip
