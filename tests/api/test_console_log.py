"""``GET /vm/<id>/console_log`` on libvirt's test driver: who may read it, its parameters,
the VMs that have none, and its removal with the VM.

The test driver logs no console (its domains have no serial port) and has no volume
download: a log it answers is empty. Reading real output, across virtlogd's rotated
files, is tested on a real libvirtd (tests/hypervisor/test_boot.py).
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from tests.conftest import vm_body
from tests.errors import assert_error
from tests.faults import FaultyDriver
from vmapi.extensions import db
from vmapi.models import Vm
from vmapi.services.nodes.hosts import DRIVER_KEY

pytestmark = pytest.mark.embedded


@pytest.fixture
def vm(api, vm_host, test_method):
    vm_host()
    made = api.post("vm", json=vm_body(test_method, customer_id=7))
    assert made.status_code == 201, made.json
    return made.json["data"]


def recorded(app, vm_id):
    with app.app_context():
        row = db.session.get(Vm, vm_id)
        found = (row.console_log_pool, row.console_log_path)
        db.session.remove()
    return found


def test_every_new_vm_gets_a_log_in_the_log_pool(app, api, vm, driver):
    pool, path = recorded(app, vm["id"])
    assert pool == app.config["CONSOLE_LOG_POOL"]
    # in the pool's directory as the node reports it, named after the domain
    directory = driver.pool_dir(api.get(f"node/{vm['node']['id']}").json["data"]["libvirt_uri"],
                                pool, "/unused")  # fmt: skip
    assert path == f"{directory}/{vm['domain_name']}.log"


def test_a_log_not_written_yet_is_empty(api, vm):
    answer = api.get(f"vm/{vm['id']}/console_log")
    assert answer.status_code == 200, answer.json
    assert answer.json["data"] == {"text": "", "truncated": False}
    plain = api.get(f"vm/{vm['id']}/console_log?bytes=10", headers={"Accept": "text/plain"})
    assert plain.status_code == 200
    assert plain.mimetype == "text/plain"
    assert plain.get_data(as_text=True) == ""
    assert plain.headers["X-Console-Log-Truncated"] == "false"


def test_customers_read_only_their_own_vms_logs(api, customer_api, vm):
    assert customer_api(7).get(f"vm/{vm['id']}/console_log").status_code == 200
    assert_error(customer_api(8).get(f"vm/{vm['id']}/console_log"), 404, "vm/not_found")
    assert_error(api.get("vm/999999/console_log"), 404, "vm/not_found")


@pytest.mark.parametrize("query", ["bytes=0", "bytes=-1", "bytes=x", "bytes=1048577", "lines=5"])
def test_bad_parameters(api, vm, query):
    error = assert_error(api.get(f"vm/{vm['id']}/console_log?{query}"), 400, "general/validation")
    assert set(error["data"]) == {query.split("=")[0]}


def test_the_maximum_is_configured(api, vm):
    assert api.get(f"vm/{vm['id']}/console_log?bytes=1048576").status_code == 200


def test_a_vm_defined_before_logs_has_none_until_it_is_defined_again(app, api, vm):
    with app.app_context():
        db.session.execute(
            sa.update(Vm).where(Vm.id == vm["id"]).values(console_log_pool=None,
                                                           console_log_path=None)
        )  # fmt: skip
        db.session.commit()
        db.session.remove()
    error = assert_error(api.get(f"vm/{vm['id']}/console_log"), 409, "vm/no_console_log")
    assert "next defined" in error["message"]
    # a resize redefines the domain: from then on it has a log
    assert api.update(f"vm/{vm['id']}", json={"cores": 3}).status_code == 200
    assert recorded(app, vm["id"])[1].endswith(f"/{vm['domain_name']}.log")
    assert api.get(f"vm/{vm['id']}/console_log").status_code == 200


def test_delete_removes_the_log_and_says_when_it_could_not(app, api, vm):
    faulty = FaultyDriver(app.extensions[DRIVER_KEY])
    app.extensions[DRIVER_KEY] = faulty
    faulty.fail("delete_log")
    deleted = api.delete(f"vm/{vm['id']}")
    assert deleted.status_code == 200, deleted.json
    assert (
        "console log" in deleted.json["message"] and "injected failure" in deleted.json["message"]
    )
    assert "delete_log" in faulty.calls
    assert api.get(f"vm/{vm['id']}").status_code == 404


def test_a_failure_to_prepare_the_log_leaves_nothing(app, api, vm_host, test_method):
    node = vm_host()
    faulty = FaultyDriver(app.extensions[DRIVER_KEY])
    app.extensions[DRIVER_KEY] = faulty
    faulty.fail("pool_dir")
    error = assert_error(api.post("vm", json=vm_body(test_method)), 502, "vm/hypervisor_error")
    assert error["data"]["step"] == "preparing the console log"
    assert api.get("vm").json["data"] == {}
    assert api.get(f"node/{node['id']}").json["data"]["allocated_cores"] == 0
    assert faulty.real.domains(node["libvirt_uri"]) == []
