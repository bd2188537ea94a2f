"""A VM or a volume given to another customer: the new owner's storage quota is checked,
and the previous owner's console tokens end."""

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from tests.conftest import GIB, vm_body
from tests.errors import assert_error
from vmapi.extensions import db
from vmapi.models import ConsoleToken

pytestmark = pytest.mark.embedded


@pytest.fixture
def storage_quota(api):
    response = api.post("quota", json={"customer_id": 7, "max_storage": 3 * GIB})
    assert response.status_code == 201, response.json
    return response.json["data"]


def volume(api, vm_id: int, size: int) -> dict:
    body = {"size": size, "vm": {"id": vm_id}, "storage_type": {"id": 1}}
    response = api.post("storage", json=body)
    assert response.status_code == 201, response.json
    return response.json["data"]


def test_a_vm_given_to_a_customer_takes_its_storage_quota(
    api, customer_api, vm_host, test_method, storage_quota
):
    vm_host()
    seven = customer_api(7)
    own = seven.post("vm", json=vm_body(test_method, cores=1, ram=GIB)).json["data"]
    volume(seven, own["id"], 2 * GIB)
    given = api.post("vm", json=vm_body(test_method, cores=1, ram=GIB, customer_id=8)).json["data"]
    volume(api, given["id"], 2 * GIB)
    error = assert_error(
        api.update(f"vm/{given['id']}", json={"customer_id": 7}), 403, "vm/quota_exceeded"
    )
    assert error["data"] == {"quota": "max_storage", "limit": 3 * GIB, "usage": 2 * GIB,
                             "requested": 2 * GIB}  # fmt: skip
    assert api.get(f"vm/{given['id']}").json["data"]["customer_id"] == 8
    # within the quota it moves
    small = api.post("vm", json=vm_body(test_method, cores=1, ram=GIB, customer_id=8)).json["data"]
    volume(api, small["id"], GIB)
    assert api.update(f"vm/{small['id']}", json={"customer_id": 7}).status_code == 200


def test_a_volume_moved_to_a_customers_vm_takes_its_storage_quota(
    api, customer_api, vm_host, test_method, storage_quota
):
    vm_host()
    seven = customer_api(7)
    own = seven.post("vm", json=vm_body(test_method, cores=1, ram=GIB)).json["data"]
    volume(seven, own["id"], 2 * GIB)
    other = api.post("vm", json=vm_body(test_method, cores=1, ram=GIB, customer_id=8)).json["data"]
    big = volume(api, other["id"], 2 * GIB)
    error = assert_error(
        api.update(f"storage/{big['id']}", json={"vm": {"id": own["id"]}}),
        403,
        "storage/quota_exceeded",
    )
    assert error["data"]["requested"] == 2 * GIB and error["data"]["usage"] == 2 * GIB
    assert api.get(f"storage/{big['id']}").json["data"]["vm"] == {"id": other["id"]}
    small = volume(api, other["id"], GIB)
    moved = api.update(f"storage/{small['id']}", json={"vm": {"id": own["id"]}})
    assert moved.status_code == 200, moved.json


def add_token(app, vm_id: int) -> None:
    with app.app_context():
        now = datetime.now(UTC)
        db.session.add(ConsoleToken(vm_id=vm_id, token_hash=ConsoleToken.digest(f"t-{now}"),
                                    created_at=now, expires_at=now + timedelta(minutes=5)))  # fmt: skip
        db.session.commit()


def tokens(app, vm_id: int) -> int:
    with app.app_context():
        stmt = sa.select(sa.func.count()).select_from(ConsoleToken)
        count = db.session.scalar(stmt.where(ConsoleToken.vm_id == vm_id))
        db.session.remove()
        return count


def test_a_vm_given_to_another_customer_ends_its_console_tokens(app, api, vm_host, test_method):
    vm_host()
    vm = api.post("vm", json=vm_body(test_method, cores=1, ram=GIB, customer_id=8)).json["data"]
    add_token(app, vm["id"])
    assert api.update(f"vm/{vm['id']}", json={"cores": 2, "customer_id": 8}).status_code == 200
    assert tokens(app, vm["id"]) == 1  # the same owner keeps its console
    assert api.update(f"vm/{vm['id']}", json={"customer_id": 9}).status_code == 200
    assert tokens(app, vm["id"]) == 0
