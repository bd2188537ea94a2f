"""Ceph RBD on a node: the libvirt secret that holds a cephx user's key, and the rbd
storage pool over a Ceph pool. Disks on RBD are network disks (:class:`.config.Disk`);
volumes in an rbd pool go through :mod:`.storage` and :mod:`.copies` like any other.

What libvirt 9.0 does here (measured: ../shared/recipes/ceph-rbd.md):
- A secret's value is the key's bytes: libvirt base64-encodes it for librados, so the
  key as Ceph prints it is decoded first (``virsh secret-set-value`` does the same
  unless told ``--plain``). A wrong value fails later, at the pool's start or a guest's,
  as librados's "No such file or directory".
- A private secret's value cannot be read back ("secret is private"). Whether it holds
  the key is told by a digest of the key kept in its description (a cephx key holds 16
  random bytes: its digest gives nothing away); a secret without one is set again.
- A pool's start connects to the cluster. A monitor that does not answer holds it for
  librados's ``client_mount_timeout`` (30 s as libvirt sets it); the pool sets it to
  :data:`MOUNT_SECONDS`, so the failure comes back within the driver's timeout. libvirt
  reports it as a system error, which is about the cluster, not the host: it becomes a
  :class:`HypervisorError` naming the monitors, not a :class:`HypervisorUnavailable`.
- Without ``<refresh><volume allocation='default'/></refresh>`` libvirt reports every RBD
  volume's allocation as its capacity; with it, what the image really uses (fast-diff).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import xml.etree.ElementTree as ET

import libvirt

from vmapi.hypervisor.errors import HypervisorError, NameTaken
from vmapi.hypervisor.libvirt.calls import LibvirtCalls
from vmapi.hypervisor.libvirt.connection import translate
from vmapi.hypervisor.specs import CephSource

log = logging.getLogger(__name__)

#: libvirt's namespace for librados options in an rbd pool's XML
RBD_NS = "http://libvirt.org/schemas/storagepool/rbd/1.0"
#: seconds a pool's connection to the cluster may take (librados's client_mount_timeout)
MOUNT_SECONDS = 5
#: what a secret's description starts with; the key's digest follows
DIGEST_LABEL = "vmapi cephx key sha256:"


def key_bytes(key: str) -> bytes:
    """The cephx key (base64, as Ceph prints it) as the secret's value; the error never
    quotes it."""
    try:
        return base64.b64decode(key.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the cephx key is not base64 (as `ceph auth get-key` prints it)") from None


def description(key: str) -> str:
    digest = hashlib.sha256(b"vmapi ceph secret\0" + key.strip().encode()).hexdigest()
    return f"{DIGEST_LABEL}{digest}"


def secret_xml(source: CephSource, key: str | None) -> str:
    """``<secret ephemeral='no' private='yes'>`` for ``client.<user>``, its description the
    key's digest (none before the value is set)."""
    el = ET.Element("secret", ephemeral="no", private="yes")
    ET.SubElement(el, "uuid").text = source.secret_uuid
    if key is not None:
        ET.SubElement(el, "description").text = description(key)
    usage = ET.SubElement(el, "usage", type="ceph")
    ET.SubElement(usage, "name").text = f"client.{source.user}"
    return ET.tostring(el, encoding="unicode")


def rbd_pool_xml(pool: str, source: CephSource, mount_seconds: int = MOUNT_SECONDS) -> str:
    """``<pool type='rbd'>`` over ``source`` (its monitors by their msgr v1 ports), real
    allocations on refresh, and a bounded wait for the cluster."""
    el = ET.Element("pool", {"type": "rbd", "xmlns:rbd": RBD_NS})
    ET.SubElement(el, "name").text = pool
    src = ET.SubElement(el, "source")
    ET.SubElement(src, "name").text = source.pool
    for host, port in source.monitors:
        ET.SubElement(src, "host", name=host, port=str(port))
    auth = ET.SubElement(src, "auth", type="ceph", username=source.user)
    ET.SubElement(auth, "secret", uuid=source.secret_uuid)
    refresh = ET.SubElement(el, "refresh")
    ET.SubElement(refresh, "volume", allocation="default")
    options = ET.SubElement(el, "rbd:config_opts")
    ET.SubElement(options, "rbd:option", name="client_mount_timeout", value=str(mount_seconds))
    return ET.tostring(el, encoding="unicode")


def pool_source(xml: str) -> tuple:
    """What an existing pool stands on, comparable with :func:`wanted_source`."""
    root = ET.fromstring(xml)  # noqa: S314 - from libvirt, not from a guest
    src = root.find("source")
    if src is None:
        return (root.get("type"),)
    hosts = tuple((h.get("name"), int(h.get("port") or 0)) for h in src.iterfind("host"))
    auth = src.find("auth")
    secret = auth.find("secret") if auth is not None else None
    return (root.get("type"), src.findtext("name"), hosts,
            auth.get("username") if auth is not None else None,
            secret.get("uuid") if secret is not None else None)  # fmt: skip


def wanted_source(source: CephSource) -> tuple:
    monitors = tuple((host, int(port)) for host, port in source.monitors)
    return ("rbd", source.pool, monitors, source.user, source.secret_uuid)


def _lookup_secret(conn: libvirt.virConnect, uuid: str) -> libvirt.virSecret | None:
    try:
        return conn.secretLookupByUUIDString(uuid)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_SECRET:
            raise
        return None


def _ensure_secret(conn: libvirt.virConnect, uri: str, source: CephSource, key: str) -> bool:
    value = key_bytes(key)
    usage = f"client.{source.user}"
    secret = _lookup_secret(conn, source.secret_uuid)
    if secret is not None:
        if secret.usageType() != libvirt.VIR_SECRET_USAGE_TYPE_CEPH or secret.usageID() != usage:
            raise NameTaken(uri, f"secret {source.secret_uuid} is for {secret.usageID()}, "
                                 f"not ceph {usage}")  # fmt: skip
        found = ET.fromstring(secret.XMLDesc(0)).findtext("description")  # noqa: S314
        if found == description(key):
            return False
    else:
        secret = conn.secretDefineXML(secret_xml(source, None), 0)
    secret.setValue(value, 0)
    # the digest only once the value is set: a failure before leaves it to be set again
    conn.secretDefineXML(secret_xml(source, key), 0)
    return True


def _forget_secret(conn: libvirt.virConnect, uuid: str) -> bool:
    secret = _lookup_secret(conn, uuid)
    if secret is None:
        return False
    for pool in conn.listAllStoragePools(0):
        if pool_source(pool.XMLDesc(0))[4:] == (uuid,):  # an rbd pool with that secret
            return False
    secret.undefine()
    return True


def _ensure_rbd_pool(
    conn: libvirt.virConnect, uri: str, pool: str, source: CephSource, mount_seconds: int
) -> bool:
    if _lookup_secret(conn, source.secret_uuid) is None:
        raise HypervisorError(uri, f"no secret {source.secret_uuid} for storage pool {pool} "
                                   "(the Ceph user's secret comes first)")  # fmt: skip
    created = False
    try:
        found = conn.storagePoolLookupByName(pool)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
            raise
        try:
            found = conn.storagePoolDefineXML(rbd_pool_xml(pool, source, mount_seconds), 0)
            created = True
        except libvirt.libvirtError:
            found = conn.storagePoolLookupByName(pool)  # defined meanwhile by another
    have, want = pool_source(found.XMLDesc(0)), wanted_source(source)
    if have != want:
        raise NameTaken(uri, f"storage pool {pool} exists with another source: {have} "
                             f"(wanted {want})")  # fmt: skip
    if not found.isActive():
        try:
            found.create(0)
        except libvirt.libvirtError as exc:
            if not found.isActive():  # not merely started meanwhile by another
                if created:
                    found.undefine()
                raise _unreachable(uri, pool, source, exc) from exc
    if created:
        found.setAutostart(1)
    return created


def _forget_rbd_pool(conn: libvirt.virConnect, pool: str, source: CephSource) -> bool:
    try:
        found = conn.storagePoolLookupByName(pool)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
            raise
        return False
    if pool_source(found.XMLDesc(0)) != wanted_source(source):
        return False
    if found.isActive():
        found.destroy()  # (an rbd pool's destroy disconnects from the cluster, nothing more)
    found.undefine()
    return True


def _refresh_rbd_pool(
    conn: libvirt.virConnect, uri: str, pool: str, source: CephSource
) -> tuple[int, int]:
    found = conn.storagePoolLookupByName(pool)
    try:
        found.refresh(0)
    except libvirt.libvirtError as exc:
        raise _unreachable(uri, pool, source, exc) from exc
    _state, capacity, _allocation, available = found.info()
    return capacity, available


def _unreachable(
    uri: str, pool: str, source: CephSource, exc: libvirt.libvirtError
) -> HypervisorError:
    """A failed start: the cluster's fault (a system error from librados) or libvirt's."""
    if exc.get_error_code() != libvirt.VIR_ERR_SYSTEM_ERROR:
        return translate(uri, exc)
    monitors = ", ".join(f"{host}:{port}" for host, port in source.monitors)
    return HypervisorError(uri, f"storage pool {pool} cannot reach Ceph pool {source.pool} at "
                                f"{monitors} as client.{source.user}: "
                                f"{exc.get_error_message()}")  # fmt: skip


class CephCalls(LibvirtCalls):
    """The Ceph user's secret and rbd storage pools."""

    #: seconds an rbd pool's start may wait for the cluster (below the driver's timeout)
    ceph_mount_seconds: int = MOUNT_SECONDS

    def ensure_ceph_secret(self, uri: str, source: CephSource, key: str) -> bool:
        changed = self._call(uri, lambda conn: _ensure_secret(conn, uri, source, key))
        if changed:
            log.info("set the ceph secret %s (client.%s) on %s", source.secret_uuid,
                     source.user, uri)  # fmt: skip
        return changed

    def ensure_rbd_pool(self, uri: str, pool: str, source: CephSource) -> bool:
        mount = self.ceph_mount_seconds
        created = self._call(uri, lambda conn: _ensure_rbd_pool(conn, uri, pool, source, mount))
        if created:
            log.info("defined and started rbd storage pool %s (%s) on %s", pool, source.pool,
                     uri)  # fmt: skip
        return created

    def refresh_rbd_pool(self, uri: str, pool: str, source: CephSource) -> tuple[int, int]:
        return self._call(uri, lambda conn: _refresh_rbd_pool(conn, uri, pool, source))

    def forget_rbd_pool(self, uri: str, pool: str, source: CephSource) -> bool:
        removed = self._call(uri, lambda conn: _forget_rbd_pool(conn, pool, source))
        if removed:
            log.info("removed rbd storage pool %s (%s) from %s", pool, source.pool, uri)
        return removed

    def forget_ceph_secret(self, uri: str, secret_uuid: str) -> bool:
        removed = self._call(uri, lambda conn: _forget_secret(conn, secret_uuid))
        if removed:
            log.info("removed the ceph secret %s from %s", secret_uuid, uri)
        return removed
