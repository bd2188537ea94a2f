"""POST /vm/<id>/console on a real libvirtd: the display password set live (a device
update, which libvirt's test driver cannot do), tokens kept hashed, roles, expiry,
redaction, invalidation, and the proxy plugin's lookup of the display's current port.

Disk-less QEMU domains (tests/hypervisor/consoles.py): the firmware is enough for a display.
"""

import hashlib
import json
import logging
import socket
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from urllib.parse import unquote

import libvirt
import pytest
import sqlalchemy as sa

from tests.hypervisor.consoles import (  # noqa: F401 - the fixtures
    URI,
    app_config_fixture,
    conn_fixture,
    make_vm,
    qemu_node_fixture,
    vnc_graphics,
)
from tests.vnc import RfbClient, TcpTransport, VncRefused
from vmapi.console_proxy import ConsoleTokens
from vmapi.extensions import db
from vmapi.hypervisor.libvirt.config import VALID_TO_FORMAT
from vmapi.models import ConsoleToken
from vmapi.services.consoles.tokens import invalidate_console_tokens

pytestmark = [pytest.mark.hypervisor]


def open_console(api, vm_id, **kw):
    response = api.post(f"vm/{vm_id}/console", **kw)
    assert response.status_code == 201, response.json
    return response.json["data"]


def login(port: int, password: str):
    client = RfbClient(TcpTransport("127.0.0.1", port))
    try:
        assert client.greeting() == b"RFB 003.008\n"
        return client.login(password)
    finally:
        client.close()


def live_port(conn, name: str) -> int:
    return int(vnc_graphics(conn, name).get("port"))


def token_rows(app) -> list:
    with app.app_context():
        rows = db.session.execute(sa.select(ConsoleToken)).scalars().all()
        db.session.remove()
        return rows


@pytest.fixture
def proxy(app):
    """The console proxy's plugin, as websockify loads it, with the test app's settings."""
    return ConsoleTokens(settings=app.config)


def test_every_display_is_sealed_from_the_start(api, qemu_node, conn):
    vm = make_vm(api, qemu_node)
    secure = vnc_graphics(conn, vm["domain_name"], libvirt.VIR_DOMAIN_XML_SECURE)
    inactive = vnc_graphics(conn, vm["domain_name"],
                            libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_INACTIVE)  # fmt: skip
    for graphics in (secure, inactive):
        assert graphics.get("autoport") == "yes"
        assert graphics.get("listen") == "127.0.0.1"  # CONSOLE_ADDRESS: the node has none
        assert len(graphics.get("passwd")) == 8
        assert graphics.get("passwdValidTo") == "2000-01-01T00:00:00"
    assert vnc_graphics(conn, vm["domain_name"]).get("passwd") is None  # libvirt hides it
    # The password nobody is told has expired before the domain started: no way in.
    with pytest.raises(VncRefused):
        login(live_port(conn, vm["domain_name"]), secure.get("passwd"))


def test_a_node_console_address_is_where_displays_listen(api, qemu_node, conn):
    api.update(f"node/{qemu_node['node']}", json={"console_address": "127.0.0.2"})
    assert api.get(f"node/{qemu_node['node']}").json["data"]["console_address"] == "127.0.0.2"
    vm = make_vm(api, qemu_node)
    graphics = vnc_graphics(conn, vm["domain_name"])
    assert graphics.get("listen") == "127.0.0.2"
    assert graphics.find("listen").get("address") == "127.0.0.2"
    response = api.update(f"node/{qemu_node['node']}", json={"console_address": "localhost"})
    assert response.status_code == 400 and "console_address" in response.json["data"]


def test_console_sets_a_live_password_until_the_token_expires(app, api, qemu_node, conn):
    vm = make_vm(api, qemu_node)
    before = datetime.now(UTC).replace(microsecond=0)
    answer = open_console(api, vm["id"])
    assert set(answer) == {"url", "token", "password", "expires_at"}
    expires = datetime.fromisoformat(answer["expires_at"])
    assert expires.microsecond == 0 and expires.tzinfo is not None
    assert before + timedelta(seconds=120) <= expires <= datetime.now(UTC) + timedelta(seconds=120)
    password = answer["password"]
    assert len(password) == 8 and password.isalnum()
    # the live display has it, valid to the token's expiry; the definition stays sealed
    live = vnc_graphics(conn, vm["domain_name"], libvirt.VIR_DOMAIN_XML_SECURE)
    assert live.get("passwd") == password
    assert live.get("passwdValidTo") == expires.astimezone(UTC).strftime(VALID_TO_FORMAT)
    config = vnc_graphics(conn, vm["domain_name"],
                          libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_INACTIVE)  # fmt: skip
    assert config.get("passwd") != password
    assert login(live_port(conn, vm["domain_name"]), password).width > 0
    with pytest.raises(VncRefused):
        login(live_port(conn, vm["domain_name"]), "wrong-pw")
    # only the token's hash is stored, with the VM and the expiry
    (row,) = token_rows(app)
    assert row.vm_id == vm["id"]
    assert row.token_hash == hashlib.sha256(answer["token"].encode()).hexdigest()
    assert row.expires_at == expires
    # the URL: noVNC beside the API, token and password in the fragment only
    page, _, fragment = answer["url"].partition("#")
    assert page == "http://localhost/console/vnc.html"
    assert unquote(fragment).split("&")[3:] == [
        f"path=console/websockify?token={answer['token']}", f"password={password}"]  # fmt: skip


def test_a_password_past_its_expiry_is_refused_by_the_display(app, api, qemu_node, conn, driver):
    """The expiry the console sets is QEMU's own: after it, the password opens nothing."""
    vm = make_vm(api, qemu_node)
    port = live_port(conn, vm["domain_name"])
    past = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    driver.set_display_password(URI, vm["domain_name"], "Expired1", past)
    with pytest.raises(VncRefused):
        login(port, "Expired1")
    driver.set_display_password(URI, vm["domain_name"], "Current1", past + timedelta(hours=1))
    assert login(port, "Current1").height > 0


def test_customers_open_consoles_of_their_own_vms_only(api, customer_api, qemu_node, client):
    mine = make_vm(api, qemu_node, customer_id=7)
    assert open_console(customer_api(7), mine["id"])["password"]
    other = customer_api(8).post(f"vm/{mine['id']}/console")
    assert other.status_code == 404 and other.json["error_id"] == "vm/not_found"
    anonymous = client.post(f"/api/v1/vm/{mine['id']}/console")
    assert anonymous.status_code == 401
    body = api.post(f"vm/{mine['id']}/console", json={"ttl": 5})
    assert body.status_code == 400 and body.json["error_id"] == "general/validation"


def test_no_secret_in_the_audit_trail_or_the_logs(api, customer_api, qemu_node, caplog):
    caplog.set_level(logging.DEBUG)
    vm = make_vm(api, qemu_node, customer_id=7)
    answer = open_console(customer_api(7), vm["id"])
    refused = customer_api(8).post(f"vm/{vm['id']}/console")
    assert refused.status_code == 404
    events = api.get(f"event?resource=vm&object_id={vm['id']}&action=console").json["data"]
    ok, failed = sorted(events.values(), key=lambda e: e["id"])
    assert ok["outcome"] == "ok" and ok["customer_id"] == 7 and ok["before"] is None
    assert set(ok["after"]) == {"console_token", "expires_at"}
    assert ok["after"]["expires_at"] == datetime.fromisoformat(answer["expires_at"]).isoformat()
    assert failed["outcome"] == "vm/not_found" and failed["status"] == 404
    # the customer sees its own console event
    assert str(ok["id"]) in customer_api(7).get("event?action=console").json["data"]
    trail = json.dumps(api.get("event?limit=1000").json)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "vmapi.request" in {r.name for r in caplog.records}  # the request log ran
    for secret in (answer["token"], answer["password"], ConsoleToken.digest(answer["token"])):
        assert secret not in trail
        assert secret not in logged


def test_a_new_console_ends_the_older_tokens(api, qemu_node, conn, proxy):
    vm = make_vm(api, qemu_node)
    first = open_console(api, vm["id"])
    second = open_console(api, vm["id"])
    assert proxy.lookup(first["token"]) is None
    assert proxy.lookup(second["token"]) == ("127.0.0.1", live_port(conn, vm["domain_name"]))
    with pytest.raises(VncRefused):  # one password per display: the new one
        login(live_port(conn, vm["domain_name"]), first["password"])


def test_the_proxy_asks_libvirt_for_the_current_port(api, qemu_node, conn, proxy):
    vm = make_vm(api, qemu_node)
    answer = open_console(api, vm["id"])
    old_port = live_port(conn, vm["domain_name"])
    assert proxy.lookup(answer["token"]) == ("127.0.0.1", old_port)
    # Restart the domain while its old port is taken: it comes back on another one.
    stop = api.update(f"vm/{vm['id']}?force=true", json={"vm_state": {"id": 4}})
    assert stop.status_code == 200
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAITs
        squatter.bind(("127.0.0.1", old_port))
        squatter.listen(1)
        assert api.update(f"vm/{vm['id']}", json={"vm_state": {"id": 2}}).status_code == 200
        new_port = live_port(conn, vm["domain_name"])
        assert new_port != old_port
        assert proxy.lookup(answer["token"]) == ("127.0.0.1", new_port)
    # a restart seals the display again: the console's password is gone with it
    with pytest.raises(VncRefused):
        login(new_port, answer["password"])


def test_expired_and_unknown_tokens_are_refused_and_purged(app, api, qemu_node, proxy, runner):
    vm = make_vm(api, qemu_node)
    answer = open_console(api, vm["id"])
    assert proxy.lookup("x" * 43) is None
    assert proxy.lookup("not a token") is None
    with app.app_context():
        db.session.execute(sa.update(ConsoleToken).values(
            expires_at=datetime.now(UTC) - timedelta(seconds=1)))  # fmt: skip
        db.session.commit()
        db.session.remove()
    assert proxy.lookup(answer["token"]) is None
    assert token_rows(app) == []  # the proxy deleted the expired token it met
    # expired tokens of other VMs go when any console is opened, and by the CLI
    other = make_vm(api, qemu_node)
    stale = open_console(api, vm["id"])
    with app.app_context():
        db.session.execute(sa.update(ConsoleToken).values(
            expires_at=datetime.now(UTC) - timedelta(seconds=1)))  # fmt: skip
        db.session.commit()
        db.session.remove()
    fresh = open_console(api, other["id"])
    assert [r.vm_id for r in token_rows(app)] == [other["id"]]
    assert proxy.lookup(stale["token"]) is None and proxy.lookup(fresh["token"]) is not None
    with app.app_context():
        db.session.execute(sa.update(ConsoleToken).values(
            expires_at=datetime.now(UTC) - timedelta(seconds=1)))  # fmt: skip
        db.session.commit()
        db.session.remove()
    result = runner.invoke(args=["vmapi", "console", "purge"])
    assert result.exit_code == 0 and "deleted 1 expired console token(s)" in result.output
    assert token_rows(app) == []


def test_deleting_a_vm_invalidates_its_tokens(app, api, qemu_node, proxy):
    vm = make_vm(api, qemu_node)
    kept = make_vm(api, qemu_node)
    answer = open_console(api, vm["id"])
    other = open_console(api, kept["id"])
    assert api.delete(f"vm/{vm['id']}").status_code == 200
    assert proxy.lookup(answer["token"]) is None
    assert [r.vm_id for r in token_rows(app)] == [kept["id"]]
    assert proxy.lookup(other["token"]) is not None


def test_invalidation_for_a_moved_vm(app, api, qemu_node, proxy):
    """What a migration will call: the VM stays, its tokens go."""
    vm = make_vm(api, qemu_node)
    answer = open_console(api, vm["id"])
    with app.app_context():
        assert invalidate_console_tokens(vm["id"]) == 1
        db.session.commit()
        db.session.remove()
    assert proxy.lookup(answer["token"]) is None
    assert api.get(f"vm/{vm['id']}").status_code == 200


def test_a_vm_without_a_display_says_so_until_it_gets_one(api, qemu_node, conn):
    """A domain defined before vmapi gave every VM a display: 409 vm/no_console until it
    is next defined and started."""
    vm = make_vm(api, qemu_node)
    dom = conn.lookupByName(vm["domain_name"])
    root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    devices = root.find("devices")
    for device in devices.findall("graphics") + devices.findall("video"):
        devices.remove(device)
    dom.destroy()
    conn.defineXML(ET.tostring(root, encoding="unicode"))
    dom.create()
    response = api.post(f"vm/{vm['id']}/console")
    assert response.status_code == 409 and response.json["error_id"] == "vm/no_console"
    assert "next defined and started" in response.json["message"]
    # a change redefines the domain from the database (the display is in the definition);
    # the running domain gets it at its next start
    assert api.update(f"vm/{vm['id']}", json={"cputime_limit": 50000}).status_code == 200
    assert api.post(f"vm/{vm['id']}/console").status_code == 409
    api.update(f"vm/{vm['id']}?force=true", json={"vm_state": {"id": 4}})
    response = api.post(f"vm/{vm['id']}/console")
    assert response.status_code == 409 and response.json["error_id"] == "vm/state_conflict"
    api.update(f"vm/{vm['id']}", json={"vm_state": {"id": 2}})
    assert (
        login(live_port(conn, vm["domain_name"]), open_console(api, vm["id"])["password"]).width > 0
    )
