"""vmapi.services.ha.agents without a database: which agents are installed, a node's
password file, values written the way fence-agents read them back."""

import re

import pytest

from vmapi.services.ha.agents import (
    AgentFailure,
    agent_dirs,
    agent_problem,
    find_agent,
    installed_agents,
    read_password,
    stdin_value,
)


def agent(folder, name, executable=True):
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755 if executable else 0o644)
    return path


def test_installed_agents_and_where_they_are_found(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    agent(a, "fence_ipmilan")
    agent(a, "fence_plain", executable=False)
    agent(a, "ipmitool")
    agent(b, "fence_ipmilan")
    agent(b, "fence_redfish")
    (b / "fence_dir").mkdir()
    dirs = agent_dirs(f"{tmp_path / 'none'}::{a}:{b}")
    assert dirs == [str(tmp_path / "none"), str(a), str(b)]
    assert installed_agents(dirs) == ["fence_ipmilan", "fence_redfish"]
    assert find_agent("fence_ipmilan", dirs) == str(a / "fence_ipmilan")  # the first folder
    assert find_agent("fence_redfish", dirs) == str(b / "fence_redfish")
    for absent in ("fence_plain", "fence_dir", "ipmitool", "fence_../a/fence_ipmilan"):
        assert find_agent(absent, dirs) is None
    assert agent_problem("fence_redfish", dirs) is None
    problem = agent_problem("fence_apc", dirs)
    assert problem.endswith("; installed: fence_ipmilan, fence_redfish.")
    assert "none is installed there" in agent_problem("fence_apc", [str(tmp_path / "none")])
    assert "(no folder)" in agent_problem("fence_apc", agent_dirs(""))


def test_password_files(tmp_path):
    assert read_password(None, "n1.example.com") is None
    assert read_password(str(tmp_path / "absent"), "n1.example.com") is None
    assert read_password(str(tmp_path), "n1.example.com") is None  # no file for it
    (tmp_path / "n1.example.com").write_bytes(b"secret\r\n")
    assert read_password(str(tmp_path), "n1.example.com") == "secret"
    (tmp_path / "n1.example.com").write_text(" spaced \n")
    assert read_password(str(tmp_path), "n1.example.com") == " spaced "
    (tmp_path / "n1.example.com").write_text("")
    assert read_password(str(tmp_path), "n1.example.com") == ""
    for content, reason in [(b"one\ntwo\n", "must hold one line"), (b"one\n\n", "one line"),
                            (b"\xff\xfe", "not UTF-8"), (b"a\x00b", "one line")]:  # fmt: skip
        (tmp_path / "n1.example.com").write_bytes(content)
        with pytest.raises(AgentFailure, match=reason) as failure:
            read_password(str(tmp_path), "n1.example.com")
        assert "one\n" not in str(failure.value) and "two" not in str(failure.value)
    (tmp_path / "n2.example.com").mkdir()
    with pytest.raises(AgentFailure, match="cannot be read"):
        read_password(str(tmp_path), "n2.example.com")
    with pytest.raises(AgentFailure, match="cannot name"):
        read_password(str(tmp_path), "../n1.example.com")


def fence_agents_read(line: str) -> str:
    """A value as fence-agents' fencing.py reads it from a ``name=value`` line."""
    _name, value = (line.strip() + "=").split("=", 1)
    return re.sub(r'^"(.*)"$', r"\1", value[:-1])


@pytest.mark.parametrize(
    "value",
    ["plain", "with space", " lead", "trail ", '"quoted"', '"', '""', 'a"b', "=eq=", "#x", ""],
)
def test_values_arrive_whole(value):
    assert fence_agents_read(f"password={stdin_value(value)}\n") == value
