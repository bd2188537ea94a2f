"""One operation at a time per VM (PostgreSQL advisory locks)."""

import pytest
import sqlalchemy as sa

from tests.conftest import vm_body
from tests.errors import assert_error
from vmapi.extensions import db
from vmapi.services.locks import LOCK_SPACE


@pytest.mark.parametrize("app_config", [{"VM_LOCK_TIMEOUT": 0.5}])
def test_a_busy_vm_answers_409_and_others_go_on(app, api, vm_host, test_method, app_config):
    vm_host()
    busy, free = (
        api.post("vm", json=[vm_body(test_method, cores=1), vm_body(test_method, cores=1)])
        .json["data"]
        .values()
    )
    with app.app_context():
        holder = db.engine.connect()  # another request's operation on `busy`
        holder.execute(sa.select(sa.func.pg_advisory_lock(LOCK_SPACE, busy["id"])))
        try:
            error = assert_error(api.update(f"vm/{busy['id']}", json={"cores": 2}), 409, "vm/busy")
            assert error["data"] == {"vm": {"id": busy["id"]}}
            assert_error(api.delete(f"vm/{busy['id']}"), 409, "vm/busy")
            assert_error(api.post(f"vm/{busy['id']}/reboot"), 409, "vm/busy")
            assert api.update(f"vm/{free['id']}", json={"cores": 2}).status_code == 200
            # an array that includes the busy VM changes none of them
            assert_error(
                api.update(
                    "vm", json=[{"id": free["id"], "cores": 1}, {"id": busy["id"], "cores": 2}]
                ),
                409,
                "vm/busy",
            )
            assert api.get(f"vm/{free['id']}").json["data"]["cores"] == 2
        finally:
            holder.execute(sa.select(sa.func.pg_advisory_unlock_all()))
            holder.close()
    assert api.update(f"vm/{busy['id']}", json={"cores": 2}).status_code == 200
