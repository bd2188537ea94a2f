"""Reconcile's findings about volumes (services/reconcile.py): copies of deleted images
that a node kept (``stale_image_copy``), and volumes in vmapi's pools that nothing of the
database owns (``unowned_volume``).

The images of rbd storage types are looked at through the API host's Ceph client, never
by listing a node's rbd pool (a refresh there opens every image of the Ceph pool, on
every node): one ``rbd info`` per storage row (``missing_volume`` when its image is not
there) and one ``rbd ls`` per Ceph pool for this installation's images that no row owns
(``unowned_volume``). A cluster the API host cannot reach, or a key it cannot read, is
``ceph_unreachable``.

One kind of those unowned images is known to be a leak, and ``--fix`` removes it
(``abandoned_clone``): a root disk's clone started before its create's claim
(services/vms/rbd_boot.py ``early_clone``) whose worker died, or whose claim's commit
did not land, before the root disk's row was committed. It is named exactly
``<installation>-storage-<N>``, no row has id N nor its name and no leftover lists it,
N is not above the storage id sequence's last value (ids are never handed out twice:
no row can own it later), it is a clone of one of the type's images (``image_rbd``),
and it was made more than BUILD_TIMEOUT ago (a younger one is reported as
``unowned_volume``: its create may still be running)."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from sqlalchemy import cast, func, or_, select
from sqlalchemy.dialects.postgresql import REGCLASS

from vmapi.extensions import db
from vmapi.hypervisor import HypervisorError, PoolNotFound
from vmapi.hypervisor.rbd import RbdClient, RbdError, RbdImage
from vmapi.models import ImageCopy, ImageRbd, Node, Storage, StorageType, Vm
from vmapi.models.catalog import RBD
from vmapi.models.leftover import VOLUME
from vmapi.services.findings import Finding
from vmapi.services.images.copies import remove_if_unused
from vmapi.services.images.rbd_copies import remove_orphans as remove_rbd_orphans
from vmapi.services.names import installation_id
from vmapi.services.nodes.hosts import Host, hypervisor, on_hosts
from vmapi.services.storage.ceph import KeyUnreadable, rbd_client


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


def stale_rbd_images(fix: bool) -> list[Finding]:
    """Images of deleted images left in a Ceph pool (the cluster could not be reached
    when the image was deleted, or a save died)."""
    stmt = select(ImageRbd).where(ImageRbd.image_id.is_(None)).order_by(ImageRbd.id)
    findings = []
    for row in db.session.scalars(stmt).all():
        finding = Finding("stale_image_rbd", "ceph", f"{row.ceph_pool}/{row.rbd_name}",
                          "the RBD image of a deleted image")  # fmt: skip
        if fix:
            kept = remove_rbd_orphans([row.id])
            finding.fixed = not kept
            finding.detail += "; removed" if finding.fixed else f"; not removed: {kept[0]}"
        findings.append(finding)
    return findings


def unowned_volumes(
    hosts: dict[int, Host], listed: set[tuple[int, str, str | None, str]], workers: int
) -> list[Finding]:
    """Volumes in vmapi's pools on the nodes that answered that no storage row owns and
    no leftover lists (those are reported as leftovers).

    vmapi's pools are those its storage types name and those its rows recorded (a type's
    pool may have been another when older volumes were made); not those of rbd types
    (:func:`rbd_volumes` looks at their images, once for all nodes)."""
    if not hosts:
        return []
    rbd_pools = set(db.session.scalars(select(StorageType.pool).where(StorageType.backend == RBD)))
    type_pools = set(db.session.scalars(select(StorageType.pool))) - rbd_pools
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
    pools = {node_id: sorted((type_pools | set(owned[node_id])) - rbd_pools) for node_id in hosts}
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


def rbd_volumes(
    listed: set[tuple[int, str, str | None, str]],
    workers: int,
    fix: bool = False,
    stale_before: datetime | None = None,
) -> list[Finding]:
    """The images of the rbd types' storage rows and this installation's images in their
    Ceph pools, through the API host's client: one Ceph pool (of one cluster) at a time,
    whichever types share it, whatever nodes use it. Abandoned clones made before
    ``stale_before`` (None: none is) are removed when ``fix``."""
    types = db.session.scalars(
        select(StorageType).where(StorageType.backend == RBD).order_by(StorageType.id)
    ).all()
    clusters: dict[tuple[tuple[str, ...], str], list[StorageType]] = {}
    for storage_type in types:
        key = (tuple(storage_type.ceph_monitors or ()), storage_type.ceph_pool or "")
        clusters.setdefault(key, []).append(storage_type)
    findings = []
    for (monitors, pool), group in clusters.items():
        where = f"ceph:{','.join(monitors)}"
        findings += _rbd_pool(where, pool, group, listed, workers, fix, stale_before)
    return findings


def _rbd_pool(
    where: str,
    pool: str,
    types: list[StorageType],
    listed: set,
    workers: int,
    fix: bool,
    stale_before: datetime | None,
) -> list[Finding]:
    names = ", ".join(f"{t.id} ({t.name})" for t in types)
    stmt = select(Storage, Node.fqdn).outerjoin(Node, Node.id == Storage.node_id)
    rows = db.session.execute(stmt.where(Storage.storage_type_id.in_([t.id for t in types]),
                                         Storage.volume_name.is_not(None))).all()  # fmt: skip
    # a row owns its name from its commit on, before its image is made (its path is set
    # when it is): read before the pool is listed, a create in flight is never unowned,
    # but for a root disk cloned before its create's claim (services/vms/rbd_boot.py
    # early_clone): unowned until the claim commits (milliseconds), and for good if its
    # worker died then (abandoned_clone once older than BUILD_TIMEOUT: --fix removes it)
    owned = {storage.volume_name for storage, _fqdn in rows}
    # images written into the pool (and saves on RBD: recorded before they are made)
    written = select(ImageRbd.rbd_name).where(
        ImageRbd.ceph_pool == pool, ImageRbd.storage_type_id.in_([t.id for t in types])
    )
    parents = set(db.session.scalars(written))
    owned |= parents
    last_id = _last_storage_id()
    made = [(storage.id, storage.vm_id, storage.storage_type_id, storage.volume_name,
             storage.path, fqdn) for storage, fqdn in rows if storage.path]  # fmt: skip
    libvirt_pools = {t.pool for t in types}
    left = {name for _node, kind, at, name in listed if kind == VOLUME and at in libvirt_pools}
    try:
        clients = {t.id: rbd_client(t) for t in types}
    except KeyUnreadable as exc:
        return [Finding("ceph_unreachable", where, pool, f"storage types {names}: {exc}; their "
                        "volumes were not looked at")]  # fmt: skip
    db.session.commit()  # (only read) nothing stays open while the cluster answers
    try:
        images = clients[types[0].id].list_images(pool)
    except RbdError as exc:
        return [Finding("ceph_unreachable", where, pool, f"storage types {names}: {exc}; their "
                        "volumes were not looked at")]  # fmt: skip
    answers = _look([(clients[row[2]], row[3]) for row in made], pool, workers)
    findings = []
    for (storage_id, vm_id, _type, _name, path, fqdn), answer in zip(made, answers, strict=True):
        if isinstance(answer, RbdError):
            findings.append(Finding("ceph_unreachable", where, path,
                                    f"storage {storage_id}: {answer}"))  # fmt: skip
        elif answer is None:
            owner = f"vm-{vm_id}" if vm_id else "no VM"
            findings.append(Finding("missing_volume", fqdn or "-", path, f"storage {storage_id} "
                                    f"({owner}): no such image in the Ceph pool"))  # fmt: skip
    ours = f"{installation_id()}-"
    unowned = [i for i in images if i.startswith(ours) and i not in owned and i not in left]
    abandoned = _abandoned(clients[types[0].id], pool, unowned, parents, last_id, stale_before,
                           workers)  # fmt: skip
    for image in unowned:
        if image not in abandoned:
            findings.append(Finding("unowned_volume", where, f"{pool}/{image}",
                                    "no storage row owns it (named as this installation "
                                    "names its volumes)"))  # fmt: skip
            continue
        finding = Finding("abandoned_clone", where, f"{pool}/{image}", abandoned[image])
        if fix:
            try:
                clients[types[0].id].remove_image(pool, image)
                finding.fixed = True
                finding.detail += "; removed"
            except RbdError as exc:
                finding.detail += f"; not removed: {exc}"
        findings.append(finding)
    return findings


def _last_storage_id() -> int | None:
    """The last id the storage rows' sequence handed out (None before its first, and on
    SQLite: there no id is taken before its row is committed)."""
    if db.engine.dialect.name != "postgresql":
        return None
    sequence = cast(func.pg_get_serial_sequence(Storage.__tablename__, "id"), REGCLASS)
    return db.session.scalar(select(func.pg_sequence_last_value(sequence)))


def _abandoned(
    client: RbdClient,
    pool: str,
    unowned: list[str],
    parents: set[str],
    last_id: int | None,
    stale_before: datetime | None,
    workers: int,
) -> dict[str, str]:
    """Of the unowned images, the root disks cloned before a claim that never committed
    (see the module's docstring), each with what the finding says of it."""
    if last_id is None or stale_before is None:
        return {}
    form = re.compile(rf"{re.escape(installation_id())}-storage-([0-9]+)")
    taken = {name: int(m[1]) for name in unowned if (m := form.fullmatch(name))}
    taken = {name: n for name, n in taken.items() if n <= last_id}
    if not taken:
        return {}
    looked = dict(zip(taken, _look([(client, name) for name in taken], pool, workers),
                      strict=True))  # fmt: skip
    # read again after the images were: a claim that committed since owns its clone
    claimed = select(Storage.id, Storage.volume_name).where(
        or_(Storage.id.in_(taken.values()), Storage.volume_name.in_(taken))
    )
    owners = db.session.execute(claimed).all()
    db.session.commit()  # (only read)
    ids, names = {n for n, _name in owners}, {name for _n, name in owners}
    found = {}
    for name, n in taken.items():
        image = looked[name]
        if n in ids or name in names or not isinstance(image, RbdImage):
            continue
        if image.created is None or image.created >= stale_before:
            continue  # (a create may still be running)
        parent_pool, _, parent = (image.parent or "").partition("@")[0].partition("/")
        if parent_pool != pool or parent not in parents:
            continue  # not made as a root disk is: a stranger in the way of the name
        found[name] = (f"storage id {n} (taken from the sequence) has no row: a clone of "
                       f"{image.parent} made {image.created:%Y-%m-%d %H:%M:%S} UTC, before "
                       "a create's claim that never committed")  # fmt: skip
    return found


def _look(pairs: list[tuple[RbdClient, str]], pool: str, workers: int) -> list:
    """``rbd info`` of each (client, image) in up to ``workers`` threads (each a process
    of the rbd tool, bounded by its timeout): the image, None, or the RbdError raised."""

    def look(pair: tuple[RbdClient, str]) -> RbdImage | RbdError | None:
        try:
            return pair[0].info(pool, pair[1])
        except RbdError as exc:
            return exc

    if not pairs:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(pairs)))) as threads:
        return list(threads.map(look, pairs))
