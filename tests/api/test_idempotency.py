"""Idempotency-Key on POST /vm and /storage: one create, the first answer replayed."""

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from tests.conftest import GIB, vm_body
from tests.errors import assert_error
from vmapi.extensions import db
from vmapi.models import IdempotencyKey

pytestmark = pytest.mark.embedded


def test_repeat_answers_the_first_answer_and_creates_nothing(api, vm_host, test_method, driver):
    node = vm_host()
    first = api.post("vm", json=vm_body(test_method), headers={"Idempotency-Key": "order-17"})
    again = api.post("vm", json=vm_body(test_method), headers={"Idempotency-Key": "order-17"})
    assert first.status_code == again.status_code == 201
    assert again.get_data() == first.get_data()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(api.get("vm").json["data"]) == 1
    assert len(driver.domains(node["libvirt_uri"])) == 1


def test_key_order_in_the_body_does_not_matter(api, vm_host, test_method):
    vm_host()
    body = vm_body(test_method)
    api.post("vm", json=body, headers={"Idempotency-Key": "k"})
    again = api.post(
        "vm", json=dict(reversed(list(body.items()))), headers={"Idempotency-Key": "k"}
    )
    assert again.headers.get("Idempotent-Replayed") == "true"


def test_same_key_other_body_is_a_conflict(api, vm_host, test_method):
    vm_host()
    api.post("vm", json=vm_body(test_method), headers={"Idempotency-Key": "k"})
    assert_error(
        api.post("vm", json=vm_body(test_method, cores=1), headers={"Idempotency-Key": "k"}),
        409,
        "general/idempotency_conflict",
    )
    assert len(api.get("vm").json["data"]) == 1


def test_an_error_answer_is_replayed_too(api, vm_host, test_method):
    vm_host(cores=1)
    first = api.post("vm", json=vm_body(test_method), headers={"Idempotency-Key": "big"})
    assert first.status_code == 409 and "Idempotent-Replayed" not in first.headers
    again = api.post("vm", json=vm_body(test_method), headers={"Idempotency-Key": "big"})
    assert again.get_data() == first.get_data() and again.status_code == 409
    assert again.headers["Idempotent-Replayed"] == "true"


def test_keys_are_per_token(app, api, customer_api, vm_host, test_method):
    vm_host()
    seven = customer_api(7)
    api.post("vm", json=vm_body(test_method), headers={"Idempotency-Key": "same"})
    mine = seven.post("vm", json=vm_body(test_method), headers={"Idempotency-Key": "same"})
    assert mine.status_code == 201 and "Idempotent-Replayed" not in mine.headers
    assert len(api.get("vm").json["data"]) == 2


def test_expired_keys_run_again(app, api, vm_host, test_method):
    vm_host()
    api.post("vm", json=vm_body(test_method), headers={"Idempotency-Key": "old"})
    with app.app_context():
        db.session.execute(
            sa.update(IdempotencyKey).values(created_at=datetime.now(UTC) - timedelta(days=2))
        )
        db.session.commit()
    again = api.post("vm", json=vm_body(test_method), headers={"Idempotency-Key": "old"})
    assert again.status_code == 201 and "Idempotent-Replayed" not in again.headers
    assert len(api.get("vm").json["data"]) == 2


def test_storage_is_idempotent(api, vm_host, test_method):
    vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    body = {"size": GIB, "vm": {"id": vm["id"]}, "storage_type": {"id": 1}}
    first = api.post("storage", json=body, headers={"Idempotency-Key": "disk-1"})
    again = api.post("storage", json=body, headers={"Idempotency-Key": "disk-1"})
    assert again.get_data() == first.get_data() and len(api.get("storage").json["data"]) == 1


@pytest.mark.parametrize("key", ["", "a b", "x" * 256, "ünï"])
def test_key_shape(api, vm_host, test_method, key):
    vm_host()
    assert_error(
        api.post("vm", json=vm_body(test_method), headers={"Idempotency-Key": key}),
        400,
        "general/validation",
    )
    assert api.get("vm").json["data"] == {}


def lose_the_answer(app):
    """As a request that died after its commit, before its answer was stored."""
    with app.app_context():
        db.session.execute(sa.update(IdempotencyKey).values(status_code=None, body=None,
                                                            mimetype=None))  # fmt: skip
        db.session.commit()


def test_a_committed_vm_whose_answer_was_lost_is_answered(app, api, vm_host, test_method):
    vm_host()
    first = api.post("vm", json=vm_body(test_method), headers={"Idempotency-Key": "k"})
    lose_the_answer(app)
    again = api.post("vm", json=vm_body(test_method), headers={"Idempotency-Key": "k"})
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json["data"]["id"] == first.json["data"]["id"]
    assert len(api.get("vm").json["data"]) == 1


def test_an_array_whose_answer_was_lost_is_answered_keyed(app, api, vm_host, test_method):
    vm_host()
    body = [vm_body(test_method), vm_body(test_method)]
    first = api.post("vm", json=body, headers={"Idempotency-Key": "k"})
    assert first.status_code == 201
    lose_the_answer(app)
    again = api.post("vm", json=body, headers={"Idempotency-Key": "k"})
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert sorted(again.json["data"]) == sorted(first.json["data"])
    assert len(api.get("vm").json["data"]) == 2


def test_storage_whose_answer_was_lost_is_answered(app, api, vm_host, test_method):
    vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    body = {"size": GIB, "vm": {"id": vm["id"]}, "storage_type": {"id": 1}}
    first = api.post("storage", json=body, headers={"Idempotency-Key": "disk-1"})
    lose_the_answer(app)
    again = api.post("storage", json=body, headers={"Idempotency-Key": "disk-1"})
    assert again.status_code == 201 and again.json["data"]["id"] == first.json["data"]["id"]
    assert len(api.get("storage").json["data"]) == 1


def test_a_made_vm_deleted_since_is_made_anew(app, api, vm_host, test_method):
    """What the key names was undone (or deleted): nothing is left to answer, so it runs."""
    vm_host()
    first = api.post("vm", json=vm_body(test_method), headers={"Idempotency-Key": "k"})
    lose_the_answer(app)
    api.delete(f"vm/{first.json['data']['id']}")
    again = api.post("vm", json=vm_body(test_method), headers={"Idempotency-Key": "k"})
    assert again.status_code == 201 and "Idempotent-Replayed" not in again.headers
    assert len(api.get("vm").json["data"]) == 1
