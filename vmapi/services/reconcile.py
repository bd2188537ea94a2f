"""Reconcile: compare every node's libvirt domains with the database, and repair safely.

Findings, one per domain or VM:
- ``unreachable``: the node's libvirt did not answer (nothing there can be checked).
- ``stale_building``: a VM still ``building`` after BUILD_TIMEOUT (its request died);
  fix: remove its domain if any, release its claim, delete the row.
- ``missing_domain``: a VM whose domain is not on its node; fix: state ``error``.
- ``state_drift``: the stored state differs from libvirt's; fix: store libvirt's.
- ``orphan_domain``: a domain with this installation's metadata whose VM row does not
  exist (the database never committed it, or lost it); fix: destroy and undefine.
- ``foreign_domain``: a ``vm-*`` domain without our metadata; reported, never touched.
Young ``building`` rows are skipped: their request may still be running.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from flask import current_app
from sqlalchemy import select

from vmapi.auth import as_utc
from vmapi.extensions import db
from vmapi.hypervisor import ERROR, DomainInfo, HypervisorError
from vmapi.models import Node, Vm, VmState
from vmapi.services.domains import BUILDING, Host, forget, remove_domain, state_id
from vmapi.services.hosts import hypervisor, on_hosts

log = logging.getLogger(__name__)


@dataclass
class Finding:
    kind: str
    node: str
    domain: str
    detail: str
    fixed: bool = False

    def line(self) -> str:
        status = "fixed" if self.fixed else "found"
        return f"{status:5}  {self.kind:15} {self.domain:12} on {self.node}: {self.detail}"


def reconcile(fix: bool, workers: int = 32) -> list[Finding]:
    findings: list[Finding] = []
    installation = current_app.config["INSTALLATION_ID"]
    stale_before = datetime.now(UTC) - timedelta(seconds=current_app.config["BUILD_TIMEOUT"])
    states = {row.id: row.name for row in db.session.scalars(select(VmState))}
    known_ids = set(db.session.scalars(select(Vm.id)))
    nodes = db.session.scalars(select(Node).order_by(Node.id)).all()
    hosts = {node.id: Host.of(node.id) for node in nodes}
    # Every node is asked at once (each call bounded by LIBVIRT_TIMEOUT): hung hosts cost
    # one timeout in all, not one each.
    listings = on_hosts({i: h.uri for i, h in hosts.items()}, hypervisor().domains, workers)
    for node in nodes:
        host = hosts[node.id]
        listing = listings[node.id]
        if isinstance(listing, HypervisorError):
            findings.append(Finding("unreachable", node.fqdn, "-", listing.reason))
            findings += _stale_on_unreachable(node.id, host, states, stale_before, fix)
            continue
        domains = {d.name: d for d in listing}
        vms = db.session.scalars(select(Vm).where(Vm.node_id == node.id).order_by(Vm.id)).all()
        for vm in vms:
            domain = domains.pop(vm.name, None)
            findings += _check_vm(vm, domain, states[vm.vm_state_id], host, stale_before, fix)
        for domain in domains.values():
            finding = _check_domain(domain, installation, known_ids, host, fix)
            if finding:
                findings.append(finding)
    return findings


def _stale_on_unreachable(
    node_id: int, host: Host, states: dict[int, str], stale_before: datetime, fix: bool
) -> list[Finding]:
    """Stale building rows on a node that does not answer: their requests never said
    success, so their claims and addresses go; a domain one of them made carries our
    metadata and is removed as an orphan once the node answers again."""
    found = []
    building = [vm_state for vm_state, name in states.items() if name == BUILDING]
    stmt = select(Vm).where(Vm.node_id == node_id, Vm.vm_state_id.in_(building))
    for vm in db.session.scalars(stmt.order_by(Vm.id)).all():
        if as_utc(vm.created_at) >= stale_before:
            continue
        finding = Finding("stale_building", host.node.fqdn, vm.name, "building, node unreachable")
        if fix:
            forget(vm)
            finding.fixed = True
            finding.detail += "; claim and addresses released, domain left for orphan cleanup"
        found.append(finding)
    return found


def _check_vm(
    vm: Vm, domain: DomainInfo | None, stored: str, host: Host, stale_before: datetime, fix: bool
) -> list[Finding]:
    fqdn = host.node.fqdn
    if stored == BUILDING:
        if as_utc(vm.created_at) >= stale_before:
            return []
        finding = Finding(
            "stale_building", fqdn, vm.name, f"building since {vm.created_at:%Y-%m-%d %H:%M:%S}"
        )
        if fix:
            if domain is not None:
                remove_domain(host, vm.name)
            forget(vm)
            finding.fixed = True
        return [finding]
    if domain is None:
        if stored == ERROR:
            return [Finding("missing_domain", fqdn, vm.name, "no domain; state is error")]
        finding = Finding("missing_domain", fqdn, vm.name, f"stored {stored}, no domain on host")
        if fix:
            vm.vm_state_id = state_id(ERROR)
            db.session.commit()
            finding.fixed = True
            finding.detail += "; state set to error"
        return [finding]
    if domain.state != stored:
        finding = Finding("state_drift", fqdn, vm.name, f"stored {stored}, libvirt {domain.state}")
        if fix:
            vm.vm_state_id = state_id(domain.state)
            db.session.commit()
            finding.fixed = True
        return [finding]
    return []


def _check_domain(
    domain: DomainInfo, installation: str, known_ids: set[int], host: Host, fix: bool
) -> Finding | None:
    fqdn = host.node.fqdn
    if domain.installation == installation and domain.vm_id is not None:
        if domain.vm_id in known_ids:
            return Finding(
                "misplaced", fqdn, domain.name, f"vm {domain.vm_id} is recorded on another node"
            )
        finding = Finding("orphan_domain", fqdn, domain.name, "our metadata, no VM row")
        if fix:
            remove_domain(host, domain.name)
            finding.fixed = True
            finding.detail += "; destroyed and undefined"
        return finding
    if domain.name.startswith("vm-"):
        return Finding(
            "foreign_domain", fqdn, domain.name, "no vmapi metadata of this installation"
        )
    return None
