"""Reconcile's findings about volumes (services/reconcile.py): copies of deleted images
that a node kept (``stale_image_copy``), and volumes in vmapi's pools that nothing of the
database owns (``unowned_volume``)."""

from __future__ import annotations

from sqlalchemy import select

from vmapi.extensions import db
from vmapi.hypervisor import HypervisorError, PoolNotFound
from vmapi.models import ImageCopy, Storage, StorageType, Vm
from vmapi.models.leftover import VOLUME
from vmapi.services.findings import Finding
from vmapi.services.images.copies import remove_if_unused
from vmapi.services.nodes.hosts import Host, hypervisor, on_hosts


def stale_copies(hosts: dict[int, Host], fix: bool) -> list[Finding]:
    """Copies of deleted images left on nodes that answer now."""
    stmt = select(ImageCopy).where(ImageCopy.image_id.is_(None), ImageCopy.node_id.in_(hosts))
    findings = []
    for copy in db.session.scalars(stmt.order_by(ImageCopy.id)).all():
        host = hosts[copy.node_id]
        finding = Finding("stale_image_copy", host.node.fqdn, f"{copy.pool}/{copy.volume_name}",
                          "the copy of a deleted image")  # fmt: skip
        if fix:
            try:
                finding.fixed = remove_if_unused(copy.id)
                finding.detail += "; volume deleted"
            except HypervisorError as exc:
                finding.detail += f"; not deleted: {exc.reason}"
        findings.append(finding)
    return findings


def unowned_volumes(
    hosts: dict[int, Host], listed: set[tuple[int, str, str | None, str]], workers: int
) -> list[Finding]:
    """Volumes in vmapi's pools on the nodes that answered that no storage row owns and
    no leftover lists (those are reported as leftovers).

    vmapi's pools are those its storage types name and those its rows recorded (a type's
    pool may have been another when older volumes were made)."""
    if not hosts:
        return []
    type_pools = set(db.session.scalars(select(StorageType.pool)))
    owned: dict[int, dict[str, set[str]]] = {node_id: {} for node_id in hosts}
    stmt = select(Storage.node_id, Storage.pool, Storage.volume_name)
    for node_id, pool, name in db.session.execute(stmt.where(Storage.node_id.in_(hosts))):
        owned[node_id].setdefault(pool, set()).add(name)
    seeds = select(Vm.node_id, Vm.seed_pool, Vm.seed_volume).where(Vm.seed_volume.is_not(None))
    for node_id, pool, name in db.session.execute(seeds.where(Vm.node_id.in_(hosts))):
        owned[node_id].setdefault(pool, set()).add(name)
    copies = select(ImageCopy.node_id, ImageCopy.pool, ImageCopy.volume_name)
    for node_id, pool, name in db.session.execute(copies.where(ImageCopy.node_id.in_(hosts))):
        owned[node_id].setdefault(pool, set()).add(name)
    # a shared pool's volumes show on every node that has the pool
    shared = (
        select(Storage.pool, Storage.volume_name)
        .join(StorageType, StorageType.id == Storage.storage_type_id)
        .where(StorageType.shared.is_(True))
    )
    for pool, name in db.session.execute(shared):
        for node_id in hosts:
            owned[node_id].setdefault(pool, set()).add(name)
    pools = {node_id: sorted(type_pools | set(owned[node_id])) for node_id in hosts}
    driver = hypervisor()

    def listing(node_id: int) -> dict[str, list[str] | None]:
        found: dict[str, list[str] | None] = {}
        for pool in pools[node_id]:
            try:
                found[pool] = driver.volumes(hosts[node_id].uri, pool)
            except PoolNotFound:
                found[pool] = None  # not on this node: nothing of ours can be in it
        return found

    answers = on_hosts({node_id: node_id for node_id in hosts}, listing, workers)
    findings = []
    for node_id, answer in answers.items():
        fqdn = hosts[node_id].node.fqdn
        if isinstance(answer, HypervisorError):
            findings.append(Finding("unreachable", fqdn, "-", f"listing volumes: {answer.reason}"))
            continue
        for pool, names in answer.items():
            for name in names or []:
                if (node_id, VOLUME, pool, name) in listed:
                    continue
                if name not in owned[node_id].get(pool, set()):
                    findings.append(
                        Finding(
                            "unowned_volume",
                            fqdn,
                            f"{pool}/{name}",
                            "no storage row or image copy owns it",
                        )
                    )
    return findings
