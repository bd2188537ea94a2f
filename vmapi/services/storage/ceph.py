"""Storage types backed by Ceph RBD: the cephx key from the API host's key directory, the
type as the driver's :class:`CephSource`, and what a node needs before it holds a volume
of such a type (the key as a libvirt secret, the rbd pool).

The key never comes through the API and never goes into an answer, a log or the
database: it is read from ``<CEPH_KEY_DIR>/client.<user>.key`` each time a node is given
it. A node that cannot reach the cluster keeps nothing of the attempt (the pool is not
left defined by the driver, a secret made for it is removed again).
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import TYPE_CHECKING

from flask import current_app
from sqlalchemy import select

from vmapi.errors import ApiError, ServiceUnavailable
from vmapi.extensions import db
from vmapi.hypervisor import CephSource, HypervisorError, NotSupported
from vmapi.hypervisor.librbd import LibRbdClient
from vmapi.hypervisor.rbd import CephAccess, RbdClient
from vmapi.models import Node, StorageType
from vmapi.models.catalog import RBD
from vmapi.node_detail import NodeNote
from vmapi.services.nodes.hosts import Host, hypervisor, node_uri, on_hosts
from vmapi.services.vms.specs import ceph_source

if TYPE_CHECKING:  # (a cycle otherwise: undo -> leftovers -> this module)
    from vmapi.services.undo import Undo


class KeyUnreadable(Exception):
    """The key of a Ceph user cannot be read on this API host; the message says why
    (never the key)."""


def key_path(user: str) -> str:
    directory = current_app.config.get("CEPH_KEY_DIR")
    if not directory:
        raise KeyUnreadable("VMAPI_CEPH_KEY_DIR is not set on the API host")
    return os.path.join(directory, f"client.{user}.key")


def ceph_key(user: str) -> str:
    """The user's cephx key, base64 as ``ceph auth get-key`` prints it."""
    path = key_path(user)
    try:
        with open(path, encoding="ascii") as file:
            key = file.read(4096).strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not ASCII text"
        raise KeyUnreadable(f"the key file {path} cannot be read: {reason}") from exc
    try:
        raw = base64.b64decode(key, validate=True)
    except binascii.Error as exc:
        raise KeyUnreadable(f"the key file {path} does not hold a base64 cephx key") from exc
    if not raw:
        raise KeyUnreadable(f"the key file {path} is empty")
    return key


def key_unreadable(exc: KeyUnreadable, storage_type: StorageType) -> ServiceUnavailable:
    """503: the API host cannot give a node the key (its configuration is at fault)."""
    return ServiceUnavailable(
        f"Storage type {storage_type.id} is backed by Ceph, but {exc}; nothing was made.",
        data={"step": "reading the Ceph key", "storage_type": {"id": storage_type.id}},
    )


class Steps:
    """The step a caller names when a call fails (``step`` is read after the failure)."""

    step = "reading the Ceph key"


def ensure_rbd_pool(
    storage_type: StorageType, host: Host, undo: Undo, messages: list[str], steps: Steps
) -> None:
    """Make sure the node holds the type's key as a libvirt secret and has its rbd pool
    started (both made when missing; they stay for the node's later volumes). When the
    pool cannot be started (the cluster out of reach) the driver leaves no pool behind,
    and a secret set here is removed by ``undo`` (unless a pool of the node uses it)."""
    source = ceph_source(storage_type)
    assert source is not None  # an rbd type
    driver = hypervisor()
    uri = host.uri
    steps.step = "reading the Ceph key"
    key = ceph_key(source.user)
    steps.step = f"giving the node the key of client.{source.user}"
    made = driver.ensure_ceph_secret(uri, source, key)
    steps.step = "preparing the rbd storage pool"
    try:
        created = driver.ensure_rbd_pool(uri, storage_type.pool, source)
    except BaseException:
        if made:  # the node keeps nothing of an attempt that could not reach the cluster
            undo.push(f"removing secret {source.secret_uuid} from node {host.node.fqdn} "
                      "unless a pool uses it",
                      lambda: driver.forget_ceph_secret(uri, source.secret_uuid))  # fmt: skip
        raise
    if made:
        detail = f"secret {source.secret_uuid} (client.{source.user})"
        messages.append(NodeNote("The node's libvirt was given the Ceph user's key.", detail))
    if created:
        monitors = ", ".join(storage_type.ceph_monitors or ())
        messages.append(NodeNote("A storage pool was created.",
                                 f"rbd storage pool {storage_type.pool}: Ceph pool "
                                 f"{source.pool} at {monitors}"))  # fmt: skip


def rbd_client(storage_type: StorageType) -> RbdClient:
    """The API host as a client of the type's cluster, as the type's user (its key read
    from its file by the tools themselves; :class:`KeyUnreadable` first when it cannot be
    read here)."""
    source = ceph_source(storage_type)
    assert source is not None  # an rbd type
    ceph_key(source.user)  # readable, and a key: else KeyUnreadable before any tool runs
    access = CephAccess(
        monitors=source.monitors,
        user=source.user,
        keyfile=key_path(source.user),
        timeout=float(current_app.config["LIBVIRT_TIMEOUT"]),
    )
    return RbdClient(access)


def librbd_client(storage_type: StorageType) -> LibRbdClient:
    """The API host as an in-process client of the type's cluster (this process's
    connection to it, made at the first use), as the type's user; the key read by
    librados from its file (:class:`KeyUnreadable` first when it cannot be read here)."""
    return LibRbdClient(rbd_client(storage_type).access)


def rbd_type_of_pool(pool: str) -> StorageType | None:
    """The rbd type whose libvirt pool on the nodes is ``pool`` (None: not an rbd pool)."""
    stmt = select(StorageType).where(StorageType.pool == pool, StorageType.backend == RBD)
    return db.session.scalars(stmt.order_by(StorageType.id)).first()


def remove_rbd_volume(storage_type: StorageType, name: str) -> bool:
    """Remove an RBD image of the type through the API host's client (one image, never
    through a node's pool, which knows only the images it made or saw at its last
    refresh); False when it was gone. A key the API host cannot read is a
    :class:`HypervisorError` here, as a cluster out of reach is: the volume stays."""
    try:
        client = rbd_client(storage_type)
    except KeyUnreadable as exc:
        raise HypervisorError("rbd:", str(exc)) from exc
    return client.remove_image(storage_type.ceph_pool or "", name)


def resize_rbd_volume(storage_type: StorageType, name: str, size: int) -> None:
    """Grow an RBD image that no guest has open, through the API host's client."""
    try:
        client = rbd_client(storage_type)
    except KeyUnreadable as exc:
        raise HypervisorError("rbd:", str(exc)) from exc
    client.resize(storage_type.ceph_pool or "", name, size)


def forget_rbd_pools(leaving: list[tuple[str, CephSource]]) -> list[str]:
    """After rbd types were deleted: their libvirt pools off every node, and the secrets
    of Ceph users no remaining type names (the images in the cluster stay: nothing of
    the types used them). A note for each node that kept them (it did not answer):
    nothing uses them there; `virsh pool-destroy`/`pool-undefine` removes them."""
    remaining = set(db.session.scalars(
        select(StorageType.ceph_secret_uuid).where(StorageType.backend == RBD)))  # fmt: skip
    nodes = db.session.scalars(select(Node).where(Node.libvirt_uri.is_not(None))).all()
    hosts = {}
    for node in nodes:
        try:
            hosts[node.id] = node_uri(node.fqdn, node.libvirt_uri)
        except ApiError:
            continue
    fqdns = {node.id: node.fqdn for node in nodes}
    db.session.commit()  # (only read) nothing stays open while the nodes answer
    driver = hypervisor()

    def forget(uri: str) -> None:
        for pool, source in leaving:
            driver.forget_rbd_pool(uri, pool, source)
        for secret in {source.secret_uuid for _pool, source in leaving} - remaining:
            driver.forget_ceph_secret(uri, secret)

    notes = []
    for node_id, result in on_hosts(hosts, forget, 16).items():
        if isinstance(result, NotSupported):  # a driver without secrets or rbd pools
            continue
        if isinstance(result, HypervisorError):
            pools = ", ".join(pool for pool, _source in leaving)
            notes.append(NodeNote(
                "A node could not be reached; it keeps the rbd storage pool of the deleted "
                "type (nothing uses it).", f"node {fqdns[node_id]}, pools {pools}: "
                f"{result.reason}"))  # fmt: skip
    return notes
