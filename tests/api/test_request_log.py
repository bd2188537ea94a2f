"""One JSON line per request, with the request id and token name, never the token."""

import json
import logging

import pytest

pytestmark = pytest.mark.embedded


def lines(caplog):
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "vmapi.request"]


def test_one_line_per_request(api, client, caplog):
    caplog.set_level(logging.INFO, logger="vmapi.request")
    api.get("vm_state", headers={"X-Request-Id": "req-1"})
    client.get("/api/v1/vm_state")  # no token
    first, second = lines(caplog)
    assert first["request_id"] == "req-1" and first["method"] == "GET"
    assert first["path"] == "/api/v1/vm_state" and first["status"] == 200
    assert first["token"].startswith("admin-") and first["duration_ms"] >= 0
    assert second["status"] == 401 and second["token"] is None
    assert api.token not in caplog.text  # the token itself is never logged


@pytest.mark.parametrize("app_config", [{"LOG_REQUESTS": False}])
def test_can_be_switched_off(api, caplog, app_config):
    caplog.set_level(logging.INFO, logger="vmapi.request")
    api.get("vm_state")
    assert lines(caplog) == []
