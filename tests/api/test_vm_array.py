"""POST /vm with an array: each node's libvirt calls in a thread of their own, all or
nothing across every node (vmapi/services/vms/arrays.py)."""

import logging
import threading

import pytest

from tests.conftest import GIB, vm_body
from tests.errors import assert_error
from tests.faults import FaultyDriver
from vmapi.services.nodes.hosts import DRIVER_KEY

pytestmark = pytest.mark.embedded

#: seconds a barrier waits for the other nodes' calls before the test fails
MEET = 20


@pytest.fixture
def faults(app):
    real = app.extensions[DRIVER_KEY]
    app.extensions[DRIVER_KEY] = FaultyDriver(real)
    return app.extensions[DRIVER_KEY]


@pytest.fixture
def nodes(vm_host):
    """Three nodes, each on a test-driver host of its own."""
    return [vm_host(cores=8, ram=16 * GIB) for _ in range(3)]


def spread(method, nodes, count):
    """``count`` VMs dealt to ``nodes`` in turn: element i goes to node i % len(nodes)."""
    return [vm_body(method, node={"id": nodes[i % len(nodes)]["id"]}) for i in range(count)]


def left_behind(api, nodes, faults):
    """Everything a failed array could leave behind, on every node."""
    return {
        "vms": sorted(api.get("vm").json["data"]),
        "allocated": [
            (data["allocated_cores"], data["allocated_ram"])
            for data in (api.get(f"node/{node['id']}").json["data"] for node in nodes)
        ],
        "domains": [sorted(d.name for d in faults.real.domains(n["libvirt_uri"])) for n in nodes],
    }


def nothing_on(nodes):
    return {"vms": [], "allocated": [(0, 0)] * len(nodes), "domains": [[]] * len(nodes)}


def first_call_meets(faults, method, nodes):
    """Make the first ``method`` call on each node wait until every node has made one:
    it passes only when their calls are in flight at the same time (one node after
    another, the first waits alone and the barrier breaks after MEET seconds)."""
    barrier = threading.Barrier(len(nodes), timeout=MEET)
    seen: set[str] = set()
    lock = threading.Lock()

    def before(name, uri, _args):
        if name != method:
            return
        with lock:
            first = uri not in seen
            seen.add(uri)
        if first:
            barrier.wait()

    faults.before = before
    return barrier


def test_an_array_calls_its_nodes_at_once(api, nodes, test_method, faults, installation):
    barrier = first_call_meets(faults, "define", nodes)
    response = api.post("vm", json=spread(test_method, nodes, 6))
    assert response.status_code == 201, response.json
    assert not barrier.broken
    vms = list(response.json["data"].values())
    assert [vm["node"]["id"] for vm in vms] == [n["id"] for n in nodes] * 2
    # each node's calls ran in one thread of its own, none in the request's thread
    request_thread = threading.get_ident()
    by_node = {
        uri: {thread for name, at, thread in faults.threads if at == uri and name == "define"}
        for uri in (n["libvirt_uri"] for n in nodes)
    }
    assert all(len(threads) == 1 for threads in by_node.values()), by_node
    threads = set().union(*by_node.values())
    assert len(threads) == 3 and request_thread not in threads
    # on a node, its VMs one after another in array order
    for node in nodes:
        defined = [args[0].name for name, args in faults.called if name == "define"
                   and args[0].name in {f"{installation}-vm-{vm['id']}" for vm in vms
                                        if vm["node"]["id"] == node["id"]}]  # fmt: skip
        assert defined == sorted(defined, key=lambda name: int(name.rsplit("-", 1)[1]))
        domains = faults.real.domains(node["libvirt_uri"])
        assert sorted(d.state for d in domains) == ["running", "running"]
    # what a single create records: the console log is on the row
    for vm in vms:
        assert api.get(f"vm/{vm['id']}/console_log").status_code == 200


def test_a_failure_on_one_node_undoes_every_node(api, nodes, test_method, faults):
    first_call_meets(faults, "define", nodes)  # the other nodes are at work meanwhile
    # elements 0, 3 on the first node, 1, 4 on the second, 2, 5 on the third;
    # the second node's second VM (element 4) fails to start
    faults.fail("start", uri=nodes[1]["libvirt_uri"], skip=1)
    error = assert_error(
        api.post("vm", json=spread(test_method, nodes, 6)), 502, "vm/hypervisor_error"
    )
    assert error["data"]["index"] == 4
    assert error["data"]["node"] == {"id": nodes[1]["id"]}
    assert error["data"]["step"] == "starting the domain"
    assert "injected failure" in error["message"]
    assert left_behind(api, nodes, faults) == nothing_on(nodes)
    # every domain defined was removed again, with the console log it may have written
    defined = {args[0].name for name, args in faults.called if name == "define"}
    assert len(defined) >= 5  # the first node's two, the second's two, the third's first
    assert {args[0] for name, args in faults.called if name == "undefine"} == defined
    logs = {args[1] for name, args in faults.called if name == "delete_log"}
    assert logs == {f"{name}.log" for name in defined}
    # the claims are back: the same array fits again
    again = api.post("vm", json=spread(test_method, nodes, 6))
    assert again.status_code == 201, again.json


def test_the_lowest_failing_element_is_named(api, nodes, test_method, faults):
    # element 3 (the first node's second VM) and element 2 (the third node's first) fail;
    # one element after another, element 2 is where the request would have stopped
    faults.fail("define", uri=nodes[0]["libvirt_uri"], skip=1)
    faults.fail("domain", uri=nodes[2]["libvirt_uri"])
    error = assert_error(
        api.post("vm", json=spread(test_method, nodes, 6)), 502, "vm/hypervisor_error"
    )
    assert error["data"]["index"] == 2
    assert error["data"]["node"] == {"id": nodes[2]["id"]}
    assert error["data"]["step"] == "reading the domain's state"
    assert left_behind(api, nodes, faults) == nothing_on(nodes)


def test_a_node_that_fails_its_log_pool_fails_its_first_element(api, nodes, test_method, faults):
    faults.fail("pool_dir", uri=nodes[1]["libvirt_uri"])
    error = assert_error(
        api.post("vm", json=spread(test_method, nodes, 6)), 502, "vm/hypervisor_error"
    )
    assert error["data"]["index"] == 1
    assert error["data"]["step"] == "preparing the console log"
    assert left_behind(api, nodes, faults) == nothing_on(nodes)


def test_a_refused_claim_calls_no_node(api, nodes, test_method, faults):
    body = spread(test_method, nodes, 6)
    body[4]["cores"] = 64  # more than its node has
    error = assert_error(api.post("vm", json=body), 409, "vm/node_unsuitable")
    assert error["data"]["index"] == 4
    assert [name for name in faults.calls if name in ("define", "start")] == []
    assert left_behind(api, nodes, faults) == nothing_on(nodes)


def test_the_hypervisor_log_keeps_the_request_id(api, nodes, test_method, caplog):
    caplog.set_level(logging.INFO, logger="vmapi.hypervisor")
    response = api.post("vm", json=spread(test_method, nodes, 3))
    assert response.status_code == 201, response.json
    lines = [r.getMessage() for r in caplog.records if r.name == "vmapi.hypervisor"]
    assert len(lines) >= 9  # pool_dir, define, start, domain per node
    request_id = response.headers["X-Request-Id"]
    assert all(f'"request_id":"{request_id}"' in line for line in lines), lines


def test_one_thread_makes_an_array_one_node_after_another(app, api, nodes, test_method, faults):
    app.config["ARRAY_NODE_THREADS"] = 1
    response = api.post("vm", json=spread(test_method, nodes, 6))
    assert response.status_code == 201, response.json
    threads = {thread for name, _uri, thread in faults.threads if name == "define"}
    assert len(threads) == 1 and threading.get_ident() not in threads
    uris = [uri for name, uri, _thread in faults.threads if name == "define"]
    assert uris == [n["libvirt_uri"] for n in nodes for _ in range(2)]
