"""``flask vmapi node check`` against rbd storage types, on the real libvirtd and the
session's one-node Ceph cluster (``ceph``, tests/hypervisor/ceph_cluster.py).

A type over the cluster: the node is given the key and the rbd pool, the pool is
refreshed from the cluster, the check says so and records the node as reaching it. A
type whose monitor is a closed port: the check names the node as unable, records it and
exits 1, and the failed probe leaves no pool and no secret on the node. The module
removes its types, pools and secrets after itself (and what a killed run left, before).
"""

from __future__ import annotations

import base64
import os
import socket

import libvirt
import pytest
import sqlalchemy as sa

from tests.hypervisor.boot_env import BootEnv
from tests.hypervisor.ceph_cluster import CephCluster
from tests.hypervisor.qemu_host import INSTALLATION
from vmapi.extensions import db
from vmapi.models import NodeStorageAccess

pytestmark = [pytest.mark.hypervisor]

GOOD_POOL = f"{INSTALLATION}-rbd-check"
CLOSED_POOL = f"{INSTALLATION}-rbd-check-closed"
#: the cephx user of the type out of reach (libvirt holds one secret per user)
NOWHERE = "nowhere-check"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def remove_ours(conn: libvirt.virConnect, ceph: CephCluster) -> None:
    for pool in conn.listAllStoragePools():
        if pool.name() in (GOOD_POOL, f"{GOOD_POOL}-b", CLOSED_POOL):
            if pool.isActive():
                pool.destroy()
            pool.undefine()
    for secret in conn.listAllSecrets():
        ceph_secret = secret.usageType() == libvirt.VIR_SECRET_USAGE_TYPE_CEPH
        if ceph_secret and secret.usageID() in (f"client.{ceph.user}", f"client.{NOWHERE}"):
            secret.undefine()


def ceph_secrets(conn: libvirt.virConnect) -> list[str]:
    return sorted(
        s.usageID()
        for s in conn.listAllSecrets()
        if s.usageType() == libvirt.VIR_SECRET_USAGE_TYPE_CEPH
    )


@pytest.fixture(scope="module")
def keys(env: BootEnv, ceph: CephCluster, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ceph-keys")
    (folder / f"client.{ceph.user}.key").write_text(ceph.key + "\n")
    (folder / f"client.{NOWHERE}.key").write_text(base64.b64encode(os.urandom(16)).decode())
    before = env.app.config.get("CEPH_KEY_DIR")
    env.app.config["CEPH_KEY_DIR"] = str(folder)
    remove_ours(env.conn, ceph)
    yield folder
    env.app.config["CEPH_KEY_DIR"] = before


@pytest.fixture(scope="module")
def made_types(env: BootEnv, ceph: CephCluster, keys):
    """The module's rbd types (made by the tests); after it: deleted, and their pools and
    secrets gone from the node."""
    made: list[dict] = []
    yield made
    try:
        for storage_type in made:
            gone = env.api.delete(f"storage_type/{storage_type['id']}")
            assert gone.status_code == 200, gone.json
    finally:
        remove_ours(env.conn, ceph)


def make_type(env: BootEnv, made: list, name: str, pool: str, monitors: list[str], user: str):
    body = {"name": name, "description": f"{name} (test)", "pool": pool, "format": "raw",
            "backend": "rbd", "ceph_monitors": monitors, "ceph_pool": "rbd",
            "ceph_user": user}  # fmt: skip
    response = env.api.post("storage_type", json=body)
    assert response.status_code == 201, response.json
    made.append(response.json["data"])
    return response.json["data"]


def check(env: BootEnv):
    return env.app.test_cli_runner().invoke(
        args=["vmapi", "node", "check", "--fqdn", env.node["fqdn"]]
    )


def recorded(env: BootEnv) -> dict[int, bool]:
    with env.app.app_context():
        rows = db.session.execute(
            sa.select(NodeStorageAccess.storage_type_id, NodeStorageAccess.reachable).where(
                NodeStorageAccess.node_id == env.node["id"]
            )
        ).all()
        db.session.remove()
    return dict(rows)


def test_a_node_that_reaches_the_cluster(env: BootEnv, ceph: CephCluster, made_types):
    monitors = [f"{host}:{port}" for host, port in ceph.monitors]
    good = make_type(env, made_types, "ceph-check", GOOD_POOL, monitors, ceph.user)
    result = check(env)
    lines = result.output.splitlines()
    line = next(line for line in lines if "storage type ceph-check:" in line)
    assert line.startswith(f"ceph  {env.node['fqdn']}: storage type ceph-check: rbd pool "
                           f"{GOOD_POOL}: "), result.output  # fmt: skip
    assert "MiB free" in line
    assert "not reaching a Ceph cluster" not in lines[-1]
    assert result.exit_code == 0, result.output
    assert recorded(env) == {good["id"]: True}
    assert env.conn.storagePoolLookupByName(GOOD_POOL).isActive()
    assert f"client.{ceph.user}" in ceph_secrets(env.conn)
    # again: nothing to make, the pool refreshed
    again = check(env)
    assert again.exit_code == 0, again.output
    assert recorded(env) == {good["id"]: True}


def test_a_closed_monitor_port_reports_the_node_unable(env: BootEnv, ceph: CephCluster, made_types):
    closed = make_type(env, made_types, "ceph-check-closed", CLOSED_POOL,
                       [f"127.0.0.1:{_closed_port()}"], NOWHERE)  # fmt: skip
    result = check(env)
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    line = next(line for line in lines if "storage type ceph-check-closed:" in line)
    assert line.startswith(f"CEPH  {env.node['fqdn']}: storage type ceph-check-closed: "
                           f"storage pool {CLOSED_POOL} cannot reach Ceph pool rbd at "
                           "127.0.0.1:"), result.output  # fmt: skip
    assert lines[-1].endswith(", 1 not reaching a Ceph cluster")
    assert recorded(env)[closed["id"]] is False
    # the failed probe left nothing on the node; the good type's are as they were
    names = [p.name() for p in env.conn.listAllStoragePools()]
    assert CLOSED_POOL not in names
    assert f"client.{NOWHERE}" not in ceph_secrets(env.conn)
    good = [t for t in made_types if t["name"] == "ceph-check"]
    if good:
        assert recorded(env)[good[0]["id"]] is True
        assert GOOD_POOL in names
    # the type goes with the test: a check after it (the other test, in any order) meets
    # only its own types
    gone = env.api.delete(f"storage_type/{closed['id']}")
    assert gone.status_code == 200, gone.json
    made_types.remove(closed)


def test_deleting_an_rbd_type_takes_its_pool_and_secret_off_the_nodes(
    env: BootEnv, ceph: CephCluster, made_types
):
    for earlier in list(made_types):  # (the other tests' types, in any order)
        assert env.api.delete(f"storage_type/{earlier['id']}").status_code == 200
        made_types.remove(earlier)
    monitors = [f"{host}:{port}" for host, port in ceph.monitors]
    first = make_type(env, made_types, "ceph-delete-a", GOOD_POOL, monitors, ceph.user)
    second = make_type(env, made_types, "ceph-delete-b", f"{GOOD_POOL}-b", monitors, ceph.user)
    assert check(env).exit_code == 0
    names = [p.name() for p in env.conn.listAllStoragePools()]
    assert {GOOD_POOL, f"{GOOD_POOL}-b"} <= set(names)
    # the first goes: its pool leaves the node; the secret stays, the second names its user
    gone = env.api.delete(f"storage_type/{first['id']}")
    assert gone.status_code == 200, gone.json
    made_types.remove(first)
    names = [p.name() for p in env.conn.listAllStoragePools()]
    assert GOOD_POOL not in names and f"{GOOD_POOL}-b" in names
    assert f"client.{ceph.user}" in ceph_secrets(env.conn)
    # the last type of the user goes: its secret too
    gone = env.api.delete(f"storage_type/{second['id']}")
    assert gone.status_code == 200, gone.json
    made_types.remove(second)
    assert f"{GOOD_POOL}-b" not in [p.name() for p in env.conn.listAllStoragePools()]
    assert f"client.{ceph.user}" not in ceph_secrets(env.conn)
