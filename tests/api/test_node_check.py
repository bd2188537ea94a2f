"""Host health (issue 8): ``flask vmapi node check`` probes every node in parallel,
records last_seen_at / last_error / unreachable_since, and the scheduler skips nodes
that did not answer until a check reaches them again. Reconcile, too, asks all nodes at
once, so hung hosts cost one timeout in all rather than one each.

That the calls overlap is shown by a barrier, not by the clock: each node's call waits
until every node's call has begun, which only calls in flight together can pass. (How
long a check takes belongs to ``make bench``.)
"""

import threading

import pytest

from tests.conftest import GIB, node_body, vm_body
from tests.errors import assert_error
from tests.faults import FaultyDriver
from vmapi.services.nodes.hosts import DRIVER_KEY

TIMEOUT = 1.0
HUNG = 4
#: seconds a call waits at the barrier for the others before the test fails
MEET = 20

pytestmark = pytest.mark.parametrize("app_config", [{"LIBVIRT_TIMEOUT": TIMEOUT}])


@pytest.fixture
def faults(app):
    real = app.extensions[DRIVER_KEY]
    app.extensions[DRIVER_KEY] = FaultyDriver(real)
    return app.extensions[DRIVER_KEY]


def calls_meet(faults, method, parties):
    """Make the first ``parties`` calls of ``method`` wait until all of them have begun:
    only calls in flight at the same time pass (one after another, the first waits alone
    and the barrier breaks after MEET seconds). The hung nodes share one URI: calls are
    counted, not hosts."""
    barrier = threading.Barrier(parties, timeout=MEET)
    waiting = iter(range(parties))
    lock = threading.Lock()

    def before(name, _uri, _args):
        if name != method:
            return
        with lock:
            turn = next(waiting, None)
        if turn is not None:
            barrier.wait()

    faults.before = before
    return barrier


@pytest.fixture
def fleet(api, vm_host, test_method, silent_host):
    healthy = vm_host()
    hung = []
    for _ in range(HUNG):
        body = node_body(libvirt_uri=silent_host, cores=64, ram=64 * GIB,
                         cpu_allocation_ratio=1.0, reserved_ram=0)  # fmt: skip
        node = api.post("node", json=body).json["data"]
        api.post("virt_node", json={"node": {"id": node["id"]}, "virt_method": {"id": test_method}})
        hung.append(node)
    return healthy, hung


def test_check_probes_every_node_at_once_and_marks_the_hung_ones(
    api, runner, fleet, faults, app_config
):
    healthy, hung = fleet
    barrier = calls_meet(faults, "host_info", HUNG + 1)
    result = runner.invoke(args=["vmapi", "node", "check"])
    assert not barrier.broken, "the nodes were not probed at the same time"
    assert result.exit_code == 1, result.output
    assert [name for name in faults.calls if name == "host_info"] == ["host_info"] * (HUNG + 1)
    assert f"ok    {healthy['fqdn']}" in result.output
    assert result.output.count("DOWN") == HUNG
    assert f"{HUNG + 1} node(s), {HUNG} unreachable" in result.output
    seen = api.get(f"node/{healthy['id']}").json["data"]
    assert seen["last_seen_at"] and seen["unreachable_since"] is None and seen["last_error"] is None
    for node in hung:
        data = api.get(f"node/{node['id']}").json["data"]
        assert data["unreachable_since"] and data["last_seen_at"] is None
        assert data["last_error"] == f"no answer within {TIMEOUT:g} s"


def test_the_scheduler_skips_unreachable_nodes_until_they_answer(
    api, runner, fleet, test_method, host_uri, app_config
):
    healthy, hung = fleet
    runner.invoke(args=["vmapi", "node", "check"])
    since = api.get(f"node/{hung[0]['id']}").json["data"]["unreachable_since"]
    # Without the check the hung nodes (most free RAM) would be picked first.
    for _ in range(3):
        vm = api.post("vm", json=vm_body(test_method, cores=1))
        assert vm.status_code == 201, vm.json
        assert vm.json["data"]["node"] == {"id": healthy["id"]}
    error = assert_error(api.post("vm", json=vm_body(test_method, cores=16)), 409,
                         "vm/no_valid_host")  # fmt: skip
    assert error["data"]["removed_by_filter"]["libvirt_reachable"] == HUNG
    # a second failed check keeps the first failure's time
    runner.invoke(args=["vmapi", "node", "check", "--fqdn", hung[0]["fqdn"]])
    assert api.get(f"node/{hung[0]['id']}").json["data"]["unreachable_since"] == since
    # the host is repaired: the next check clears the mark and it takes VMs again
    fixed = api.update(
        f"node/{hung[0]['id']}", json={"libvirt_uri": host_uri(cores=64, ram=64 * GIB)}
    )
    assert fixed.status_code == 200, fixed.json
    result = runner.invoke(args=["vmapi", "node", "check", "--fqdn", hung[0]["fqdn"]])
    assert result.exit_code == 0, result.output
    data = api.get(f"node/{hung[0]['id']}").json["data"]
    assert data["unreachable_since"] is None and data["last_seen_at"]
    vm = api.post("vm", json=vm_body(test_method, cores=16))
    assert vm.status_code == 201 and vm.json["data"]["node"] == {"id": hung[0]["id"]}


def test_reconcile_asks_all_nodes_at_once(runner, fleet, faults, app_config):
    barrier = calls_meet(faults, "domains", HUNG + 1)
    result = runner.invoke(args=["vmapi", "reconcile"])
    assert not barrier.broken, "the nodes were not asked at the same time"
    assert result.exit_code == 1, result.output
    assert result.output.count("unreachable") == HUNG, result.output
    assert [name for name in faults.calls if name == "domains"] == ["domains"] * (HUNG + 1)
