"""Whether each node reaches the Ceph clusters of the rbd storage types: the part of
``flask vmapi node check`` about Ceph.

Every node with a virt_node is expected to serve every rbd type (a VM's volumes of any
type may be made or moved to any such node). For each of them, all nodes at once as the
libvirt probe (:mod:`vmapi.services.nodes.health`), each call bounded by
LIBVIRT_TIMEOUT: the type's key as a libvirt secret and its rbd pool started, made when
missing as before a node's first volume (:mod:`vmapi.services.storage.ceph`), then the
pool refreshed from the cluster, which makes the node's librados connect to the monitors
again. A probe that cannot reach the cluster leaves nothing it made: the driver
undefines a pool it could not start, and a secret made for it is removed again.

What was found is kept in ``node_storage_access``, a row per node and type
(``reachable``, ``checked_at``), rather than a JSON column on ``node``: the scheduler's
``reaches_ceph`` filter is then one primary-key lookup per node it visits (``NOT EXISTS``
a row of the VM's types with ``reachable`` false), where JSON would be unpacked per node
and could not be indexed. No row for a node and type (never checked, a type made since)
counts as reachable: the first volume there finds out. Nodes the libvirt probe found
down are skipped (their rows stay as they were: the scheduler skips those nodes anyway).
A key the API host cannot read is its own fault, not the nodes': it is reported and
nothing is recorded.
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from vmapi.extensions import db
from vmapi.hypervisor import HypervisorError, HypervisorUnavailable
from vmapi.hypervisor.specs import CephSource
from vmapi.models import Node, NodeStorageAccess, StorageType, VirtNode
from vmapi.models.catalog import RBD
from vmapi.services.nodes.hosts import hypervisor, node_uri, on_hosts
from vmapi.services.storage.ceph import KeyUnreadable, ceph_key
from vmapi.services.vms.specs import ceph_source

ERROR_LENGTH = 1000


@dataclass
class Access:
    """A node and an rbd type: whether the node reached the type's cluster, and what was
    found (``recorded``: False when the answer says nothing about the node)."""

    fqdn: str
    storage_type: str
    ok: bool
    detail: str
    recorded: bool = True


@dataclass(frozen=True)
class RbdType:
    id: int
    name: str
    pool: str
    source: CephSource
    key: str | None
    key_error: str | None


def rbd_types() -> list[RbdType]:
    """Every rbd type, with its key as the API host reads it (or why it cannot)."""
    types = []
    stmt = select(StorageType).where(StorageType.backend == RBD).order_by(StorageType.id)
    for storage_type in db.session.scalars(stmt):
        source = ceph_source(storage_type)
        assert source is not None
        try:
            key, error = ceph_key(source.user), None
        except KeyUnreadable as exc:
            key, error = None, str(exc)
        types.append(RbdType(storage_type.id, storage_type.name, storage_type.pool, source,
                             key, error))  # fmt: skip
    return types


def check_rbd_access(workers: int, fqdns: tuple[str, ...] = ()) -> list[Access]:
    """Probe the rbd types on every node with a virt_node that answered the libvirt
    probe (``unreachable_since`` null), record and return what was found."""
    types = rbd_types()
    if not types:
        return []
    serves = select(VirtNode.id).where(VirtNode.node_id == Node.id).exists()
    stmt = select(Node).where(serves, Node.unreachable_since.is_(None)).order_by(Node.id)
    if fqdns:
        stmt = stmt.where(Node.fqdn.in_(fqdns))
    nodes = db.session.scalars(stmt).all()
    uris = {n.id: node_uri(n.fqdn, n.libvirt_uri) for n in nodes}
    driver = hypervisor()

    def probe(uri: str) -> dict[int, tuple[bool, str, bool]]:
        found = {}
        for t in types:
            if t.key is None:
                found[t.id] = (False, t.key_error or "", False)
                continue
            made = False
            try:
                made = driver.ensure_ceph_secret(uri, t.source, t.key)
                driver.ensure_rbd_pool(uri, t.pool, t.source)
                capacity, available = driver.refresh_rbd_pool(uri, t.pool, t.source)
            except HypervisorError as exc:
                if made:  # nothing of a probe that could not reach the cluster stays
                    # (should this fail too, the next check or the first volume sets it)
                    with suppress(HypervisorError):
                        driver.forget_ceph_secret(uri, t.source.secret_uuid)
                # a host that stopped answering says nothing about the cluster
                found[t.id] = (False, exc.reason, not isinstance(exc, HypervisorUnavailable))
                continue
            detail = f"rbd pool {t.pool}: {available // 1024**2} of {capacity // 1024**2} MiB free"
            found[t.id] = (True, detail, True)
        return found

    results = on_hosts(uris, probe, workers)
    now = datetime.now(UTC)
    accesses, rows = [], []
    for node in nodes:
        result = results[node.id]
        for t in types:
            if isinstance(result, HypervisorError):
                ok, detail, recorded = False, result.reason, False
            else:
                ok, detail, recorded = result[t.id]
            accesses.append(Access(node.fqdn, t.name, ok, detail[:ERROR_LENGTH], recorded))
            if recorded:
                rows.append({"node_id": node.id, "storage_type_id": t.id, "reachable": ok,
                             "checked_at": now})  # fmt: skip
    if rows:
        dialect = postgresql if db.engine.dialect.name == "postgresql" else sqlite
        stmt = dialect.insert(NodeStorageAccess).values(rows)
        db.session.execute(stmt.on_conflict_do_update(
            index_elements=["node_id", "storage_type_id"],
            set_={"reachable": stmt.excluded.reachable, "checked_at": stmt.excluded.checked_at},
        ))  # fmt: skip
    db.session.commit()
    return accesses
