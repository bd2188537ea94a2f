"""A remote node's displays must listen where the console proxy reaches them: a loopback
or unspecified console_address (or CONSOLE_ADDRESS, when it is null) would send the
proxy to its own host. Refused at node create and update, by POST /vm/<id>/console and by
the proxy. No test here connects to a remote host: the refusals come first."""

from datetime import UTC, datetime, timedelta
from ipaddress import ip_address

import pytest
import sqlalchemy as sa

from tests.conftest import GIB, node_body, vm_body
from tests.errors import assert_error
from vmapi.console_proxy import ConsoleTokens
from vmapi.extensions import db
from vmapi.models import ConsoleToken, Node
from vmapi.services.nodes.hosts import DRIVER_KEY

pytestmark = pytest.mark.embedded

REMOTE = "qemu+tls://hv9.example.com/system"


@pytest.mark.parametrize(
    "address",
    [None, "127.0.0.1", "127.0.1.1", "::1", "0.0.0.0", "::", "0.1.2.3",
     # IPv4-mapped, in the canonical form the schema asks for (Python's own spelling)
     str(ip_address("::ffff:127.0.0.1")), str(ip_address("::ffff:0.0.0.0"))],
)  # fmt: skip
def test_a_remote_node_with_a_this_host_display_address_is_refused(api, address):
    body = node_body(libvirt_uri=REMOTE, console_address=address, cores=4, ram=GIB)
    error = assert_error(api.post("node", json=body), 400, "general/validation")
    (reason,) = error["data"]["console_address"]
    assert "hv9.example.com" in reason and "console_address" in reason
    if address is None:
        assert "CONSOLE_ADDRESS" in reason
    assert api.get("node").json["data"] == {}


@pytest.mark.parametrize("uri", [REMOTE, "qemu+ssh://root@hv9.example.com/system"])
def test_a_remote_node_with_a_reachable_display_address_is_taken(api, uri):
    body = node_body(libvirt_uri=uri, console_address="192.0.2.10", cores=4, ram=GIB)
    assert api.post("node", json=body).status_code == 201


@pytest.mark.parametrize("uri", ["test:///default", "qemu+tcp://127.0.0.1:1/system",
                                 "qemu+ssh://root@localhost/system"])  # fmt: skip
def test_a_local_node_keeps_the_loopback_default(api, uri):
    body = node_body(libvirt_uri=uri, cores=4, ram=GIB)
    assert api.post("node", json=body).status_code == 201


def test_an_update_that_makes_a_node_remote_needs_an_address(api, make_node):
    node = make_node()
    error = assert_error(
        api.update(f"node/{node['id']}", json={"libvirt_uri": REMOTE}), 400, "general/validation"
    )
    assert "console_address" in error["data"]
    changed = {"libvirt_uri": REMOTE, "console_address": "2001:db8::10"}
    assert api.update(f"node/{node['id']}", json=changed).status_code == 200
    error = assert_error(
        api.update(f"node/{node['id']}", json={"console_address": None}), 400, "general/validation"
    )


class NoConnections:
    """Stands in for the driver where a call would go to hv9.example.com: records it."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __getattr__(self, name):
        if not callable(getattr(self.real, name)):
            return getattr(self.real, name)

        def call(uri, *args, **kwargs):
            self.calls.append((name, uri))
            if "example.com" in uri:
                raise AssertionError(f"{name} would have connected to {uri}")
            return getattr(self.real, name)(uri, *args, **kwargs)

        return call


@pytest.fixture
def stale_remote_vm(app, api, vm_host, test_method):
    """A VM on a node stored before the check: remote URI, console_address null."""
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method, customer_id=7)).json["data"]
    with app.app_context():
        db.session.execute(sa.update(Node).where(Node.id == node["id"]).values(libvirt_uri=REMOTE))
        db.session.commit()
        db.session.remove()
    return vm


def test_no_console_url_for_a_display_the_proxy_cannot_reach(app, customer_api, stale_remote_vm):
    driver = NoConnections(app.extensions[DRIVER_KEY])
    app.extensions[DRIVER_KEY] = driver
    error = assert_error(
        customer_api(7).post(f"vm/{stale_remote_vm['id']}/console"), 409, "vm/no_console"
    )
    assert "console_address" in error["message"] and driver.calls == []


def test_the_proxy_refuses_a_remote_nodes_loopback_display(app, stale_remote_vm, caplog):
    token = "t" * 43
    with app.app_context():
        now = datetime.now(UTC)
        db.session.add(ConsoleToken(vm_id=stale_remote_vm["id"], token_hash=ConsoleToken.digest(token),
                                    created_at=now, expires_at=now + timedelta(minutes=5)))  # fmt: skip
        db.session.commit()
        db.session.remove()
    proxy = ConsoleTokens(settings=app.config)
    proxy.driver = NoConnections(proxy.driver)
    assert proxy.lookup(token) is None
    assert proxy.driver.calls == []  # refused before asking hv9 anything
    assert "refused the console" in caplog.text
