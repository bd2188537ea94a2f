"""What the RBD modules with two hosts share (test_rbd_moves.py, test_rbd_boot.py): vmapi on
the host pair (migrate_env) given the session cluster's key, an rbd type over that cluster,
and the clean-up of both hosts and of this installation's images in the cluster."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager

import libvirt

from tests.hypervisor.ceph_cluster import CephCluster
from tests.hypervisor.migrate_env import INSTALLATION, MigrateEnv, migrate_env

RBD_POOL = "vmapi-ceph"


def clean(env: MigrateEnv, ceph: CephCluster) -> None:
    """The rbd pool and the Ceph user's secret off both hosts, this installation's images
    out of the cluster."""
    for host in env.hosts.hosts:
        conn = libvirt.open(host.uri)
        try:
            for pool in conn.listAllStoragePools():
                if pool.name() == RBD_POOL:
                    if pool.isActive():
                        pool.destroy()
                    pool.undefine()
            for secret in conn.listAllSecrets():
                if secret.usageID() == f"client.{ceph.user}":
                    secret.undefine()
        finally:
            conn.close()
    ours = [image for image in ceph.rbd_images() if image.startswith(f"{INSTALLATION}-")]
    # clones (root disks, volumes) before the images they are clones of
    for image in sorted(ours, key=lambda name: "-image-" in name):
        spec = f"{ceph.pool}/{image}"
        for snap in json.loads(ceph.run("rbd", "snap", "ls", "--format", "json", spec)):
            if snap["protected"] == "true":
                ceph.run("rbd", "snap", "unprotect", f"{spec}@{snap['name']}")
            ceph.run("rbd", "snap", "rm", f"{spec}@{snap['name']}")
        ceph.run("rbd", "rm", spec)


@contextmanager
def ceph_env(host_pair, guest_image, pg_server, tmp_path_factory, ceph) -> Iterator[MigrateEnv]:
    """Two hosts' vmapi (migrate_env) given the Ceph key; the cluster and hosts cleaned after."""
    store = tmp_path_factory.mktemp("images")
    keys = tmp_path_factory.mktemp("ceph-keys")
    (keys / f"client.{ceph.user}.key").write_text(ceph.key + "\n")
    made = None
    try:
        with migrate_env(pg_server, host_pair, guest_image.path, store) as made:
            made.app.config["CEPH_KEY_DIR"] = str(keys)
            yield made
    finally:
        if made is not None:  # after the domains went: a guest still holding an image
            clean(made, ceph)  # (a test that failed half-way) would keep it from going


def make_rbd_type(env: MigrateEnv, ceph: CephCluster) -> dict:
    """The rbd storage type over the session's cluster."""
    body = {"name": "ceph", "description": "Ceph RBD", "pool": RBD_POOL, "format": "raw",
            "backend": "rbd", "ceph_monitors": [f"{h}:{p}" for h, p in ceph.monitors],
            "ceph_pool": ceph.pool, "ceph_user": ceph.user}  # fmt: skip
    made = env.api.post("storage_type", json=body)
    assert made.status_code == 201, made.json
    return made.json["data"]


def state_of(env: MigrateEnv, name: str) -> tuple[dict[str, str], list[str]]:
    """Host ``name``'s ceph secrets (usage -> UUID) and storage pools."""
    conn = libvirt.open(env.host(name).uri)
    try:
        found = {s.usageID(): s.UUIDString() for s in conn.listAllSecrets()}
        return found, [p.name() for p in conn.listAllStoragePools()]
    finally:
        conn.close()


def network_disk(env: MigrateEnv, name: str, domain: str, target: str) -> ET.Element:
    conn = libvirt.open(env.host(name).uri)
    try:
        xml = ET.fromstring(conn.lookupByName(domain).XMLDesc(0))
    finally:
        conn.close()
    [disk] = [d for d in xml.iterfind("devices/disk") if d.find("target").get("dev") == target]
    return disk
