"""The libvirt connection cache and bounded calls, on the real library."""

import os
import time

import pytest

from tests.api.test_envelope import assert_error
from tests.conftest import GIB, node_body, vm_body
from vmapi.hypervisor import HypervisorTimeout, HypervisorUnavailable
from vmapi.hypervisor.libvirt import LibvirtDriver
from vmapi.hypervisor.libvirt.connection import ConnectionCache


def test_connection_is_reused_while_alive():
    cache = ConnectionCache()
    first = cache.get("test:///default", 5)
    assert cache.get("test:///default", 5) is first
    first.close()  # a dead connection is replaced, not handed out
    assert cache.get("test:///default", 5) is not first
    cache.clear()


def test_cache_forgets_the_parents_connections_after_fork():
    cache = ConnectionCache()
    parent = cache.get("test:///default", 5)
    pid = os.fork()
    if pid == 0:  # the child: a gunicorn worker after the master forked it
        try:
            child = cache.get("test:///default", 5)
            os._exit(0 if child is not parent and child.isAlive() else 1)
        except BaseException:
            os._exit(2)
    _pid, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert cache.get("test:///default", 5) is parent
    cache.clear()


def test_refused_connection_is_unavailable_at_once():
    driver = LibvirtDriver(timeout=5)
    started = time.monotonic()
    with pytest.raises(HypervisorUnavailable):
        driver.host_info("qemu+tcp://127.0.0.1:1/system")
    assert time.monotonic() - started < 5


def test_hung_host_times_out(silent_host):
    driver = LibvirtDriver(timeout=1)
    with pytest.raises(HypervisorTimeout) as info:
        driver.host_info(silent_host)
    assert info.value.timeout == 1


@pytest.mark.parametrize("app_config", [{"LIBVIRT_TIMEOUT": 1.0}])
def test_hung_host_fails_its_request_and_others_keep_working(
    api, vm_host, test_method, silent_host, app_config
):
    hung = api.post("node", json=node_body(libvirt_uri=silent_host, cores=64, ram=64 * GIB,
                                           cpu_allocation_ratio=1.0, reserved_ram=0)).json["data"]  # fmt: skip
    api.post("virt_node", json={"node": {"id": hung["id"]}, "virt_method": {"id": test_method}})
    healthy = vm_host()
    started = time.monotonic()
    error = assert_error(api.post("vm", json=vm_body(test_method)), 504, "vm/hypervisor_timeout")
    assert time.monotonic() - started < 5
    assert error["data"]["node"] == {"id": hung["id"]}  # the most free RAM: picked first
    assert api.get(f"node/{hung['id']}").json["data"]["allocated_cores"] == 0
    vm = api.post("vm", json=vm_body(test_method))  # the hung node is cooling off
    assert vm.status_code == 201
    assert vm.json["data"]["node"] == {"id": healthy["id"]}
