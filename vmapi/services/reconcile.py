"""Reconcile: compare every node's libvirt domains and vmapi's volumes with the database,
and repair safely.

Findings, one per domain, VM or volume:
- ``unreachable``: the node's libvirt did not answer (nothing there can be checked).
- ``stale_building``: a VM still ``building`` after BUILD_TIMEOUT (its request died);
  fix: delete its volumes and their rows, remove its domain if any, release its claim,
  delete the row (a VM with volumes on a node that does not answer waits for it).
- ``missing_domain``: a VM whose domain is not on its node; fix: state ``error``.
- ``state_drift``: the stored state differs from libvirt's; fix: store libvirt's.
- ``orphan_domain``: a domain with this installation's metadata whose VM row does not
  exist (the database never committed it, or lost it); fix: destroy and undefine.
- ``foreign_domain``: a domain named like ours (``<installation>-vm-*``, or ``vm-*`` as
  before names carried the installation) without our metadata; reported, never touched.
- ``unowned_volume``: a volume in one of vmapi's pools (those its storage types, storage
  rows and image copies name) that no storage row, image copy or VM (its cloud-init seed)
  owns and no leftover lists: leaked, another installation's, a replaced seed that could
  not be deleted, or something in the way of a new volume's name (or an RBD root disk
  cloned before its create's claim committed, younger than BUILD_TIMEOUT: in flight, or
  its worker died then); reported, never touched.
  An rbd type's images are looked at in its Ceph pool through the API host's client
  (one ``rbd ls`` per Ceph pool, not a listing of each node's rbd pool): those named as
  this installation names things that no row owns are reported here too.
- ``abandoned_clone``: an RBD image of an rbd type's Ceph pool named exactly
  ``<installation>-storage-<N>``, a clone of one of the type's images, made more than
  BUILD_TIMEOUT ago, where no storage row has id N (nor the name) and no leftover lists
  it, and N is not above the storage id sequence's last value: a root disk cloned before
  its create's claim (services/vms/rbd_boot.py ``early_clone``) whose worker died, or
  whose claim's commit did not land, before the row was committed. Its id was taken
  from the sequence and is never handed out again: no row can own it. Fix: removed.
- ``missing_volume``: a storage row of an rbd type whose image is not in its Ceph pool
  (one ``rbd info`` per row, by the API host); reported, never touched.
- ``ceph_unreachable``: the API host cannot reach an rbd type's cluster, or cannot read
  its key: that pool's images were not looked at.
- ``stale_image_copy``: the copy of a deleted image that its node kept (it could not be
  reached when the image went); fix: delete the volume and its row.
- ``stale_image_rbd``: the RBD image of a deleted image that its Ceph pool kept (the
  cluster could not be reached then, or a save on RBD died); ``--fix`` removes it
- ``interrupted_move``: a VM whose move died part-way (its marker is set); fix: settle it
  by where libvirt says the domain is (recorded there, or undone), under the VM's lock.
- ``leftover``: a domain or volume listed as left on a node by a move or an evacuation,
  or by an undo step that failed (its detail names the step) (services/leftovers.py);
  fix: removed once the node answers (unless a row owns it there again). On a node that
  does not answer it waits.
- ``interrupted_rebuild``: the new volumes of a rebuild whose worker died (listed before
  they were made, never recorded; one still running holds the VM's lock and is not
  reported); fix: undone under the VM's lock (services/vms/rebuild_ledger.py).
- ``stale_save``: an image ``saving`` long after its save's time (its process died); fix:
  services/images/stale_saves.py (its copy, a listed leftover, then goes as one).
- ``misplaced``: a domain of ours whose VM is recorded on another node, neither a listed
  leftover nor an interrupted move; reported.
- ``filter_differs``: a network filter the node's VMs need that it lacks or holds
  otherwise (a change could not reach it, or someone changed it); ``unused_filter``: one
  of this installation's filters no VM of the node uses; fix: the node's filters are
  brought in line with the database (services/network/protection.py).
The volume findings (``unowned_volume``, ``abandoned_clone``, ``missing_volume``,
``ceph_unreachable``, ``stale_image_copy``) are made by services/reconcile_volumes.py.
Domains are matched with VMs by the name stored on the VM's row. Young ``building`` rows
and the listed copies of saves in flight are skipped: their requests may still run.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from flask import current_app
from sqlalchemy import select

from vmapi.auth import as_utc
from vmapi.errors import ApiError
from vmapi.extensions import db
from vmapi.hypervisor import ERROR, DomainInfo, HypervisorError
from vmapi.models import Leftover, Node, Storage, Vm, VmState
from vmapi.models.leftover import DOMAIN, VOLUME
from vmapi.services.findings import Finding
from vmapi.services.images.stale_saves import forget_stale, stale_images
from vmapi.services.leftovers import leftovers_on, remove_leftover, save_in_flight
from vmapi.services.locks import vm_locks
from vmapi.services.moves.books import settle
from vmapi.services.names import installation_id
from vmapi.services.network.protection import differences, sync_node
from vmapi.services.nodes.domains import BUILDING, forget, remove_domain, state_id
from vmapi.services.nodes.hosts import Host, hypervisor, on_hosts
from vmapi.services.reconcile_volumes import (
    rbd_volumes,
    stale_copies,
    stale_rbd_images,
    unowned_volumes,
)
from vmapi.services.vms.abandoned import remove_building
from vmapi.services.vms.rebuild_ledger import interrupted, unfinished

log = logging.getLogger(__name__)


def reconcile(fix: bool, workers: int = 32) -> list[Finding]:
    findings: list[Finding] = []
    installation = installation_id()
    stale_before = datetime.now(UTC) - timedelta(seconds=current_app.config["BUILD_TIMEOUT"])
    states = {row.id: row.name for row in db.session.scalars(select(VmState))}
    known_ids = set(db.session.scalars(select(Vm.id)))
    nodes = db.session.scalars(select(Node).order_by(Node.id)).all()
    hosts, unsafe = {}, {}
    for node in nodes:
        try:
            hosts[node.id] = Host.of(node.id)
        except ApiError as exc:  # a URI stored before the rules: never connected to
            unsafe[node.id] = f"{exc.error_id}: {exc.message}"
    # Every node is asked at once (each call bounded by LIBVIRT_TIMEOUT): hung hosts cost
    # one timeout in all, not one each.
    listings = on_hosts({i: h.uri for i, h in hosts.items()}, hypervisor().domains, workers)
    answering = {}
    moving = {vm.id: vm for vm in db.session.scalars(
        select(Vm).where(Vm.migration_node_id.is_not(None)).order_by(Vm.id))}  # fmt: skip
    listed = {(left.node_id, left.kind, left.pool, left.name) for left in
              db.session.scalars(select(Leftover))}  # fmt: skip
    for node in nodes:
        if node.id in unsafe:
            findings.append(Finding("unsafe_uri", node.fqdn, "-", unsafe[node.id]))
            continue
        host = hosts[node.id]
        listing = listings[node.id]
        if isinstance(listing, HypervisorError):
            findings.append(Finding("unreachable", node.fqdn, "-", listing.reason))
            findings += _stale_on_unreachable(node.id, host, states, stale_before, fix)
            continue
        answering[node.id] = host
        domains = {d.name: d for d in listing}
        vms = db.session.scalars(select(Vm).where(Vm.node_id == node.id).order_by(Vm.id)).all()
        for vm in vms:
            domain = domains.pop(vm.domain_name, None)
            if vm.id not in moving:  # (its domain may be on the way: settled below)
                findings += _check_vm(vm, domain, states[vm.vm_state_id], host, stale_before, fix)
        for domain in domains.values():
            expected = (node.id, DOMAIN, None, domain.name) in listed or any(
                vm.domain_name == domain.name and vm.migration_node_id == node.id
                for vm in moving.values()
            )
            finding = None if expected else _check_domain(domain, installation, known_ids, host,
                                                          fix)  # fmt: skip
            if finding:
                findings.append(finding)
    findings += [_check_move(vm, fix) for vm in moving.values()]
    findings += _stale_saves(fix)  # first: the copies of the saves it forgets are leftovers
    findings += _leftovers(nodes, answering, fix)
    findings += stale_copies(answering, fix)
    findings += stale_rbd_images(fix)
    findings += _filters(answering, fix)
    findings += unowned_volumes(answering, listed, workers)
    return findings + rbd_volumes(listed, workers, fix, stale_before)


def _filters(hosts: dict[int, Host], fix: bool) -> list[Finding]:
    """Each answering node's network filters against the database."""
    findings = []
    for host in hosts.values():
        try:
            stale, extra = differences(host)
        except HypervisorError as exc:
            findings.append(Finding("unreachable", host.node.fqdn, "-", f"filters: {exc.reason}"))
            continue
        found = [Finding("filter_differs", host.node.fqdn, name, "missing or not as the "
                         "database has it") for name in stale]  # fmt: skip
        found += [Finding("unused_filter", host.node.fqdn, name, "no VM of the node uses it")
                  for name in extra]  # fmt: skip
        if fix and (found or host.node.filters_pending):
            try:
                sync_node(host)
                host.node.filters_pending = False
                db.session.commit()
                for finding in found:
                    finding.fixed = True
            except HypervisorError as exc:
                db.session.rollback()
                for finding in found:
                    finding.detail += f"; not repaired: {exc.reason}"
        findings += found
    return findings


def _check_move(vm: Vm, fix: bool) -> Finding:
    """A move whose process died: settled under the VM's lock (a move still running holds
    it, and is left alone)."""
    target = db.session.get(Node, vm.migration_node_id)
    finding = Finding("interrupted_move", db.session.get(Node, vm.node_id).fqdn,
                      vm.domain_name or vm.name, f"moving to {target.fqdn}")  # fmt: skip
    if not fix:
        return finding
    try:
        with vm_locks([vm.id], wait=0):
            finding.detail += f"; {settle(vm)}"
            finding.fixed = True
    except (ApiError, HypervisorError) as exc:
        db.session.rollback()
        finding.detail += f"; not settled: {getattr(exc, 'message', exc)}"
    return finding


def _stale_saves(fix: bool) -> list[Finding]:
    """Saves that died part-way: reported, or (fix) cleaned up by the sweep."""
    findings = []
    for image in stale_images():
        vm = db.session.get(Vm, image.source_vm_id or 0)
        node = db.session.get(Node, vm.node_id).fqdn if vm else "-"
        finding = Finding("stale_save", node, f"image {image.id}",
                          f"saving since {image.created_at:%Y-%m-%d %H:%M} UTC")  # fmt: skip
        if fix:
            finding.detail = forget_stale(image)
            finding.fixed = True
        findings.append(finding)
    return findings


def _leftovers(nodes: list[Node], answering: dict[int, Host], fix: bool) -> list[Finding]:
    """Listed leftovers: removed where the node answers, waiting where it does not (and
    while the VM they belong to is still moving: a running move is using them)."""
    found = []
    moving = set(db.session.scalars(select(Vm.id).where(Vm.migration_node_id.is_not(None))))
    for node in nodes:
        lefts = leftovers_on(node.id)
        rebuilds = [left for left in lefts if unfinished(left)]
        found += [
            Finding("interrupted_rebuild", node.fqdn, vm, detail, fixed)
            for vm, detail, fixed in interrupted(rebuilds, answering.get(node.id), fix)
        ]
        for left in lefts:
            if unfinished(left):
                continue
            if left.kind == VOLUME and save_in_flight(left.name):
                continue  # listed before it is made: its save's, as a young building row
            where = left.name if left.kind == DOMAIN else f"{left.pool}/{left.name}"
            finding = Finding("leftover", node.fqdn, where, f"{left.kind} {left.reason}")
            host = answering.get(node.id)
            if host is None:
                finding.detail += "; the node does not answer"
            elif left.vm_id in moving:
                finding.detail += f"; vm-{left.vm_id} is still moving"
            elif fix:
                try:
                    finding.detail += f"; {remove_leftover(left, host)}"
                    finding.fixed = True
                except HypervisorError as exc:
                    db.session.rollback()
                    finding.detail += f"; not removed: {exc.reason}"
            found.append(finding)
    return found


def _stale_on_unreachable(
    node_id: int, host: Host, states: dict[int, str], stale_before: datetime, fix: bool
) -> list[Finding]:
    """Stale building rows on a node that does not answer: their requests never said
    success, so their claims and addresses go; a domain one of them made carries our
    metadata and is removed as an orphan once the node answers again. One with volumes
    (or a seed) waits for the node: they can only be deleted there."""
    found = []
    building = [vm_state for vm_state, name in states.items() if name == BUILDING]
    stmt = select(Vm).where(Vm.node_id == node_id, Vm.vm_state_id.in_(building))
    for vm in db.session.scalars(stmt.order_by(Vm.id)).all():
        if as_utc(vm.created_at) >= stale_before:
            continue
        finding = Finding(
            "stale_building",
            host.node.fqdn,
            vm.domain_name or vm.name,
            "building, node unreachable",
        )
        has_storage = db.session.scalars(select(Storage.id).where(Storage.vm_id == vm.id)).first()
        if fix and (has_storage is not None or vm.seed_volume is not None):
            finding.detail += "; it has volumes, left until the node answers"
        elif fix:
            forget(vm)
            finding.fixed = True
            finding.detail += "; claim and addresses released, domain left for orphan cleanup"
        found.append(finding)
    return found


def _check_vm(
    vm: Vm, domain: DomainInfo | None, stored: str, host: Host, stale_before: datetime, fix: bool
) -> list[Finding]:
    fqdn, name = host.node.fqdn, vm.domain_name or vm.name  # (a row the API never made)
    if stored == BUILDING:
        if as_utc(vm.created_at) >= stale_before:
            return []
        finding = Finding(
            "stale_building", fqdn, name, f"building since {vm.created_at:%Y-%m-%d %H:%M:%S}"
        )
        if fix:
            try:
                notes = remove_building(vm, host, domain is not None)
            except (ApiError, HypervisorError) as exc:
                finding.detail += f"; not cleaned: {getattr(exc, 'message', exc)}"
                return [finding]
            finding.fixed = True
            finding.detail += "; volumes, domain, claim and addresses removed" + (
                f" ({' '.join(notes)})" if notes else ""
            )
        return [finding]
    if domain is None:
        if stored == ERROR:
            return [Finding("missing_domain", fqdn, name, "no domain; state is error")]
        finding = Finding("missing_domain", fqdn, name, f"stored {stored}, no domain on host")
        if fix:
            vm.vm_state_id = state_id(ERROR)
            db.session.commit()
            finding.fixed = True
            finding.detail += "; state set to error"
        return [finding]
    if domain.state != stored:
        finding = Finding("state_drift", fqdn, name, f"stored {stored}, libvirt {domain.state}")
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
                "misplaced", fqdn, domain.name, f"vm {domain.vm_id} is recorded under another "
                "name or on another node",
            )  # fmt: skip
        finding = Finding("orphan_domain", fqdn, domain.name, "our metadata, no VM row")
        if fix:
            remove_domain(host, domain.name)
            finding.fixed = True
            finding.detail += "; destroyed and undefined"
        return finding
    if domain.name.startswith((f"{installation}-vm-", "vm-")):
        owner = f"installation {domain.installation}" if domain.installation else "no vmapi"
        return Finding(
            "foreign_domain", fqdn, domain.name, f"{owner} metadata, not this installation's"
        )
    return None
