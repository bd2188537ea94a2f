"""What a guest is told (issue 14), on libvirt's test driver: the VM fields hostname,
ssh_keys and user_data (rules, roles, write-only in answers, the audit trail and the
logs), the seed's contents as the database gives them, and moving an interface to other
addresses. (The seed's upload and rebuild need a real libvirtd: tests/hypervisor/.)"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import unavailable, vm_body
from tests.errors import assert_error
from tests.faults import FaultyDriver
from vmapi.extensions import db
from vmapi.guest_inputs import MAX_USER_DATA_BYTES
from vmapi.models import Ipv4Address, Ipv6Address, Vm
from vmapi.nocloud import build_seed
from vmapi.services.nodes.hosts import DRIVER_KEY
from vmapi.services.vms.cloud_init import seed_spec

pytestmark = pytest.mark.embedded

#: the persistent definition (what the next start uses), not the running domain's
INACTIVE = 2  # VIR_DOMAIN_XML_INACTIVE
USER_DATA = "#cloud-config\nruncmd: [echo secret-user-data-4711]\n"


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """Two ed25519 public keys made by ssh-keygen: name -> (line, its fingerprint)."""
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        unavailable("ssh-keygen (Debian package openssh-client) is not installed")
    folder = tmp_path_factory.mktemp("keys")
    made = {}
    for name in ("alice", "bob"):
        private = folder / name
        subprocess.run([keygen, "-t", "ed25519", "-N", "", "-C", f"{name}@example", "-q",
                        "-f", str(private)], check=True)  # fmt: skip
        public = Path(f"{private}.pub")
        printed = subprocess.run([keygen, "-l", "-E", "sha256", "-f", str(public)], check=True,
                                 capture_output=True, text=True).stdout  # fmt: skip
        made[name] = (public.read_text().strip(), printed.split()[1])
    return made


def create(api, method, **fields):
    response = api.post("vm", json=vm_body(method, **fields))
    assert response.status_code == 201, response.json
    return response.json["data"]


def test_answers_show_the_hostname_fingerprints_and_a_flag_never_keys_or_user_data(
    api, vm_host, test_method, keys
):
    vm_host()
    alice, bob = keys["alice"], keys["bob"]
    response = api.post("vm", json=vm_body(test_method, hostname="web1.example.com",
                                           ssh_keys=[alice[0], bob[0]], user_data=USER_DATA))  # fmt: skip
    assert response.status_code == 201, response.json
    vm = response.json["data"]
    assert vm["hostname"] == "web1.example.com"
    assert vm["ssh_key_fingerprints"] == [alice[1], bob[1]]  # as ssh-keygen prints them
    assert vm["user_data_set"] is True
    assert "ssh_keys" not in vm and "user_data" not in vm
    for answer in (response, api.get(f"vm/{vm['id']}"), api.get("vm"), api.get("vm?nest=node")):
        text = answer.get_data(as_text=True)
        assert answer.status_code == 200 or answer.status_code == 201
        assert "secret-user-data-4711" not in text and alice[0].split()[1] not in text
    listed = api.get("vm").json["data"][str(vm["id"])]
    assert listed["ssh_key_fingerprints"] == [alice[1], bob[1]] and listed["user_data_set"]

    plain = create(api, test_method)
    assert plain["hostname"] == plain["name"]  # the default: the VM's name
    assert plain["ssh_key_fingerprints"] == [] and plain["user_data_set"] is False


def test_updates_change_and_clear_what_the_guest_is_told(api, vm_host, test_method, keys):
    vm_host()
    vm = create(api, test_method, ssh_keys=[keys["alice"][0]], user_data=USER_DATA)
    changed = api.update(f"vm/{vm['id']}", json={"hostname": "db-2", "ssh_keys": [keys["bob"][0]]})
    assert changed.status_code == 200, changed.json
    data = changed.json["data"]
    assert (data["hostname"], data["ssh_key_fingerprints"]) == ("db-2", [keys["bob"][1]])
    assert data["user_data_set"] is True  # not named: kept
    # A VM without an image has no seed: nothing is rebuilt and the answer says nothing.
    assert changed.json.get("message") in (None, "")
    cleared = api.update(f"vm/{vm['id']}", json={"ssh_keys": [], "user_data": None}).json["data"]
    assert cleared["ssh_key_fingerprints"] == [] and cleared["user_data_set"] is False
    with api.client.application.app_context():
        row = db.session.get(Vm, vm["id"])
        assert (row.hostname, row.ssh_keys, row.user_data) == ("db-2", [], None)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hostname", "-web", "must have 1 to 63 letters"),
        ("hostname", "a..b", "two dots in a row"),
        ("hostname", "10.0.0.1", "must not be all digits"),
        ("hostname", "a" * 64, "must have 1 to 63"),
        ("hostname", "web_1", "must have 1 to 63"),
        ("hostname", "", "1 to 253 characters"),
        ("user_data", "x" * (MAX_USER_DATA_BYTES + 1), "At most 65536 bytes"),
        ("user_data", "é" * (MAX_USER_DATA_BYTES // 2 + 1), "At most 65536 bytes"),
        ("user_data", "#!/bin/sh\x07\n", "no NUL or control characters"),
        ("user_data", 42, "Not a valid string"),
        ("ssh_keys", "ssh-ed25519 AAAA", "Not a valid list"),
        ("ssh_keys", [42], "Not a valid string"),
    ],
)
def test_bad_values_are_refused_naming_the_field(api, vm_host, test_method, field, value, message):
    vm_host()
    error = assert_error(api.post("vm", json=vm_body(test_method, **{field: value})), 400,
                         "general/validation")  # fmt: skip
    assert message.lower() in json.dumps(error["data"][field]).lower(), error["data"]
    vm = create(api, test_method)
    error = assert_error(api.update(f"vm/{vm['id']}", json={field: value}), 400,
                         "general/validation")  # fmt: skip
    assert message.lower() in json.dumps(error["data"][field]).lower()
    assert api.get("vm").json["data"].keys() == {str(vm["id"])}  # nothing was made


def test_a_bad_key_is_named_by_its_index(api, vm_host, test_method, keys):
    vm_host()
    alice = keys["alice"][0]
    truncated = alice.split()[0] + " " + alice.split()[1][:-8]
    body = vm_body(test_method, ssh_keys=[alice, "ssh-dss AAAAB3NzaC1kc3M=", truncated, alice])
    error = assert_error(api.post("vm", json=body), 400, "general/validation")
    bad = error["data"]["ssh_keys"]
    assert set(bad) == {"1", "2", "3"}  # the good first key is not named
    assert "Unknown key type 'ssh-dss'" in bad["1"][0]
    assert bad["3"] == ["Key 3 is the same key as key 0."]
    assert alice.split()[1] not in json.dumps(error)  # the message names, never echoes
    many = vm_body(test_method, ssh_keys=[alice] * 33)
    assert_error(api.post("vm", json=many), 400, "general/validation")


def test_customers_set_them_on_their_own_vms_only(api, customer_api, vm_host, test_method, keys):
    vm_host()
    seven, eight = customer_api(7), customer_api(8)
    mine = seven.post("vm", json=vm_body(test_method, hostname="mine", ssh_keys=[keys["alice"][0]]))
    assert mine.status_code == 201, mine.json
    vm = mine.json["data"]
    assert vm["customer_id"] == 7 and vm["ssh_key_fingerprints"] == [keys["alice"][1]]
    updated = seven.update(f"vm/{vm['id']}", json={"user_data": USER_DATA})
    assert updated.status_code == 200 and updated.json["data"]["user_data_set"]
    assert_error(eight.update(f"vm/{vm['id']}", json={"ssh_keys": [keys["bob"][0]]}), 404,
                 "vm/not_found")  # fmt: skip
    assert_error(eight.update(f"vm/{vm['id']}", json={"hostname": "theirs"}), 404, "vm/not_found")
    assert api.get(f"vm/{vm['id']}").json["data"]["ssh_key_fingerprints"] == [keys["alice"][1]]
    # an admin may change any VM's
    assert api.update(f"vm/{vm['id']}", json={"hostname": "admins"}).status_code == 200


def test_write_only_values_are_no_filters(api, vm_host, test_method):
    vm_host()
    vm = create(api, test_method, user_data=USER_DATA, hostname="findme")
    assert list(api.get("vm?hostname=findme").json["data"]) == [str(vm["id"])]
    for query in ("user_data=" + USER_DATA[:5], "ssh_keys=x"):
        assert_error(api.get(f"vm?{query}"), 400, "general/validation")


def test_the_audit_trail_records_fingerprints_and_a_flag(api, vm_host, test_method, keys):
    vm_host()
    vm = create(api, test_method, ssh_keys=[keys["alice"][0]], user_data=USER_DATA)
    api.update(f"vm/{vm['id']}", json={"ssh_keys": [keys["bob"][0]], "user_data": "#!/bin/sh\n"})
    api.update(f"vm/{vm['id']}", json={"user_data": None})
    api.delete(f"vm/{vm['id']}")
    response = api.get(f"event?resource=vm&object_id={vm['id']}&limit=100")
    events = list(response.json["data"].values())
    text = response.get_data(as_text=True)
    assert "secret-user-data-4711" not in text and "#!/bin/sh" not in text
    for name in ("alice", "bob"):
        assert keys[name][0].split()[1] not in text
    created = events[0]
    assert created["action"] == "create"
    assert created["after"]["ssh_key_fingerprints"] == [keys["alice"][1]]
    assert created["after"]["user_data_set"] is True
    assert "ssh_keys" not in created["after"] and "user_data" not in created["after"]
    assert created["after"]["hostname"] == vm["name"]
    changes = [e for e in events if e["action"] == "update" and "user_data_set" in e["after"]]
    assert [(e["before"]["user_data_set"], e["after"]["user_data_set"]) for e in changes] == [
        (True, True),  # other user data: a change, shown as a flag
        (True, False),
    ]
    assert changes[0]["before"]["ssh_key_fingerprints"] == [keys["alice"][1]]
    assert changes[0]["after"]["ssh_key_fingerprints"] == [keys["bob"][1]]
    deleted = events[-1]
    assert deleted["action"] == "delete" and deleted["before"]["user_data_set"] is False


def test_no_log_line_holds_keys_or_user_data(app, api, vm_host, test_method, keys, caplog):
    caplog.set_level(logging.DEBUG)
    vm_host()
    alice = keys["alice"][0]
    vm = create(api, test_method, ssh_keys=[alice], user_data=USER_DATA)
    api.update(
        f"vm/{vm['id']}", json={"ssh_keys": [alice, keys["bob"][0]], "user_data": USER_DATA + "#"}
    )
    assert_error(api.post("vm", json=vm_body(test_method, ssh_keys=[alice, alice],
                                             user_data=USER_DATA)), 400, "general/validation")  # fmt: skip
    faults = FaultyDriver(app.extensions[DRIVER_KEY])
    app.extensions[DRIVER_KEY] = faults
    faults.fail("define")
    failed = api.post("vm", json=vm_body(test_method, ssh_keys=[alice], user_data=USER_DATA))
    assert failed.status_code == 502
    requests = [r for r in caplog.records if r.name == "vmapi.request"]
    assert len(requests) >= 4  # the request log did run
    logged = "\n".join(
        r.getMessage() + (logging.Formatter().formatException(r.exc_info) if r.exc_info else "")
        for r in caplog.records
    )
    assert "secret-user-data-4711" not in logged
    assert alice.split()[1] not in logged and keys["bob"][0].split()[1] not in logged


def test_database_errors_never_carry_the_statements_values(app, api, vm_host, test_method, keys):
    """A failure the server did not expect (here a row racing another for its unique
    name) is logged with its traceback: the statement's values (keys, user data) stay out
    of its message."""
    vm_host()
    vm = create(api, test_method)
    with app.app_context():
        row = db.session.get(Vm, vm["id"])
        columns = ("cores", "ram", "uuid", "node_id", "virt_method_id", "vm_state_id",
                   "created_at", "domain_name")  # fmt: skip
        twin = {name: getattr(row, name) for name in columns}
        statement = sa.insert(Vm).values(**twin, user_data=USER_DATA, ssh_keys=[keys["alice"][0]])
        with pytest.raises(sa.exc.IntegrityError) as failure:
            db.session.execute(statement)
        db.session.rollback()
    message = str(failure.value)
    assert "parameters hidden" in message
    assert "secret-user-data-4711" not in message and keys["alice"][0].split()[1] not in message


def test_the_seed_is_what_the_database_holds(app, api, vm_host, test_method, keys):
    """The seed's files for a VM, from its rows: NICs by MAC with their addresses and
    gateways, the configured DNS servers, the host name, the keys and the user data."""
    vm_host()
    vm = create(api, test_method, hostname="guest-1", ssh_keys=[keys["alice"][0]],
                user_data=USER_DATA)  # fmt: skip
    iface = api.get(f"interface/{vm['interfaces'][0]['id']}").json["data"]
    v4 = api.get(f"ipv4/{iface['ipv4'][0]['id']}").json["data"]
    v6 = api.get(f"ipv6/{iface['ipv6'][0]['id']}").json["data"]
    app.config["DNS_SERVERS"] = ["192.0.2.53", "2001:db8::53"]
    with app.app_context():
        spec = seed_spec(db.session.get(Vm, vm["id"]))
        files = build_seed(spec)
    assert spec.hostname == "guest-1" and spec.ssh_keys == (keys["alice"][0],)
    assert spec.user_data == USER_DATA and spec.base_instance_id == vm["domain_name"]
    [nic] = spec.nics
    assert (nic.name, nic.mac) == ("eth0", iface["mac"])
    assert [(a.address, a.prefix, a.gateway) for a in nic.ipv4] == [
        (v4["address"], v4["prefix"], v4["gateway"])
    ]
    assert [(a.address, a.prefix, a.gateway) for a in nic.ipv6] == [
        (v6["address"], v6["prefix"], v6["gateway"])
    ]
    assert spec.dns_servers == ("192.0.2.53", "2001:db8::53")
    assert files.instance_id.startswith(vm["domain_name"] + "-")

    # other free addresses: the seed follows, with another instance-id
    free4 = next_free(api, "ipv4", v4["id"])
    moved = api.update(f"interface/{iface['id']}", json={"ipv4": [{"id": free4["id"]}]})
    assert moved.status_code == 200, moved.json
    with app.app_context():
        after = seed_spec(db.session.get(Vm, vm["id"]))
    assert [a.address for a in after.nics[0].ipv4] == [free4["address"]]
    assert build_seed(after).instance_id != files.instance_id


def next_free(api, family, after_id):
    free = [a for a in api.get(f"{family}?limit=1000").json["data"].values()
            if a["interface"] is None and a["id"] > after_id]  # fmt: skip
    assert free, f"no free {family} address"
    return free[0]


def test_an_interface_moves_to_free_addresses_and_releases_its_own(app, api, vm_host,
                                                                    test_method, driver):  # fmt: skip
    node = vm_host()
    vm = create(api, test_method)
    other = create(api, test_method)
    iface = api.get(f"interface/{vm['interfaces'][0]['id']}").json["data"]
    old4, old6 = iface["ipv4"][0]["id"], iface["ipv6"][0]["id"]
    free4 = next_free(api, "ipv4", old4)
    extra6 = api.post("ipv6", json={"address": "2001:db8:200::7", "prefix": 64,
                                    "gateway": "2001:db8:200::1"}).json["data"]  # fmt: skip
    body = {"ipv4": [{"id": free4["id"]}], "ipv6": [{"id": extra6["id"]}]}
    moved = api.update(f"interface/{iface['id']}", json=body)
    assert moved.status_code == 200, moved.json
    assert moved.json["data"]["ipv4"] == [{"id": free4["id"]}]
    assert moved.json["data"]["ipv6"] == [{"id": extra6["id"]}]
    assert api.get(f"ipv4/{old4}").json["data"]["interface"] is None  # released
    assert api.get(f"ipv6/{old6}").json["data"]["interface"] is None
    assert api.get(f"ipv4/{free4['id']}").json["data"]["interface"] == {"id": iface["id"]}
    # the domain's metadata (what provisioning reads) carries the new addresses
    xml = (
        driver.connections.get(node["libvirt_uri"], 5)
        .lookupByName(vm["domain_name"])
        .XMLDesc(INACTIVE)
    )
    assert f"{free4['address']}/{free4['prefix']}" in xml and "2001:db8:200::7/64" in xml
    # the release and the hand-over are in the audit trail
    released = api.get(f"event?resource=ipv4&object_id={old4}").json["data"].values()
    assert any(e["after"] == {"interface_id": None} for e in released)

    # another interface's address: 409, and nothing changes
    theirs = api.get(f"interface/{other['interfaces'][0]['id']}").json["data"]["ipv4"][0]["id"]
    error = assert_error(api.update(f"interface/{iface['id']}", json={"ipv4": [{"id": theirs}]}),
                         409, "interface/address_taken")  # fmt: skip
    assert error["data"] == {"ipv4": [{"id": theirs}]}
    assert api.get(f"interface/{iface['id']}").json["data"]["ipv4"] == [{"id": free4["id"]}]
    # an address that does not exist, twice the same, not a list: 400
    for value in ([{"id": 999999}], [{"id": old4}, {"id": old4}], {"id": old4}):
        assert_error(api.update(f"interface/{iface['id']}", json={"ipv4": value}), 400,
                     "general/validation")  # fmt: skip
    # its own address again, and none at all, are fine
    assert (
        api.update(f"interface/{iface['id']}", json={"ipv4": [{"id": free4["id"]}]}).status_code
        == 200
    )
    assert api.update(f"interface/{iface['id']}", json={"ipv6": []}).json["data"]["ipv6"] == []


def test_customers_cannot_move_addresses(api, customer_api, vm_host, test_method):
    vm_host()
    vm = create(api, test_method, customer_id=7)
    iface = vm["interfaces"][0]["id"]
    free = next_free(api, "ipv4", 0)
    assert_error(customer_api(7).update(f"interface/{iface}", json={"ipv4": [{"id": free["id"]}]}),
                 403, "general/authorization/forbidden")  # fmt: skip


def test_a_move_the_host_refuses_changes_nothing(app, api, vm_host, test_method, driver):
    vm_host()
    a, b = (create(api, test_method) for _ in range(2))
    ifaces = [api.get(f"interface/{vm['interfaces'][0]['id']}").json["data"] for vm in (a, b)]
    free = [next_free(api, "ipv4", 0)]
    free.append(next_free(api, "ipv4", free[0]["id"]))
    faults = FaultyDriver(driver)
    app.extensions[DRIVER_KEY] = faults
    faults.fail("define", skip=1)  # the first interface's domain is redefined, the second fails
    body = [{"id": i["id"], "ipv4": [{"id": f["id"]}]} for i, f in zip(ifaces, free, strict=True)]
    error = assert_error(api.update("interface", json=body), 502, "vm/hypervisor_error")
    assert error["data"]["step"] == "recording the new addresses in the domain"
    assert error["data"]["index"] == 1
    for iface in ifaces:  # both back where they were, the first one's domain too
        assert api.get(f"interface/{iface['id']}").json["data"]["ipv4"] == iface["ipv4"]
    for address in free:
        assert api.get(f"ipv4/{address['id']}").json["data"]["interface"] is None
    with app.app_context():
        held = db.session.get(Ipv4Address, ifaces[0]["ipv4"][0]["id"])
        assert held.interface_id == ifaces[0]["id"]
        assert (
            db.session.get(Ipv6Address, ifaces[0]["ipv6"][0]["id"]).interface_id == ifaces[0]["id"]
        )
    node_uri = api.get(f"node/{a['node']['id']}").json["data"]["libvirt_uri"]
    dom = driver.connections.get(node_uri, 5).lookupByName(a["domain_name"])
    assert free[0]["address"] not in dom.XMLDesc(INACTIVE)
    assert ifaces[0]["mac"] in dom.XMLDesc(INACTIVE)
