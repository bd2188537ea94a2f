"""The admin CLI: seed, tokens, nodes, shell context."""

import pytest
import sqlalchemy as sa

from tests.conftest import GIB, Api, vm_body
from tests.errors import assert_error
from vmapi.extensions import db

pytestmark = pytest.mark.embedded


def test_seed_is_idempotent_and_repairs(app, runner):
    result = runner.invoke(args=["vmapi", "seed"])
    assert result.exit_code == 0 and "nothing was missing" in result.output
    with app.app_context():
        db.session.execute(sa.text("DELETE FROM cache_option WHERE name = 'unsafe'"))
        db.session.commit()
    result = runner.invoke(args=["vmapi", "seed"])
    assert "cache_option unsafe" in result.output
    with app.app_context():
        assert db.session.scalar(sa.text("SELECT seeded FROM cache_option WHERE name = 'unsafe'"))


def test_token_create_prints_token_last(client, runner):
    result = runner.invoke(args=["vmapi", "token", "create", "--admin", "--name", "ops"])
    assert result.exit_code == 0, result.output
    plain = result.output.strip().splitlines()[-1]
    assert plain.startswith("vmapi_")
    assert Api(client, plain).get("node").status_code == 200


def test_customer_token(client, runner):
    result = runner.invoke(args=["vmapi", "token", "create", "--customer", "42", "--expires", "30"])
    assert result.exit_code == 0, result.output
    plain = result.output.strip().splitlines()[-1]
    assert Api(client, plain).get("node").status_code == 403
    assert Api(client, plain).get("vm_state").status_code == 200


@pytest.mark.parametrize(
    "args", [[], ["--admin", "--customer", "1"], ["--admin", "--expires", "0"]]
)
def test_token_create_usage(runner, args):
    assert runner.invoke(args=["vmapi", "token", "create", *args]).exit_code != 0


def test_token_list_and_revoke(runner):
    out = runner.invoke(args=["vmapi", "token", "create", "--admin", "--name", "listed"]).output
    plain = out.strip().splitlines()[-1]
    listing = runner.invoke(args=["vmapi", "token", "list"]).output
    assert "listed" in listing and plain not in listing
    assert runner.invoke(args=["vmapi", "token", "revoke", "listed"]).exit_code == 0
    assert (
        "no"
        not in runner.invoke(args=["vmapi", "token", "list"]).output.splitlines()[1].split()[-1]
    )
    assert runner.invoke(args=["vmapi", "token", "revoke", "nope"]).exit_code != 0


def test_duplicate_token_name(runner):
    assert runner.invoke(args=["vmapi", "token", "create", "--admin", "--name", "x"]).exit_code == 0
    result = runner.invoke(args=["vmapi", "token", "create", "--admin", "--name", "x"])
    assert result.exit_code != 0 and "exists already" in result.output


def test_node_add_reads_capacity_and_adds_methods(api, runner, host_uri):
    uri = host_uri(cores=6, ram=24 * GIB)
    result = runner.invoke(args=["vmapi", "node", "add", "--fqdn", "cli.example.com", "--libvirt-uri", uri,
        "--ipv4-addr-ext", "192.0.2.5/24", "--ipv4-gw-ext", "192.0.2.1", "--ipv6-addr-ext", "2001:db8::5/64",
        "--ipv6-gw-ext", "2001:db8::1", "--virt-method", "QEMU", "--virt-method", "LXC"])  # fmt: skip
    assert result.exit_code == 0, result.output
    node = next(iter(api.get("node").json["data"].values()))
    assert (node["fqdn"], node["cores"], node["ram"]) == ("cli.example.com", 6, 24 * GIB)
    assert len(api.get(f"virt_node?node.id={node['id']}").json["data"]) == 2
    assert "cli.example.com" in runner.invoke(args=["vmapi", "node", "list", "--quiet"]).output


def test_node_add_unreachable_fails_cleanly(api, runner):
    result = runner.invoke(args=["vmapi", "node", "add", "--fqdn", "gone.example.com", "--libvirt-uri",
        "qemu+tcp://127.0.0.1:1/system", "--ipv4-addr-ext", "192.0.2.5/24", "--ipv4-gw-ext", "192.0.2.1",
        "--ipv6-addr-ext", "2001:db8::5/64", "--ipv6-gw-ext", "2001:db8::1"])  # fmt: skip
    assert result.exit_code != 0
    assert "node/unreachable" in result.output
    assert api.get("node").json["data"] == {}


def network_add(runner, *args):
    return runner.invoke(args=["vmapi", "network", "add", *args])


def test_network_add_makes_the_seed_example_work(api, runner, make_node, test_method):
    """What ``make run`` does: without ranges a VM has no address; with them it is made."""
    node = make_node()
    api.post("virt_node", json={"node": {"id": node["id"]}, "virt_method": {"id": test_method}})
    assert_error(api.post("vm", json=vm_body(test_method)), 409, "vm/no_free_ipv4")
    result = network_add(runner, "203.0.113.0/24", "--gateway", "203.0.113.1")
    assert result.exit_code == 0, result.output
    assert "added 203.0.113.0/24 (gateway 203.0.113.1): 253 IPv4 addresses" in result.output
    result = network_add(runner, "2001:db8:203::/64", "--gateway", "2001:db8:203::1")
    assert result.exit_code == 0 and "an IPv6 pool" in result.output, result.output
    pools = api.get("ipv6_pool").json["data"].values()
    assert [(p["network"], p["gateway"]) for p in pools] == [
        ("2001:db8:203::/64", "2001:db8:203::1")
    ]
    vm = api.post("vm", json=vm_body(test_method))
    assert vm.status_code == 201, vm.json
    nic = api.get(f"interface/{vm.json['data']['interfaces'][0]['id']}").json["data"]
    address = api.get(f"ipv4/{nic['ipv4'][0]['id']}").json["data"]
    assert address["address"].startswith("203.0.113.") and address["gateway"] == "203.0.113.1"


@pytest.mark.parametrize(
    ("network", "gateway", "error_id"),
    [("203.0.113.0/24", "203.0.113.1", "ipv4/overlap"),
     ("2001:db8:203::/64", "2001:db8:203::1", "ipv6_pool/overlap")],
)  # fmt: skip
def test_network_add_if_missing_is_idempotent(api, runner, network, gateway, error_id):
    assert network_add(runner, network, "--gateway", gateway).exit_code == 0
    before = api.get("ipv4?limit=1000").json["data"], api.get("ipv6_pool").json["data"]
    again = network_add(runner, network, "--gateway", gateway)
    assert again.exit_code != 0 and error_id in again.output  # without the flag: refused
    again = network_add(runner, network, "--gateway", gateway, "--if-missing")
    assert again.exit_code == 0, again.output
    assert f"{network} is registered already; nothing to do" in again.output
    assert (api.get("ipv4?limit=1000").json["data"], api.get("ipv6_pool").json["data"]) == before


def test_network_add_if_missing_refuses_a_partial_overlap(api, runner):
    assert network_add(runner, "203.0.113.0/24", "--gateway", "203.0.113.1").exit_code == 0
    first = min(api.get("ipv4?limit=1000").json["data"], key=int)
    assert api.delete(f"ipv4/{first}").status_code == 200
    result = network_add(runner, "203.0.113.0/24", "--gateway", "203.0.113.1", "--if-missing")
    assert result.exit_code != 0 and "ipv4/overlap" in result.output  # not "registered"
    result = network_add(runner, "2001:db8:203::/64", "--gateway", "2001:db8:203::1")
    assert result.exit_code == 0, result.output
    result = network_add(
        runner, "2001:db8:203::/56", "--gateway", "2001:db8:203::1", "--if-missing"
    )
    assert result.exit_code != 0 and "ipv6_pool/overlap" in result.output


@pytest.mark.parametrize(
    ("network", "gateway", "message"),
    [("nope", "203.0.113.1", "does not appear to be an IPv4 or IPv6 network"),
     ("203.0.113.1/24", "203.0.113.1", "general/validation"),
     ("203.0.113.0/24", "198.51.100.1", "general/validation")],
)  # fmt: skip
def test_network_add_refuses_bad_input(api, runner, network, gateway, message):
    result = network_add(runner, network, "--gateway", gateway)
    assert result.exit_code != 0 and message in result.output, result.output
    assert api.get("ipv4").json["data"] == {}


def test_shell_context_has_models(app):
    with app.app_context():
        context = app.make_shell_context()
    for name in ("db", "session", "Node", "VirtNode", "NodeState", "ApiToken", "VirtMethod"):
        assert name in context
