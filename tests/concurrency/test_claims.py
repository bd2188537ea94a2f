"""Racing clients never overcommit a node, and never leave an extra domain.

200 creates from 64 threads against 5 gunicorn workers, for room for exactly 16 VMs
on 4 nodes. A sampler reads the nodes' allocation while the race runs.
"""

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import libvirt
import pytest
import sqlalchemy as sa

from tests.concurrency.conftest import SHARED_URI, our_domains
from tests.conftest import GIB, node_body

pytestmark = [pytest.mark.concurrency, pytest.mark.needs_postgres]

NODES, CORES_EACH, REQUESTS, THREADS = 4, 4, 200, 64


def engine_for(url):
    return sa.create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1))


def setup_fleet(server, ipv4_network="198.51.100.0/24"):
    """4 nodes with 4 vCPUs each (room for 16 one-core VMs) and address pools."""
    status, method = server.call("POST", "virt_method", {"name": "TEST", "domain_type": "test"})
    assert status == 201
    for _ in range(NODES):
        body = {"node": node_body(libvirt_uri=SHARED_URI, cores=CORES_EACH, ram=64 * GIB,
                                  cpu_allocation_ratio=1.0, ram_allocation_ratio=1.0, reserved_ram=0),
                "virt_method": {"id": method["data"]["id"]}}  # fmt: skip
        status, answer = server.call("POST", "virt_node", body)
        assert status == 201, answer
    gateway = ipv4_network.replace(".0/", ".1/").split("/")[0]
    assert server.call("POST", "ipv4", {"network": ipv4_network, "gateway": gateway})[0] == 201
    v6 = {"network": "2001:db8:100::/64", "gateway": "2001:db8:100::1"}
    assert server.call("POST", "ipv6", v6)[0] == 201
    return {"cores": 1, "ram": 256 * 1024 * 1024, "virt_method": {"id": method["data"]["id"]}}


def race(server, body):
    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(lambda _: server.call("POST", "vm", body), range(REQUESTS)))


def test_capacity_race(server):
    body = setup_fleet(server)

    engine = engine_for(server.db_url)
    stop = threading.Event()
    samples, overcommits = [], []

    def sample():
        with engine.connect() as conn:
            while not stop.is_set():
                rows = conn.execute(sa.text("SELECT id, allocated_cores, cores FROM node")).all()
                samples.append(rows)
                overcommits.extend(r for r in rows if r.allocated_cores > r.cores)
                conn.commit()

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        answers = race(server, body)
    finally:
        stop.set()
        sampler.join()

    statuses = Counter(status for status, _ in answers)
    errors = Counter(a.get("error_id") for status, a in answers if status != 201)
    assert statuses == {201: NODES * CORES_EACH, 409: REQUESTS - NODES * CORES_EACH}, (
        statuses,
        errors,
    )
    assert errors == {"vm/no_valid_host": REQUESTS - NODES * CORES_EACH}
    assert len(samples) > 5 and overcommits == []
    with engine.connect() as conn:
        per_node = conn.execute(sa.text(
            "SELECT n.id, n.allocated_cores, n.cores, coalesce(sum(v.cores), 0) AS used"
            " FROM node n LEFT JOIN vm v ON v.node_id = n.id GROUP BY n.id"
        )).all()  # fmt: skip
    assert all(r.allocated_cores == r.cores == r.used for r in per_node), per_node
    created = sorted(a["data"]["domain_name"] for s, a in answers if s == 201)
    assert sorted(our_domains(server.installation)) == created
    # the audit trail matches what happened, exactly: one create per VM, one refusal per
    # 409, one address hand-out per VM (issue 8)
    with engine.connect() as conn:
        trail = Counter(conn.execute(sa.text(
            "SELECT resource, action, outcome FROM event WHERE resource IN ('vm', 'ipv4')"
        )).all())  # fmt: skip
    made = NODES * CORES_EACH
    assert trail[("vm", "create", "ok")] == made
    assert trail[("vm", "create", "vm/no_valid_host")] == REQUESTS - made
    assert trail[("ipv4", "update", "ok")] == made
    engine.dispose()


def test_address_exhaustion_race(server):
    """Room for 16 VMs, but a /28 holds 13 free IPv4 addresses (14 hosts less the gateway)."""
    body = setup_fleet(server, ipv4_network="192.0.2.0/28")
    answers = race(server, body)
    statuses = Counter(status for status, _ in answers)
    errors = Counter(a.get("error_id") for status, a in answers if status != 201)
    assert statuses == {201: 13, 409: REQUESTS - 13}, (statuses, errors)
    assert errors == {"vm/no_free_ipv4": REQUESTS - 13}
    engine = engine_for(server.db_url)
    with engine.connect() as conn:
        held = conn.execute(
            sa.text("SELECT address, interface_id FROM ipv4_address WHERE interface_id IS NOT NULL")
        ).all()
        v6 = conn.execute(
            sa.text("SELECT address FROM ipv6_address WHERE interface_id IS NOT NULL")
        ).all()
        ifaces = conn.execute(sa.text("SELECT count(*) FROM interface")).scalar()
        cores = conn.execute(sa.text("SELECT sum(allocated_cores) FROM node")).scalar()
    engine.dispose()
    assert len(held) == 13 and len({a for a, _ in held}) == 13 and len({i for _, i in held}) == 13
    assert len(v6) == 13 == len({a for (a,) in v6}) == ifaces
    assert cores == 13  # the losers' claims were rolled back with their address
    created = sorted(a["data"]["domain_name"] for s, a in answers if s == 201)
    assert sorted(our_domains(server.installation)) == created


def test_idempotent_retries_racing(server):
    """32 clients send one create with one Idempotency-Key at once: one VM, one answer."""
    body = setup_fleet(server)
    headers = {"Idempotency-Key": "race-1"}
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda _: server.call("POST", "vm", body, headers), range(32)))
    assert {status for status, _ in answers} == {201}, Counter(s for s, _ in answers)
    assert len({a["data"]["id"] for _, a in answers}) == 1
    assert len(our_domains(server.installation)) == 1
    status, listing = server.call("GET", "vm")
    assert status == 200 and len(listing["data"]) == 1


def test_quota_race(server):
    """Room for 16, but customer 7 may have 5 VMs: 64 threads race, exactly 5 are made."""
    body = {**setup_fleet(server), "customer_id": 7}
    assert server.call("POST", "quota", {"customer_id": 7, "max_vms": 5})[0] == 201
    answers = race(server, body)
    statuses = Counter(status for status, _ in answers)
    errors = Counter(a.get("error_id") for status, a in answers if status != 201)
    assert statuses == {201: 5, 403: REQUESTS - 5}, (statuses, errors)
    assert errors == {"vm/quota_exceeded": REQUESTS - 5}
    assert len(our_domains(server.installation)) == 5


def test_resizes_and_deletes_racing(server):
    """Concurrent resizes and deletes of the same VMs: what remains is exactly what is claimed."""
    body = setup_fleet(server)
    made = [server.call("POST", "vm", body)[1]["data"]["id"] for _ in range(8)]
    ops = []
    for vm_id in made:
        ops += [("UPDATE", f"vm/{vm_id}", {"cores": 2}), ("UPDATE", f"vm/{vm_id}", {"cores": 1, "ram": 512 * 1024 * 1024}),
                ("UPDATE", f"vm/{vm_id}", {"cores": 3}), ("DELETE", f"vm/{vm_id}", None)]  # fmt: skip
    ops += ops[:16]  # the same VMs again, racing their own deletes
    with ThreadPoolExecutor(THREADS) as pool:
        answers = list(pool.map(lambda op: server.call(*op), ops))
    assert all(status < 500 for status, _ in answers), [a for s, a in answers if s >= 500]
    engine = engine_for(server.db_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT n.id, n.allocated_cores, n.allocated_ram, n.free_cores, n.cores,"
            " coalesce(sum(v.cores), 0) AS cores_used, coalesce(sum(v.ram), 0) AS ram_used"
            " FROM node n LEFT JOIN vm v ON v.node_id = n.id GROUP BY n.id"
        )).all()  # fmt: skip
    engine.dispose()
    for row in rows:
        assert (row.allocated_cores, row.allocated_ram) == (row.cores_used, row.ram_used), row
        assert row.free_cores == row.cores - row.allocated_cores, row
    _status, listing = server.call("GET", "vm")
    assert sorted(v["domain_name"] for v in listing["data"].values()) == sorted(
        our_domains(server.installation)
    )


def test_storage_creates_on_one_vm_racing(server):
    """Twelve volumes at once on one VM: distinct devices, no stray volume."""
    body = setup_fleet(server)
    vm = server.call("POST", "vm", body)[1]["data"]
    disk = {"size": 64 * 1024 * 1024, "vm": {"id": vm["id"]}, "storage_type": {"id": 1}}
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: server.call("POST", "storage", disk), range(12)))
    assert {status for status, _ in answers} == {201}, answers
    engine = engine_for(server.db_url)
    with engine.connect() as conn:
        targets = (
            conn.execute(sa.text("SELECT target FROM storage WHERE vm_id = :v"), {"v": vm["id"]})
            .scalars()
            .all()
        )
    engine.dispose()
    assert len(targets) == len(set(targets)) == 12
    conn = libvirt.open(SHARED_URI)
    try:
        pool = conn.storagePoolLookupByName("vmapi")
        pool.refresh(0)
        ids = {a["data"]["id"] for _, a in answers}
        ours = f"{server.installation}-storage-"
        volumes = {v.name() for v in pool.listAllVolumes() if v.name().startswith(ours)}
        assert volumes == {f"{ours}{i}" for i in ids}  # every one, and no stray one
    finally:
        conn.close()
    assert server.call("DELETE", f"vm/{vm['id']}?cascade=storage")[0] == 200
