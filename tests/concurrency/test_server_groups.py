"""Server group policies are exact under racing creates: 64 clients create into one
anti-affinity group at once, over fewer nodes than that and over more, against 5 gunicorn
workers; never two members on one node, and the rest are refused with
``vm/no_valid_host`` naming the policy. An affinity group's racing first members all
land on one node.

Each node has room for many VMs: only the policy limits them.
"""

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from tests.concurrency.conftest import SHARED_URI, our_domains
from tests.conftest import GIB, node_body

pytestmark = [pytest.mark.concurrency, pytest.mark.needs_postgres]

CREATES = 64


def setup_fleet(server, nodes):
    """``nodes`` nodes with 16 vCPUs each, the TEST method, address pools; a VM body."""
    status, method = server.call("POST", "virt_method", {"name": "TEST", "domain_type": "test"})
    assert status == 201, method
    body = [{"node": node_body(libvirt_uri=SHARED_URI, cores=16, ram=64 * GIB,
                               cpu_allocation_ratio=1.0, ram_allocation_ratio=1.0,
                               reserved_ram=0),
             "virt_method": {"id": method["data"]["id"]}} for _ in range(nodes)]  # fmt: skip
    status, answer = server.call("POST", "virt_node", body)
    assert status == 201, answer
    pools = [("ipv4", {"network": "198.51.100.0/24", "gateway": "198.51.100.1"}),
             ("ipv6", {"network": "2001:db8:100::/64", "gateway": "2001:db8:100::1"})]  # fmt: skip
    for path, pool in pools:
        assert server.call("POST", path, pool)[0] == 201
    return {"cores": 1, "ram": 256 * 1024 * 1024, "virt_method": {"id": method["data"]["id"]}}


def race(server, body, policy):
    status, group = server.call("POST", "server_group", {"name": "race", "policy": policy})
    assert status == 201, group
    body = {**body, "server_group": {"id": group["data"]["id"]}}
    with ThreadPoolExecutor(CREATES) as pool:
        answers = list(pool.map(lambda _: server.call("POST", "vm", body), range(CREATES)))
    return group["data"]["id"], answers


def members_per_node(server, group_id):
    engine = sa.create_engine(server.db_url.replace("postgresql://", "postgresql+psycopg2://", 1))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT node_id, count(*) FROM vm WHERE server_group_id = :g "
                        "GROUP BY node_id"), {"g": group_id},
            ).all()  # fmt: skip
    finally:
        engine.dispose()
    return dict(rows)


@pytest.mark.parametrize("nodes", [10, 72])
def test_anti_affinity_race_never_puts_two_on_a_node(server, nodes):
    group_id, answers = race(server, setup_fleet(server, nodes), "anti-affinity")
    made = min(nodes, CREATES)
    statuses = Counter(status for status, _ in answers)
    errors = Counter(a.get("error_id") for status, a in answers if status != 201)
    assert statuses == {201: made, **({409: CREATES - made} if made < CREATES else {})}, errors
    placed = [a["data"]["node"]["id"] for status, a in answers if status == 201]
    assert len(set(placed)) == len(placed) == made
    assert set(members_per_node(server, group_id).values()) == {1}
    for status, answer in answers:
        if status != 201:  # every node holds a member: the policy says so, nothing else
            assert answer["error_id"] == "vm/no_valid_host"
            removed = answer["data"]["removed_by_filter"]
            assert removed["anti-affinity"] == nodes == answer["data"]["nodes"]
            assert answer["data"]["request"]["server_group"] == {"id": group_id,
                                                                 "policy": "anti-affinity"}  # fmt: skip
    created = sorted(a["data"]["domain_name"] for s, a in answers if s == 201)
    assert sorted(our_domains(server.installation)) == created


def test_affinity_race_puts_every_member_on_one_node(server):
    body = setup_fleet(server, 6)
    group_id, answers = race(server, {**body, "ram": 64 * 1024 * 1024}, "affinity")
    statuses = Counter(status for status, _ in answers)
    # the first one's node has 16 vCPUs: 16 are made there, the rest refused
    assert statuses == {201: 16, 409: CREATES - 16}, Counter(a.get("error_id") for _, a in answers)
    assert list(members_per_node(server, group_id).values()) == [16]
    for status, answer in answers:
        if status != 201:
            removed = answer["data"]["removed_by_filter"]
            assert (removed["enough_cores"], removed["affinity"]) == (1, 5), removed
