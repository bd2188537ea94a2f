"""Host health (issue 8): ``flask vmapi node check`` probes every node in parallel,
records last_seen_at / last_error / unreachable_since, and the scheduler skips nodes
that did not answer until a check reaches them again. Reconcile, too, asks all nodes at
once, so hung hosts cost one timeout in all rather than one each.
"""

import time

import pytest

from tests.conftest import GIB, node_body, vm_body
from tests.errors import assert_error

TIMEOUT = 1.0
HUNG = 4  # in series these would take HUNG x TIMEOUT at least

pytestmark = pytest.mark.parametrize("app_config", [{"LIBVIRT_TIMEOUT": TIMEOUT}])


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


def test_check_marks_hung_nodes_in_bounded_time(api, runner, fleet, app_config):
    healthy, hung = fleet
    started = time.monotonic()
    result = runner.invoke(args=["vmapi", "node", "check"])
    elapsed = time.monotonic() - started
    assert result.exit_code == 1, result.output
    assert elapsed < HUNG * TIMEOUT  # in parallel: about one timeout, not four
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


def test_reconcile_asks_all_nodes_at_once(runner, fleet, app_config):
    started = time.monotonic()
    result = runner.invoke(args=["vmapi", "reconcile"])
    elapsed = time.monotonic() - started
    assert result.output.count("unreachable") == HUNG, result.output
    assert elapsed < HUNG * TIMEOUT
