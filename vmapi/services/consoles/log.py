"""The serial console log of a VM, read through its node's libvirt connection.

Every domain vmapi defines from now on has its serial console logged by the node's log
daemon (virtlogd, which rotates the file by size: a few MiB per domain at most) into
``CONSOLE_LOG_POOL``, a directory pool vmapi owns on each node (made at
``CONSOLE_LOG_DIR`` when missing). The file is ``<domain name>.log``; the VM row records
its pool and path when the domain is first defined with it, and every later definition
keeps it. Because the file is in a pool, any libvirt connection reads it back as a
volume (:meth:`vmapi.hypervisor.HypervisorDriver.tail`): no ssh, no shared filesystem,
remote nodes as local ones. A VM defined before this has no log until it is next
defined (409 ``vm/no_console_log``). DELETE /vm removes the log.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flask import current_app

from vmapi.auth import Principal
from vmapi.error_ids import VM_NO_CONSOLE_LOG
from vmapi.errors import Conflict, ValidationError
from vmapi.extensions import db
from vmapi.hypervisor import HypervisorError, VolumeNotFound
from vmapi.models import Vm
from vmapi.models.leftover import LOG
from vmapi.node_detail import NodeNote
from vmapi.services.leftovers import Left
from vmapi.services.names import console_log_name
from vmapi.services.nodes.domains import hypervisor_failure
from vmapi.services.nodes.hosts import Host, hypervisor
from vmapi.services.undo import Undo
from vmapi.services.vms.rows import VmRows

log = logging.getLogger(__name__)

#: bytes answered when ``?bytes`` is not given
DEFAULT_BYTES = 65536


@dataclass(frozen=True)
class ConsoleLog:
    """The end of a console log: UTF-8 text (bytes that are not become U+FFFD), and
    whether older output exists before it."""

    text: str
    truncated: bool


def ensure_console_log(vm: Vm, host: Host, commit: bool = True) -> None:
    """Give the VM a console log before its domain is defined, if it has none: the log
    pool is made on its node when missing, and the row records the file. Called where a
    domain is (re)defined from the VM's row, before its spec is built. ``commit=False``
    leaves the row's change to the caller's next commit (a create records it with the
    domain's state, in the same statement)."""
    if vm.console_log_path is not None:
        return
    config = current_app.config
    pool = config["CONSOLE_LOG_POOL"]
    directory = hypervisor().pool_dir(host.uri, pool, config["CONSOLE_LOG_DIR"])
    vm.console_log_pool = pool
    vm.console_log_path = console_log_path(directory, vm.domain_name)
    if commit:
        db.session.commit()


def console_log_path(directory: str, domain: str) -> str:
    """Where the domain named ``domain`` logs, in the log pool's ``directory``."""
    return f"{directory.rstrip('/')}/{console_log_name(domain)}"


def push_log_remover(undo: Undo, vm: Vm, host: Host) -> None:
    """Push the undo step that removes the log the VM's domain may have started (the
    values are taken now: the row's may be rolled back before it runs)."""
    pool, volume = vm.console_log_pool, vm.console_log_volume

    def remove() -> None:
        if pool is not None and volume is not None:
            hypervisor().delete_log(host.uri, pool, volume)

    left = None if pool is None or volume is None else Left(host.node.id, LOG, volume, vm.id, pool)
    undo.push(f"removing the console log of vm-{vm.id} from node {host.node.fqdn}", remove, left)


def read_console_log(ident: int, principal: Principal, size: int | None) -> ConsoleLog:
    """The last ``size`` bytes (default 65536) of VM ``ident``'s console log (a
    customer's own VMs only)."""
    limit = int(current_app.config["CONSOLE_LOG_MAX"])
    wanted = DEFAULT_BYTES if size is None else size
    if not 1 <= wanted <= limit:
        raise ValidationError(data={"bytes": [f"Must be from 1 to {limit}."]})
    vm = VmRows().get(ident, principal)
    if vm.console_log_path is None or vm.console_log_pool is None:
        raise Conflict(
            f"vm-{vm.id} has no console log: its domain was defined before vmapi logged "
            "consoles. It gets one when it is next defined.",
            error_id=VM_NO_CONSOLE_LOG,
        )
    host = Host.of(vm.node_id)
    pool, volume = vm.console_log_pool, vm.console_log_volume
    db.session.rollback()  # nothing stays open while the node answers
    try:
        found = hypervisor().tail(host.uri, pool, volume, wanted)
    except VolumeNotFound:
        return ConsoleLog("", False)  # defined, not started yet: nothing written
    except HypervisorError as exc:
        raise hypervisor_failure(exc, "reading the console log", host) from exc
    return ConsoleLog(found.data.decode("utf-8", errors="replace"), found.truncated)


def delete_console_log(vm: Vm, host: Host) -> list[str]:
    """Remove the VM's log (its domain is gone); a note when the node kept it. A row that
    records none may still have one where a create that died had its domain write it:
    the conventional place is tried then."""
    pool = vm.console_log_pool or current_app.config["CONSOLE_LOG_POOL"]
    volume = vm.console_log_volume or (vm.domain_name and console_log_name(vm.domain_name))
    if not volume:
        return []
    try:
        hypervisor().delete_log(host.uri, pool, volume)
    except HypervisorError as exc:
        log.warning("could not delete the console log of vm-%s on %s: %s", vm.id,
                    host.node.fqdn, exc.reason)  # fmt: skip
        return [
            NodeNote(
                f"The console log of vm-{vm.id} could not be deleted on its node.",
                f"{vm.console_log_path} on {host.node.fqdn}: {exc.reason}",
            )
        ]
    return []
