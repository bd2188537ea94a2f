"""The lock of one image on one node, held while its copy there is made, used or removed.

A PostgreSQL advisory lock on a connection of its own, so it is held across libvirt
calls without any row lock or open transaction (tests/api/test_lock_hold.py), in every
worker and on every API host at once, and vanishes with the connection if the worker
dies. Exclusive to make or remove the copy, shared to make an overlay on it. SQLite (the
embedded single-process default) uses a process-local lock (always exclusive).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from flask import current_app
from sqlalchemy import func, select

from vmapi import heartbeat
from vmapi.error_ids import VM_HYPERVISOR_TIMEOUT
from vmapi.errors import HypervisorTimedOut
from vmapi.extensions import db

#: How often a request waiting for another's copy looks again.
POLL = 0.1
#: (image id, node id) -> lock, for SQLite (one process)
_LOCAL: dict[tuple[int, int, str], threading.Lock] = {}
_LOCAL_GUARD = threading.Lock()


def lock_key(image_id: int, node_id: int, where: str = "node") -> int:
    """The advisory lock of one image on one node (``where`` "node"), or in the Ceph pool
    of one rbd storage type (``where`` "rbd", ``node_id`` the type's id): a signed 64-bit
    key (PostgreSQL's one-key locks never meet the two-key ones the VM locks use)."""
    label = f"vmapi image copy {image_id} {node_id}"
    if where != "node":
        label = f"{label} {where}"
    digest = hashlib.sha256(label.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def lock_wait() -> float:
    """How long a request waits for another's copy: that copy's own bound, and then some."""
    config = current_app.config
    return float(config["IMAGE_COPY_TIMEOUT"]) + 2 * float(config["LIBVIRT_TIMEOUT"])


@contextmanager
def copy_lock(
    image_id: int, node_id: int, shared: bool = False, where: str = "node"
) -> Iterator[None]:
    """Hold the (image, node) lock for the block (``where`` "rbd": the (image, rbd
    storage type) lock, ``node_id`` the type's id): exclusive, or shared with other
    holders of the shared lock. 504 when another holder keeps it past :func:`lock_wait`."""
    wait = lock_wait()
    deadline = time.monotonic() + wait
    if db.engine.dialect.name != "postgresql":
        with _LOCAL_GUARD:
            lock = _LOCAL.setdefault((image_id, node_id, where), threading.Lock())
        while not lock.acquire(timeout=POLL):
            _waited(deadline, wait, image_id, node_id, where)
        try:
            yield
        finally:
            lock.release()
        return
    key = lock_key(image_id, node_id, where)
    take = func.pg_try_advisory_lock_shared if shared else func.pg_try_advisory_lock
    free = func.pg_advisory_unlock_shared if shared else func.pg_advisory_unlock
    conn = db.engine.connect()
    try:
        while not conn.execute(select(take(key))).scalar():
            conn.commit()
            _waited(deadline, wait, image_id, node_id, where)
            time.sleep(POLL)
        conn.commit()  # a session lock: no transaction stays open while it is held
        try:
            yield
        finally:
            conn.rollback()
            conn.execute(select(free(key)))
            conn.commit()
    finally:
        conn.close()


def _waited(deadline: float, wait: float, image_id: int, node_id: int, where: str) -> None:
    heartbeat.beat()  # waiting on a copy that is moving bytes is progress too
    if time.monotonic() >= deadline:
        place = f"node {node_id}" if where == "node" else f"storage type {node_id}'s Ceph pool"
        key = "node" if where == "node" else "storage_type"
        raise HypervisorTimedOut(
            f"Another request's copy of image {image_id} to {place} did not finish "
            f"within {wait:g} s; retry later.",
            error_id=VM_HYPERVISOR_TIMEOUT,
            data={"image": {"id": image_id}, key: {"id": node_id}},
        )
