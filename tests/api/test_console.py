"""POST /vm/<id>/console where a display password cannot be set: libvirt's test driver
has no device updates, so its VMs answer 409 vm/no_console (and nothing is stored).
The console itself is tested on a real libvirtd (tests/hypervisor/test_console_*.py)."""

import pytest
import sqlalchemy as sa

from tests.conftest import node_body, vm_body
from vmapi.extensions import db
from vmapi.models import ConsoleToken

pytestmark = pytest.mark.embedded


def test_a_hypervisor_without_display_passwords_has_no_console(app, api, vm_host, test_method):
    vm_host()
    vm = api.post("vm", json=vm_body(test_method, customer_id=7)).json["data"]
    response = api.post(f"vm/{vm['id']}/console")
    assert response.status_code == 409 and response.json["error_id"] == "vm/no_console"
    assert "not supported" in response.json["data"]["reason"]
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(ConsoleToken)) == 0
        db.session.remove()
    events = api.get(f"event?resource=vm&object_id={vm['id']}&action=console").json["data"]
    assert [e["outcome"] for e in events.values()] == ["vm/no_console"]


def test_only_the_owner_or_an_admin_reaches_a_console(api, customer_api, vm_host, test_method):
    vm_host()
    vm = api.post("vm", json=vm_body(test_method, customer_id=7)).json["data"]
    assert customer_api(7).post(f"vm/{vm['id']}/console").status_code == 409  # reached it
    other = customer_api(8).post(f"vm/{vm['id']}/console")
    assert other.status_code == 404 and other.json["error_id"] == "vm/not_found"
    missing = api.post("vm/999999/console")
    assert missing.status_code == 404 and missing.json["error_id"] == "vm/not_found"
    assert api.get(f"vm/{vm['id']}/console").status_code == 405


@pytest.mark.parametrize("address", ["127.0.0.1", "2001:db8::5", None])
def test_node_console_address(make_node, api, address):
    node = make_node(console_address=address)
    assert node["console_address"] == address


@pytest.mark.parametrize("address", ["localhost", "2001:DB8::5", "10.0.0.1/24", ""])
def test_node_console_address_must_be_a_canonical_address(api, address):
    response = api.post("node", json=node_body(console_address=address))
    assert response.status_code == 400 and "console_address" in response.json["data"]
