"""API.md §1 authentication and authorization on the platform's resources."""

import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, text

from tests.conftest import Api, make_token, node_body
from tests.errors import assert_error
from vmapi.auth import hash_token
from vmapi.extensions import db
from vmapi.models import ApiToken

pytestmark = pytest.mark.embedded

CUSTOMER_READABLE = ["vm_state", "virt_method", "storage_type", "cache_option"]
ADMIN_ONLY = ["node_state", "node", "virt_node"]
SAMPLE_BODIES = {
    "node_state": {"name": "x"},
    "vm_state": {"name": "x"},
    "virt_method": {"name": "x", "domain_type": "test"},
    "storage_type": {"name": "x", "description": "x", "pool": "x", "format": "raw"},
    "cache_option": {"name": "none", "description": "x"},
    "node": node_body(cores=1, ram=2**30),
    "virt_node": {"node": {"id": 1}, "virt_method": {"id": 1}},
}


def test_no_token(client):
    assert_error(client.get("/api/v1/vm_state"), 401, "general/authentication/required")
    assert_error(
        client.get("/api/v1/vm_state", headers={"Authorization": "Basic YTpi"}),
        401,
        "general/authentication/required",
    )
    assert_error(
        client.get("/api/v1/vm_state", headers={"Authorization": "Bearer "}),
        401,
        "general/authentication/required",
    )


def test_unknown_token(client):
    bad = Api(client, "vmapi_not-a-real-token")
    assert_error(bad.get("vm_state"), 401, "general/authentication/failed")
    assert_error(Api(client, "x" * 5000).get("vm_state"), 401, "general/authentication/failed")
    assert_error(Api(client, "ünïcode").get("vm_state"), 401, "general/authentication/failed")


NO_TOKEN_CACHE = pytest.mark.parametrize("app_config", [{"TOKEN_CACHE_SECONDS": 0}])


@NO_TOKEN_CACHE
def test_revoked_token(app, client, runner):
    plain = make_token(app, "admin", name="soon-revoked")
    assert Api(client, plain).get("vm_state").status_code == 200
    result = runner.invoke(args=["vmapi", "token", "revoke", "soon-revoked"])
    assert result.exit_code == 0, result.output
    assert_error(Api(client, plain).get("vm_state"), 401, "general/authentication/failed")


@NO_TOKEN_CACHE
def test_expired_token(app, client):
    plain = make_token(app, "customer", 5, expires_days=1)
    assert Api(client, plain).get("vm_state").status_code == 200
    with app.app_context():
        token = db.session.scalars(
            select(ApiToken).where(ApiToken.token_hash == hash_token(plain))
        ).one()
        token.expires_at = datetime.now(UTC) - timedelta(seconds=1)
        db.session.commit()
    assert_error(Api(client, plain).get("vm_state"), 401, "general/authentication/failed")


def test_only_the_hash_is_stored(app):
    plain = make_token(app, "admin")
    with app.app_context():
        rows = db.session.execute(text("SELECT * FROM api_token")).all()
    assert rows and all(plain not in str(row) for row in rows)
    assert any(hash_token(plain) in str(row) for row in rows)


def test_open_endpoints_need_no_token(client):
    assert client.get("/health").status_code == 200
    assert client.get("/api/v1/openapi.json").status_code == 200


def test_index_needs_a_token(client, api):
    assert_error(client.get("/api/v1/"), 401, "general/authentication/required")
    assert "node" in api.get("/api/v1/").json["data"]


@pytest.mark.parametrize("resource", CUSTOMER_READABLE)
def test_customer_reads_but_does_not_change_catalog(api, customer_api, resource):
    customer = customer_api(7)
    assert customer.get(resource).status_code == 200
    assert customer.get(f"{resource}/1").status_code == 200
    assert_error(
        customer.post(resource, json=SAMPLE_BODIES[resource]),
        403,
        "general/authorization/forbidden",
    )
    assert_error(
        customer.update(f"{resource}/1", json={"name": "y"}), 403, "general/authorization/forbidden"
    )
    assert_error(
        customer.patch(resource, json={"id": 1, "name": "y"}),
        403,
        "general/authorization/forbidden",
    )
    assert_error(customer.delete(f"{resource}/1"), 403, "general/authorization/forbidden")
    assert_error(customer.delete(resource, json={"id": 1}), 403, "general/authorization/forbidden")
    assert api.get(f"{resource}/1").json["data"]["id"] == 1  # unchanged, still there


@pytest.mark.parametrize("resource", ADMIN_ONLY)
def test_admin_only_resources(api, customer_api, make_node, resource):
    make_node()
    if resource == "virt_node":
        assert api.post("virt_node", json=SAMPLE_BODIES["virt_node"]).status_code == 201
    customer = customer_api(7)
    assert_error(customer.get(resource), 403, "general/authorization/forbidden")
    assert_error(customer.get(f"{resource}/1"), 403, "general/authorization/forbidden")
    assert_error(
        customer.post(resource, json=SAMPLE_BODIES[resource]),
        403,
        "general/authorization/forbidden",
    )
    assert_error(customer.update(f"{resource}/1", json={}), 403, "general/authorization/forbidden")
    assert_error(customer.delete(f"{resource}/1"), 403, "general/authorization/forbidden")
    assert api.get(f"{resource}/1").status_code == 200


def test_token_role_wins_over_body(customer_api):
    # a customer cannot escalate by sending admin-looking data
    customer = customer_api(3)
    assert_error(
        customer.post("node_state", json={"name": "x"}), 403, "general/authorization/forbidden"
    )


@pytest.mark.parametrize("app_config", [{"TOKEN_CACHE_SECONDS": 0.5}])
def test_a_revocation_takes_effect_within_the_cache_time(app, client, runner):
    """A worker trusts a verified token for TOKEN_CACHE_SECONDS, then reads it again."""
    plain = make_token(app, "admin", name="cached")
    assert Api(client, plain).get("vm_state").status_code == 200
    assert runner.invoke(args=["vmapi", "token", "revoke", "cached"]).exit_code == 0
    assert Api(client, plain).get("vm_state").status_code == 200  # still trusted
    time.sleep(0.6)
    assert_error(Api(client, plain).get("vm_state"), 401, "general/authentication/failed")


def test_a_cached_token_costs_no_query(app, client, sql_log):
    plain = make_token(app, "admin")
    sql_log.clear()
    assert Api(client, plain).get("vm_state").status_code == 200
    first = [s.statement for s in sql_log]
    sql_log.clear()
    assert Api(client, plain).get("vm_state").status_code == 200
    assert any("api_token" in s for s in first)
    assert not any("api_token" in s.statement for s in sql_log)


def test_expiry_is_checked_on_every_request_even_when_cached(app, client, monkeypatch):
    plain = make_token(app, "customer", 5, expires_days=1)
    assert Api(client, plain).get("vm_state").status_code == 200
    later = datetime.now(UTC) + timedelta(days=2)

    class Tomorrow(datetime):
        @classmethod
        def now(cls, tz=None):
            return later

    monkeypatch.setattr("vmapi.auth.datetime", Tomorrow)
    assert_error(Api(client, plain).get("vm_state"), 401, "general/authentication/failed")
