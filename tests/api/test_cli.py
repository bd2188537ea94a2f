"""The admin CLI: seed, tokens, nodes, shell context."""

import pytest
import sqlalchemy as sa

from tests.conftest import GIB, Api
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


def test_shell_context_has_models(app):
    with app.app_context():
        context = app.make_shell_context()
    for name in ("db", "session", "Node", "VirtNode", "NodeState", "ApiToken", "VirtMethod"):
        assert name in context
