"""Racing clients never overcommit a node, and never leave an extra domain.

200 creates from 64 threads against 5 gunicorn workers, for room for exactly 16 VMs
on 4 nodes. A sampler reads the nodes' allocation while the race runs.
"""

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from tests.concurrency.conftest import SHARED_URI, our_domains
from tests.conftest import GIB, node_body

pytestmark = [pytest.mark.concurrency, pytest.mark.needs_postgres]

NODES, CORES_EACH, REQUESTS, THREADS = 4, 4, 200, 64


def engine_for(url):
    return sa.create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1))


def test_capacity_race(server):
    status, method = server.call("POST", "virt_method", {"name": "TEST", "domain_type": "test"})
    assert status == 201
    for _ in range(NODES):
        body = {"node": node_body(libvirt_uri=SHARED_URI, cores=CORES_EACH, ram=64 * GIB,
                                  cpu_allocation_ratio=1.0, ram_allocation_ratio=1.0, reserved_ram=0),
                "virt_method": {"id": method["data"]["id"]}}  # fmt: skip
        status, answer = server.call("POST", "virt_node", body)
        assert status == 201, answer

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
    body = {"cores": 1, "ram": 256 * 1024 * 1024, "virt_method": {"id": method["data"]["id"]}}
    try:
        with ThreadPoolExecutor(THREADS) as pool:
            answers = list(pool.map(lambda _: server.call("POST", "vm", body), range(REQUESTS)))
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
    created = sorted(a["data"]["name"] for s, a in answers if s == 201)
    assert sorted(our_domains(server.installation)) == created
    engine.dispose()
