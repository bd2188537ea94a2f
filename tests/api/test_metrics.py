"""Prometheus metrics at /metrics and the hypervisor-action log (issue 8).

In-process (one process, no PROMETHEUS_MULTIPROC_DIR): the process's own values. The
multiprocess mode under gunicorn is tested in tests/concurrency/test_operations.py.
"""

import json
import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import GIB, Api, make_token, node_body, vm_body
from tests.errors import assert_error


def scrape(client, token=None) -> dict[tuple[str, tuple], float]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "text/plain"
    samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_need_the_admin_token(app, client, api):
    assert_error(client.get("/metrics"), 401, "general/authentication/required")
    customer = Api(client, make_token(app, "customer", 7))
    response = client.get("/metrics", headers=customer.headers())
    assert_error(response, 403, "general/authorization/forbidden")
    assert scrape(client, api.token)


@pytest.mark.parametrize("app_config", [{"METRICS_ALLOW": ["127.0.0.0/8"]}])
def test_an_allowed_network_needs_no_token(client):
    assert scrape(client)  # the test client's peer is 127.0.0.1


@pytest.mark.parametrize("app_config", [{"METRICS_ALLOW": ["10.0.0.0/8"]}])
def test_other_networks_still_need_the_token(client):
    assert_error(client.get("/metrics"), 401, "general/authentication/required")


def test_requests_changes_placement_libvirt_and_capacity(client, api, vm_host, test_method):
    node = vm_host(cores=8, ram=16 * GIB)
    before = scrape(client, api.token)
    route = "/api/<api_version>/vm"
    created = api.post("vm", json=vm_body(test_method))
    assert created.status_code == 201
    assert_error(api.post("vm", json=vm_body(test_method, cores=64)), 409, "vm/no_valid_host")
    after = scrape(client, api.token)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("vmapi_http_requests_total", route=route, method="POST", status="201") == 1
    assert delta("vmapi_http_requests_total", route=route, method="POST", status="409") == 1
    assert delta("vmapi_http_request_duration_seconds_count", route=route, method="POST") == 2
    assert delta("vmapi_changes_total", resource="vm", action="create", outcome="ok") == 1
    assert (
        delta("vmapi_changes_total", resource="vm", action="create", outcome="vm/no_valid_host")
        == 1
    )
    assert delta("vmapi_placement_duration_seconds_count") == 2
    host = node["libvirt_uri"]  # a test-driver URI has no host part: the URI is the label
    for action in ("define", "start", "domain"):
        count = delta("vmapi_libvirt_call_duration_seconds_count", node=host, action=action)
        assert count == 1, action
    fqdn = node["fqdn"]
    assert value(after, "vmapi_node_vcpus", node=fqdn, kind="allocated") == 2
    assert value(after, "vmapi_node_vcpus", node=fqdn, kind="schedulable") == 8
    assert value(after, "vmapi_node_ram_bytes", node=fqdn, kind="allocated") == GIB
    assert value(after, "vmapi_node_ram_bytes", node=fqdn, kind="schedulable") == 16 * GIB
    assert value(after, "vmapi_node_up", node=fqdn) == 1
    assert ("vmapi_db_connections_in_use", ()) in after
    assert value(after, "vmapi_db_connections_open") >= 1


def test_every_hypervisor_action_is_a_json_line(api, vm_host, test_method, caplog):
    vm_host()
    with caplog.at_level(logging.INFO, logger="vmapi.hypervisor"):
        response = api.post("vm", json=vm_body(test_method))
    vm = response.json["data"]
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "vmapi.hypervisor"]
    actions = [line["action"] for line in lines]
    # the console log's pool first (its directory names the log file), then the domain
    assert actions[:4] == ["pool_dir", "define", "start", "domain"]
    for line in lines[1:4]:
        assert line["domain"] == vm["domain_name"]
        assert line["request_id"] == response.headers["X-Request-Id"]
        assert line["result"] == "ok" and line["duration_ms"] >= 0 and line["node"]
    assert "Bearer" not in caplog.text and api.token not in caplog.text


def test_a_failed_hypervisor_action_is_logged_and_counted(
    client, api, test_method, address_pools, caplog
):
    refused = "qemu+tcp://127.0.0.1:1/system"  # nothing listens on port 1
    body = node_body(libvirt_uri=refused, cores=8, ram=16 * GIB, cpu_allocation_ratio=1.0,
                     reserved_ram=0)  # fmt: skip
    node = api.post("node", json=body).json["data"]
    api.post("virt_node", json={"node": {"id": node["id"]}, "virt_method": {"id": test_method}})
    before = scrape(client, api.token)
    with caplog.at_level(logging.INFO, logger="vmapi.hypervisor"):
        response = api.post("vm", json=vm_body(test_method))
    assert response.status_code == 502, response.json
    after = scrape(client, api.token)
    # the create's first call (the console log's pool) is the one that fails
    labels = {"node": "127.0.0.1", "action": "pool_dir", "error": "HypervisorUnavailable"}
    errors = "vmapi_libvirt_errors_total"
    assert value(after, errors, **labels) - value(before, errors, **labels) == 1
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "vmapi.hypervisor"]
    assert {
        "node": "127.0.0.1",
        "action": "pool_dir",
        "result": "HypervisorUnavailable",
    }.items() <= (lines[0].items())


@pytest.mark.parametrize("app_config", [{"LOG_HYPERVISOR": False}])
def test_the_hypervisor_log_can_be_switched_off(api, vm_host, test_method, caplog):
    vm_host()
    with caplog.at_level(logging.INFO, logger="vmapi.hypervisor"):
        assert api.post("vm", json=vm_body(test_method)).status_code == 201
    assert not [r for r in caplog.records if r.name == "vmapi.hypervisor"]
