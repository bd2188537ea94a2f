"""The default catalog rows (API.md §2), inserted idempotently by ``flask vmapi seed``,
and the installation's id (made once per database when it is not configured).

The first migration inserts the same rows (its own frozen copy, as migrations must not
depend on code that changes); this function repairs a database where some are missing.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from vmapi.extensions import db
from vmapi.models import CacheOption, NodeState, StorageType, VirtMethod, VmState
from vmapi.services.names import ensure_installation_id

CACHE_DESCRIPTIONS = {
    "none": "No host page cache; direct I/O (safe, the usual choice)",
    "writethrough": "Host page cache for reads; writes reach the disk before completing",
    "writeback": "Host page cache for reads and writes; the guest flushes",
    "directsync": "No host page cache; every write synchronous",
    "unsafe": "Host page cache; guest flushes ignored (testing only)",
    "default": "The hypervisor's default cache mode",
}

SEED: list[tuple[type, dict[str, Any]]] = [
    (NodeState, {"name": "running", "schedulable": True}),
    (NodeState, {"name": "maintenance", "schedulable": False}),
    (NodeState, {"name": "offline", "schedulable": False}),
    *[
        (VmState, {"name": name})
        for name in ("building", "running", "paused", "shutoff", "crashed", "error")
    ],
    (VirtMethod, {"name": "KVM", "domain_type": "kvm"}),
    (VirtMethod, {"name": "QEMU", "domain_type": "qemu"}),
    (
        StorageType,
        {
            "name": "local-qcow2",
            "description": "qcow2 volumes in the node's local pool",
            "pool": "vmapi",
            "format": "qcow2",
        },
    ),
    (
        StorageType,
        {
            "name": "local-raw",
            "description": "raw volumes in the node's local pool",
            "pool": "vmapi",
            "format": "raw",
        },
    ),
    *[(CacheOption, {"name": n, "description": d}) for n, d in CACHE_DESCRIPTIONS.items()],
]


def seed_defaults() -> list[str]:
    """Insert missing seeded rows (by name) and mark them seeded, and keep an installation
    id in the database if it has none; return what was added."""
    added = []
    installation, made = ensure_installation_id()
    if made:
        added.append(f"installation id {installation}")
    for model, values in SEED:
        row = db.session.scalars(select(model).where(model.name == values["name"])).first()
        if row is None:
            db.session.add(model(**values, seeded=True))
            added.append(f"{model.__tablename__} {values['name']}")
        elif not row.seeded:
            row.seeded = True
    db.session.commit()
    return added
