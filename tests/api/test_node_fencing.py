"""Fencing: a node's fence_agent, fence_address, fence_user and ha_state on /node;
fence_node running the node's agent (tests/fence_agent.py, under fence_test* names in a
folder of HA_FENCE_AGENT_DIRS) off then status, bounded, its password on stdin only; and
``flask vmapi node fenced``."""

from __future__ import annotations

import getpass
import logging
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.api.test_metrics import scrape, value
from tests.conftest import GIB, node_body
from tests.errors import assert_error
from tests.fence_agent import calls, install
from vmapi.extensions import db
from vmapi.services.ha.fencing import fence_node

SECRET = "s3cret pass"


@pytest.fixture
def agents(tmp_path) -> Path:
    folder = install(tmp_path / "agents")
    (folder / "fence_notexec").write_text("#!/bin/sh\n")  # not executable: not an agent
    return folder


@pytest.fixture
def passwords(tmp_path) -> Path:
    folder = tmp_path / "passwords"
    folder.mkdir(mode=0o700)
    return folder


@pytest.fixture
def app_config(agents, passwords):
    return {"HA_FENCE_AGENT_DIRS": f"{agents.parent / 'nowhere'}:{agents}",
            "HA_FENCE_PASSWORD_DIR": str(passwords), "HA_FENCE_TIMEOUT": 60.0}  # fmt: skip


@pytest.fixture
def fenced_node(api, passwords):
    """``fenced_node(agent, **fields)``: a node with that agent (address bmc-<n>, user
    admin) and its password file; its JSON object."""

    def make(agent: str | None = "fence_test", password: str | None = SECRET, **fields):
        body = node_body(cores=4, ram=8 * GIB, fence_agent=agent, fence_user="admin", **fields)
        body.setdefault("fence_address", "bmc-" + body["fqdn"].split(".")[0])
        made = api.post("node", json=body)
        assert made.status_code == 201, made.json
        if password is not None:
            (passwords / body["fqdn"]).write_text(password + "\n")
        return made.json["data"]

    return make


def fence(app, node):
    with app.app_context():
        outcome = fence_node(node["id"])
        db.session.remove()
    return outcome


def fence_events(api, node):
    return list(api.get(f"event?resource=node&object_id={node['id']}&action=fence")
                .json["data"].values())  # fmt: skip


# ---------------------------------------------------------------------- the fields
def test_the_fields_and_the_agents_installed(api, agents, fenced_node):
    node = fenced_node(fence_address="192.0.2.7")
    assert (node["fence_agent"], node["fence_address"], node["fence_user"]) == (
        "fence_test", "192.0.2.7", "admin")  # fmt: skip
    assert node["ha_state"] == "ok"
    assert api.get(f"node/{node['id']}").json["data"]["ha_state"] == "ok"
    changed = api.patch(f"node/{node['id']}", json={"fence_agent": "fence_test_fail",
                                                    "fence_address": "2001:db8::7",
                                                    "fence_user": "DOMAIN\\ops.1"})  # fmt: skip
    assert changed.status_code == 200, changed.json
    # an agent that is not installed (or not executable) is refused, naming what is
    for wrong in ("fence_nothere", "fence_notexec"):
        error = assert_error(api.patch(f"node/{node['id']}", json={"fence_agent": wrong}), 400,
                             "general/validation")  # fmt: skip
        (message,) = error["data"]["fence_agent"]
        assert wrong in message and str(agents) in message
        assert "installed: fence_test, fence_test_fail, fence_test_hang" in message
    error = assert_error(api.post("node", json=node_body(fence_agent="fence_nothere")), 400,
                         "general/validation")  # fmt: skip
    assert "fence_agent" in error["data"]
    # none at all: null
    cleared = api.patch(f"node/{node['id']}", json={"fence_agent": None, "fence_user": None})
    assert (cleared.json["data"]["fence_agent"], cleared.json["data"]["fence_user"]) == (None, None)
    # ha_state is the watcher's
    assert_error(api.patch(f"node/{node['id']}", json={"ha_state": "fenced"}), 400,
                 "general/validation")  # fmt: skip
    assert api.get(f"node/{node['id']}").json["data"]["ha_state"] == "ok"


@pytest.mark.parametrize(
    ("field", "bad"),
    [("fence_agent", "ipmitool"), ("fence_agent", "fence_x;reboot"), ("fence_agent", "/usr/sbin/fence_test"),
     ("fence_agent", "fence_test\n"), ("fence_address", "bmc 1"), ("fence_address", "bmc1\naction=on"),
     ("fence_address", "-bmc"), ("fence_address", "1::2::3"), ("fence_address", ""),
     ("fence_user", "admin\naction=on"), ("fence_user", "ad min"), ("fence_user", ""),
     ("fence_user", "admin\n"), ("fence_user", "a" * 256)],
)  # fmt: skip
def test_what_would_reach_the_agent_is_checked(api, field, bad):
    error = assert_error(api.post("node", json=node_body(**{field: bad})), 400,
                         "general/validation")  # fmt: skip
    assert field in error["data"]


def test_the_document_describes_them(api):
    node = api.get("openapi.json").json["components"]["schemas"]["Node"]["properties"]
    assert node["ha_state"]["readOnly"] is True
    assert node["fence_agent"]["nullable"] is True and node["fence_agent"]["pattern"]


# ---------------------------------------------------------------------- fence_node
def test_off_then_status_off_is_fenced(app, api, client, agents, fenced_node, caplog):
    node = fenced_node()
    before = value(scrape(client, api.token), "vmapi_fence_total", result="off")
    with caplog.at_level(logging.INFO):
        outcome = fence(app, node)
    assert outcome.off is True, outcome
    assert "status says off" in outcome.detail and outcome.seconds > 0
    made = calls(agents)
    assert [c["options"]["action"] for c in made] == ["off", "status"]
    for call in made:  # everything on stdin, nothing on the command line
        assert call["agent"] == "fence_test" and call["argv"] == []
        assert call["options"] == {"ip": node["fence_address"], "username": "admin",
                                   "password": SECRET, "action": call["options"]["action"]}  # fmt: skip
    (event,) = fence_events(api, node)
    assert event["outcome"] == "ok" and event["actor"].startswith("cli:")
    assert event["after"]["off"] is True and event["after"]["fence_agent"] == "fence_test"
    assert value(scrape(client, api.token), "vmapi_fence_total", result="off") == before + 1
    assert f"node {node['fqdn']} fenced by fence_test" in caplog.text
    assert SECRET not in caplog.text and SECRET not in str(event)
    # the node's ha_state is the caller's to change
    assert api.get(f"node/{node['id']}").json["data"]["ha_state"] == "ok"


def test_an_agent_that_says_off_while_status_says_on_does_not_fence(app, api, agents, fenced_node):
    node = fenced_node("fence_test_on")
    outcome = fence(app, node)
    assert outcome.off is False and "status still says on" in outcome.detail
    assert [c["options"]["action"] for c in calls(agents)] == ["off", "status"]
    (event,) = fence_events(api, node)
    assert (event["outcome"], event["after"]["off"]) == ("still_on", False)


def test_a_failing_agent_does_not_fence_and_no_status_is_asked(
    app, api, client, agents, fenced_node, caplog
):
    node = fenced_node("fence_test_fail")
    before = value(scrape(client, api.token), "vmapi_fence_total", result="failed")
    with caplog.at_level(logging.INFO):
        outcome = fence(app, node)
    assert outcome.off is False
    assert "fence_test_fail off failed (exit 1)" in outcome.detail
    assert "Unable to connect/login to fencing device" in outcome.detail
    assert [c["options"]["action"] for c in calls(agents)] == ["off"]
    assert fence_events(api, node)[0]["outcome"] == "failed"
    assert value(scrape(client, api.token), "vmapi_fence_total", result="failed") == before + 1
    assert [r.levelname for r in caplog.records if "NOT fenced" in r.getMessage()] == ["ERROR"]


def test_what_the_agent_says_never_shows_the_password(app, api, fenced_node, caplog):
    node = fenced_node("fence_test_leak")
    with caplog.at_level(logging.DEBUG):
        outcome = fence(app, node)
    assert outcome.off is False and "login failed for admin/***" in outcome.detail
    assert SECRET not in outcome.detail and SECRET not in caplog.text
    assert SECRET not in str(fence_events(api, node))


def test_a_hanging_agent_is_killed_at_the_bound(app, api, agents, fenced_node):
    app.config["HA_FENCE_TIMEOUT"] = 1.0  # the agent would hang for an hour
    node = fenced_node("fence_test_hang")
    outcome = fence(app, node)
    assert outcome.off is False and "no answer within 1 s (killed)" in outcome.detail
    (call,) = calls(agents)
    assert fence_events(api, node)[0]["outcome"] == "timeout"
    for pid in (call["pid"], call["child"]):  # the agent and what it started: all gone
        assert gone(pid), pid


def gone(pid: int) -> bool:
    """Whether ``pid`` is gone (or a zombie about to be reaped), waiting a little for it."""
    for _ in range(100):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_no_agent_no_fencing(app, api, client, agents, fenced_node, caplog):
    node = fenced_node(None)
    before = value(scrape(client, api.token), "vmapi_fence_total", result="no_agent")
    with caplog.at_level(logging.INFO):
        outcome = fence(app, node)
    assert outcome.off is False
    assert f"has no fence agent: power it off by hand, then confirm with flask vmapi node " \
           f"fenced {node['fqdn']}" in outcome.detail  # fmt: skip
    assert calls(agents) == []
    assert fence_events(api, node)[0]["outcome"] == "no_agent"
    assert value(scrape(client, api.token), "vmapi_fence_total", result="no_agent") == before + 1
    assert "NOT fenced" in caplog.text


def test_an_agent_gone_since_it_was_set(app, api, agents, fenced_node):
    node = fenced_node("fence_test_on")
    (agents / "fence_test_on").unlink()
    outcome = fence(app, node)
    assert outcome.off is False and "No fence agent fence_test_on in" in outcome.detail
    assert "installed: fence_test, fence_test_fail" in outcome.detail and calls(agents) == []


def test_passwords_from_the_folder(app, api, agents, passwords, fenced_node):
    # one that fence-agents would strip (blanks, quotes) arrives whole
    node = fenced_node(password=' "odd" pass ')
    assert fence(app, node).off
    assert {c["options"]["password"] for c in calls(agents)} == {' "odd" pass '}
    # no file for the node: no password
    other = fenced_node(password=None)
    assert fence(app, other).off
    assert all("password" not in c["options"] for c in calls(agents)[2:])
    # a file that cannot be read, or holds two lines: not fenced, the agent never runs
    (passwords / other["fqdn"]).mkdir()
    outcome = fence(app, other)
    assert not outcome.off and "cannot be read" in outcome.detail and len(calls(agents)) == 4
    third = fenced_node(password="one\ntwo")
    outcome = fence(app, third)
    assert not outcome.off and "must hold one line" in outcome.detail and len(calls(agents)) == 4
    assert "two" not in outcome.detail


def test_no_password_folder_no_password(app, api, agents, passwords, fenced_node):
    node = fenced_node()
    app.config["HA_FENCE_PASSWORD_DIR"] = str(passwords / "absent")
    assert fence(app, node).off
    app.config["HA_FENCE_PASSWORD_DIR"] = None
    assert fence(app, node).off
    assert [sorted(c["options"]) for c in calls(agents)] == [["action", "ip", "username"]] * 4


def test_no_node(app):
    with app.app_context():
        outcome = fence_node(999_999)
    assert outcome.off is False and "no node with id 999999" in outcome.detail


# ---------------------------------------------------------------------- node fenced
def set_state(app, node, state):
    with app.app_context():
        db.session.execute(sa.text("UPDATE node SET ha_state = :s WHERE id = :id"),
                           {"s": state, "id": node["id"]})  # fmt: skip
        db.session.commit()
        db.session.remove()


@pytest.mark.parametrize("state", ["fence_failed", "fencing", "suspect"])
def test_an_operator_confirms_a_node_powered_off_by_hand(app, api, runner, fenced_node, state):
    node = fenced_node(None)
    set_state(app, node, state)
    result = runner.invoke(args=["vmapi", "node", "fenced", node["fqdn"]])
    assert result.exit_code == 0, result.output
    assert f"{node['fqdn']} is fenced (it was {state})" in result.output
    assert api.get(f"node/{node['id']}").json["data"]["ha_state"] == "fenced"
    with app.app_context():
        since = db.session.scalar(sa.text(f"SELECT ha_since FROM node WHERE id = {node['id']}"))
    assert since is not None
    events = api.get(f"event?resource=node&object_id={node['id']}&action=confirm_fenced")
    (event,) = events.json["data"].values()
    assert event["actor"] == f"cli:{getpass.getuser()}"
    assert (event["before"], event["after"]["ha_state"]) == ({"ha_state": state}, "fenced")
    # again: nothing to do
    again = runner.invoke(args=["vmapi", "node", "fenced", node["fqdn"]])
    assert again.exit_code == 0 and "already fenced" in again.output
    assert len(api.get(f"event?resource=node&object_id={node['id']}&action=confirm_fenced")
               .json["data"]) == 1  # fmt: skip


@pytest.mark.parametrize("state", ["ok", "recovered"])
def test_a_node_that_is_not_lost_is_not_confirmed(app, api, runner, fenced_node, state):
    node = fenced_node(None)
    set_state(app, node, state)
    result = runner.invoke(args=["vmapi", "node", "fenced", node["fqdn"]])
    assert result.exit_code == 1
    assert f"{node['fqdn']} is {state}, not lost" in result.output
    assert api.get(f"node/{node['id']}").json["data"]["ha_state"] == state
    unknown = runner.invoke(args=["vmapi", "node", "fenced", "nowhere.example.com"])
    assert unknown.exit_code == 1 and "no node nowhere.example.com" in unknown.output
