"""Undo steps have names: a failed one is logged by its name, and what it was to remove
from a node is listed as a leftover under that name, so reconcile shows which step
failed (and ``--fix`` removes the thing once the node answers)."""

import logging

import pytest
from sqlalchemy import select

from tests.api.test_envelope import assert_error
from tests.conftest import vm_body
from tests.faults import FaultyDriver
from vmapi.extensions import db
from vmapi.hypervisor import DomainNotFound, HypervisorError
from vmapi.models import Leftover
from vmapi.models.leftover import VOLUME
from vmapi.services.leftovers import Left
from vmapi.services.nodes.hosts import DRIVER_KEY
from vmapi.services.undo import Undo, run_undo

pytestmark = pytest.mark.embedded


@pytest.fixture
def faults(app):
    real = app.extensions[DRIVER_KEY]
    app.extensions[DRIVER_KEY] = FaultyDriver(real)
    return app.extensions[DRIVER_KEY]


def test_a_failed_step_is_logged_by_its_name_and_the_others_still_run(app, caplog):
    ran = []

    def fail():
        raise HypervisorError("test:///default", "injected failure")

    undo = Undo()
    undo.push("first step", lambda: ran.append("first"))
    undo.push("the failing step", fail)
    undo.push("last step", lambda: ran.append("last"))
    with app.app_context(), caplog.at_level(logging.ERROR, logger="vmapi.services.undo"):
        run_undo(undo)
    assert ran == ["last", "first"]  # newest first, past the failure
    failed = [r for r in caplog.records if r.name == "vmapi.services.undo"]
    assert [r.getMessage() for r in failed] == [
        "undo step failed: the failing step; reconcile will find what is left"
    ]
    assert len(undo) == 0


def test_a_leftover_known_only_later_is_listed_as_it_is_when_the_step_fails(
    app, vm_host, installation
):
    """A thing made before its node was known (an RBD clone started before the claim)
    names its leftover by a callable, asked when the step fails: None lists nothing."""
    node = vm_host()
    known: list[Left | None] = [None]

    def fail():
        raise HypervisorError("rbd:", "injected failure")

    undo = Undo()
    undo.push("removing a clone placed later", fail, lambda: known[0])
    undo.push("removing a clone never placed", fail, lambda: None)
    known[0] = Left(node["id"], VOLUME, "a-clone", None, "ceph-pool")
    with app.app_context():
        run_undo(undo)
        rows = db.session.execute(select(Leftover.node_id, Leftover.name, Leftover.reason)).all()
    assert [(n, name) for n, name, _reason in rows] == [(node["id"], "a-clone")]
    assert rows[0].reason.startswith("undo step failed: removing a clone placed later")


def test_every_step_needs_a_name():
    with pytest.raises(TypeError):
        Undo().push(lambda: None)  # type: ignore[call-arg]


def test_a_failed_undo_of_a_create_names_its_step_in_the_log_and_in_reconcile(
    api, runner, vm_host, test_method, faults, installation, caplog
):
    node = vm_host()
    faults.fail("start")  # the create fails once its domain is defined ...
    faults.fail("destroy")  # ... and the undo step removing that domain fails too
    with caplog.at_level(logging.ERROR, logger="vmapi.services.undo"):
        assert_error(api.post("vm", json=vm_body(test_method)), 502, "vm/hypervisor_error")
    [domain] = [d.name for d in faults.real.domains(node["libvirt_uri"])]
    step = f"removing domain {domain} from node {node['fqdn']}"
    assert [r.getMessage() for r in caplog.records if r.name == "vmapi.services.undo"] == [
        f"undo step failed: {step}; reconcile will find what is left"
    ]
    assert not api.get("vm").json["data"]  # the other steps ran: row and claim are gone

    result = runner.invoke(args=["vmapi", "reconcile"])
    assert result.exit_code == 1
    [line] = [line for line in result.output.splitlines() if "leftover" in line]
    assert f"undo step failed: {step} (injected failure)" in line
    assert "orphan_domain" not in result.output  # listed, so not reported twice

    result = runner.invoke(args=["vmapi", "reconcile", "--fix"])
    assert result.exit_code == 0, result.output
    assert "domain destroyed and undefined" in result.output
    with pytest.raises(DomainNotFound):
        faults.real.domain(node["libvirt_uri"], domain)
    assert runner.invoke(args=["vmapi", "reconcile"]).output == "0 finding(s), 0 fixed, 0 left\n"
