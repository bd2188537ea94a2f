"""The ORM-free reads of /vm (services/vms/reads.py, issue 17) answer exactly what the
schema's dump of the same rows answers: same keys in the same order, same types, same
envelope bytes, same scope, paging and filters. A field added to ``VmSchema`` and not
to the fast path fails here."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import msgpack
import pytest
import sqlalchemy as sa
from flask import request

from tests.conftest import unavailable, vm_body
from tests.errors import assert_error
from vmapi.api.resource import RESOURCES
from vmapi.auth import authenticate
from vmapi.extensions import db
from vmapi.models import Interface, Ipv4Address, Ipv6Address, Vm
from vmapi.services.vms.reads import get_vm_answer, list_vm_answers

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def ssh_key(tmp_path_factory) -> str:
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        unavailable("ssh-keygen (Debian package openssh-client) is not installed")
    private = tmp_path_factory.mktemp("keys") / "k"
    subprocess.run([keygen, "-t", "ed25519", "-N", "", "-C", "k@example", "-q",
                    "-f", str(private)], check=True)  # fmt: skip
    return Path(f"{private}.pub").read_text().strip()


@pytest.fixture
def assorted(app, api, customer_api, vm_host, test_method, ssh_key):
    """VMs of every shape: an admin's and two customers', with and without interfaces
    (one with two, one with a VLAN), addresses v4 and v6, an image, a host name, SSH
    keys, user data (set, empty, none) and null fields. -> (ids, tokens by who)."""
    vm_host(cores=64)
    seven, eight = customer_api(7), customer_api(8)
    made = [
        api.post("vm", json=vm_body(test_method)),
        api.post(
            "vm",
            json=vm_body(
                test_method,
                cores=1,
                cputime_limit=5000,
                hostname="db-1",
                ssh_keys=[ssh_key],
                user_data="#cloud-config\n",
            ),
        ),
        api.post("vm", json=vm_body(test_method, customer_id=7)),
        seven.post("vm", json=vm_body(test_method, hostname="web.example.org")),
        seven.post("vm", json=vm_body(test_method, user_data="#!/bin/sh\n")),
        eight.post("vm", json=vm_body(test_method, ssh_keys=[ssh_key])),
        api.post("vm", json=vm_body(test_method)),
        api.post("vm", json=vm_body(test_method)),
    ]
    assert all(r.status_code == 201 for r in made), [r.json for r in made]
    ids = [r.json["data"]["id"] for r in made]
    image = api.post("image", json={"name": "reads"}).json["data"]["id"]
    vlan = api.post("vlan", json={"tag": 42}).json["data"]["id"]
    first_iface = made[0].json["data"]["interfaces"][0]["id"]
    assert api.update(f"interface/{first_iface}", json={"vlan": {"id": vlan}}).status_code == 200
    with app.app_context():
        x = db.session.execute
        # no interface at all
        gone = sa.select(Interface.id).where(Interface.vm_id == ids[6])
        for table in (Ipv4Address, Ipv6Address):
            x(sa.update(table).where(table.interface_id.in_(gone)).values(interface_id=None))
        x(sa.delete(Interface).where(Interface.vm_id == ids[6]))
        # a second interface, made after others (so ordered by id, not by VM)
        x(sa.insert(Interface).values(vm_id=ids[1], mac="02:aa:00:00:00:01", device_suffix="rd1"))
        x(sa.update(Vm).where(Vm.id == ids[2]).values(image_id=image, domain_name=None))
        x(sa.update(Vm).where(Vm.id == ids[7]).values(user_data="", customer_id=None,
                                                       hostname=None, ssh_keys=[]))  # fmt: skip
        db.session.commit()
    tokens = {"admin": api.token, "seven": seven.token, "eight": eight.token}
    return ids, tokens


def expected_one(ident, principal):
    vm = RESOURCES["vm"]
    return vm.dump(vm.service.get(ident, principal))


def expected_page(principal, params):
    vm = RESOURCES["vm"]
    objs, more = vm.service.list_page(principal, params)
    return vm.dump_keyed(objs), more


def body(data):
    """The JSON answer's bytes, as representations.py writes them."""
    envelope = {"status": "success", "data": data}
    return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode()


def test_one_vm_is_answered_as_the_schema_dumps_it(app, client, assorted):
    ids, tokens = assorted
    shown = 0
    for who, token in tokens.items():
        with app.app_context():
            principal = authenticate(f"Bearer {token}")
        for ident in ids:
            with app.app_context():
                try:
                    expected = expected_one(ident, principal)
                except Exception as exc:  # the fast path must fail alike
                    with pytest.raises(type(exc)) as raised:
                        get_vm_answer(RESOURCES["vm"].service, ident, principal)
                    assert raised.value.error_id == exc.error_id
                    expected = None
                else:
                    fast = get_vm_answer(RESOURCES["vm"].service, ident, principal)
                    assert json.dumps(fast) == json.dumps(expected), (who, ident)
                    assert [type(v) for v in fast.values()] == [type(v) for v in expected.values()]
            answer = client.get(f"/api/v1/vm/{ident}", headers={"Authorization": f"Bearer {token}"})
            if expected is None:
                assert_error(answer, 404, "vm/not_found")
            else:
                assert answer.status_code == 200
                assert answer.data == body(expected), (who, ident)
                shown += 1
    assert shown == len(ids) + 3 + 1  # the admin sees all, seven three, eight one
    # every shape was there to compare
    with app.app_context():
        answers = [expected_one(i, authenticate(f"Bearer {tokens['admin']}")) for i in ids]
    assert {len(a["interfaces"]) for a in answers} == {0, 1, 2}
    assert {a["user_data_set"] for a in answers} == {True, False}
    assert any(a["image"] for a in answers) and any(a["ssh_key_fingerprints"] for a in answers)
    assert None in {a["customer_id"] for a in answers} | {a["domain_name"] for a in answers}


def test_missing_and_others_vms_are_404_alike(api, customer_api, assorted):
    ids, _tokens = assorted
    eight = customer_api(8)
    assert_error(eight.get(f"vm/{ids[3]}"), 404, "vm/not_found")  # seven's
    assert_error(eight.get("vm/999999"), 404, "vm/not_found")
    assert_error(api.get("vm/999999"), 404, "vm/not_found")


@pytest.mark.parametrize(
    "query",
    ["", "limit=1", "limit=3", "limit=3&after={ids[2]}", "after={ids[5]}", "after=0",
     "limit=2&customer_id=7", "hostname=db-1", "cores=1", "node.id={node}",
     "vm_state.id=2", "image.id={image}", "uuid=nothing"],
)  # fmt: skip
def test_pages_are_answered_as_the_schema_dumps_them(app, client, api, assorted, query):
    ids, tokens = assorted
    node = api.get(f"vm/{ids[0]}").json["data"]["node"]["id"]
    image = api.get(f"vm/{ids[2]}").json["data"]["image"]["id"]
    query = query.format(ids=ids, node=node, image=image)
    resource = RESOURCES["vm"]
    for who, token in tokens.items():
        headers = {"Authorization": f"Bearer {token}"}
        answer = client.get(f"/api/v1/vm?{query}", headers=headers)
        assert answer.status_code == 200, answer.json
        with app.test_request_context(f"/api/v1/vm?{query}", headers=headers):
            principal = authenticate(headers["Authorization"])
            params = resource.parse_list(request.args, principal)
            expected, more = expected_page(principal, params)
            fast, fast_more = list_vm_answers(resource.service, principal, params)
        assert json.dumps(fast) == json.dumps(expected) and fast_more == more, (who, query)
        assert answer.data == body(expected), (who, query)
        link = answer.headers.get("Link")
        assert (link is not None) == more
        if more:
            assert f"after={next(reversed(expected))}" in link


def test_a_page_by_link_walks_every_vm_once(api, assorted):
    ids, _tokens = assorted
    seen, url = [], "vm?limit=3"
    while url:
        answer = api.get(url)
        seen += [int(key) for key in answer.json["data"]]
        link = answer.headers.get("Link")
        url = link[1 : link.index(">")].split("/api/v1/", 1)[1] if link else None
    assert seen == sorted(ids)


def test_other_formats_carry_the_same_data(api, assorted):
    ids, _tokens = assorted
    plain = api.get(f"vm/{ids[1]}").json
    packed = api.get(f"vm/{ids[1]}", headers={"Accept": "application/msgpack"})
    assert msgpack.unpackb(packed.data) == plain
    html = api.get(f"vm/{ids[1]}", headers={"Accept": "text/html"})
    assert html.status_code == 200 and "db-1" in html.get_data(as_text=True)


def test_nest_keeps_the_schema_path(api, assorted):
    ids, _tokens = assorted
    nested = api.get(f"vm/{ids[0]}?nest=interfaces").json["data"]
    plain = api.get(f"vm/{ids[0]}").json["data"]
    assert [i["id"] for i in nested["interfaces"]] == [i["id"] for i in plain["interfaces"]]
    assert nested["interfaces"][0]["vlan"] is not None
    page = api.get("vm?limit=100&nest=node").json["data"]
    assert list(page) == [str(i) for i in sorted(ids)]
    assert all(isinstance(v["node"], dict) and "fqdn" in v["node"] for v in page.values())
