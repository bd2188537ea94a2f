"""Taking away the empty frame libvirt's filters leave (tests/hypervisor/ruleset.py, the
session's cleanup in tests/hypervisor/conftest.py), on the real kernel but inside a
network namespace of the test's own: its ruleset is the namespace's, the host's is never
touched. The frame is made there by the tools libvirt runs (ebtables, iptables and
ip6tables, their nf_tables variants), as libvirt does for a guest and undoes after it.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import unavailable
from tests.hypervisor import ruleset
from tests.hypervisor.ruleset import TABLES

pytestmark = [pytest.mark.hypervisor]


@pytest.fixture
def prefix() -> Iterator[tuple[str, ...]]:
    """``ip netns exec NS``: a namespace of this test's own, removed after it."""
    for tool in ("nft", "iptables", "ip6tables", "ebtables"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is not installed (Debian packages nftables, iptables)")
    name = f"vmapi-nft-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        yield ("ip", "netns", "exec", name)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


def run(prefix: tuple[str, ...], *command: str) -> None:
    subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=30)


def guest_rules(prefix: tuple[str, ...], tap: str = "vnet7",
                families=("iptables", "ip6tables", "ebtables")) -> None:  # fmt: skip
    """What libvirt writes for one filtered guest (in short): its chains, the frame's
    chains and the jumps to them."""
    for tool in (f for f in families if f != "ebtables"):
        for chain in ("libvirt-in", "libvirt-out", "libvirt-in-post", "libvirt-host-in"):
            run(prefix, tool, "-N", chain)
        for chain in ("libvirt-in", "libvirt-out", "libvirt-in-post"):
            run(prefix, tool, "-A", "FORWARD", "-j", chain)
        run(prefix, tool, "-A", "INPUT", "-j", "libvirt-host-in")
        run(prefix, tool, "-N", f"FI-{tap}")
        run(prefix, tool, "-A", "libvirt-in", "-i", tap, "-j", f"FI-{tap}")
    if "ebtables" not in families:
        return
    run(prefix, "ebtables", "-t", "nat", "-N", f"libvirt-I-{tap}")
    run(prefix, "ebtables", "-t", "nat", "-A", "PREROUTING", "-i", tap, "-j", f"libvirt-I-{tap}")
    run(prefix, "ebtables", "-t", "nat", "-N", f"libvirt-O-{tap}")
    run(prefix, "ebtables", "-t", "nat", "-A", "POSTROUTING", "-o", tap, "-j", f"libvirt-O-{tap}")


def guest_gone(prefix: tuple[str, ...], tap: str = "vnet7", families=("iptables", "ip6tables")):
    """What libvirt removes with the guest: its own chains and jumps, not the frame."""
    for tool in families:
        run(prefix, tool, "-D", "libvirt-in", "-i", tap, "-j", f"FI-{tap}")
        run(prefix, tool, "-X", f"FI-{tap}")
    run(prefix, "ebtables", "-t", "nat", "-D", "PREROUTING", "-i", tap, "-j", f"libvirt-I-{tap}")
    run(prefix, "ebtables", "-t", "nat", "-X", f"libvirt-I-{tap}")
    run(prefix, "ebtables", "-t", "nat", "-D", "POSTROUTING", "-o", tap, "-j", f"libvirt-O-{tap}")
    run(prefix, "ebtables", "-t", "nat", "-X", f"libvirt-O-{tap}")


def test_the_frame_a_gone_guest_left_is_removed(prefix):
    before = ruleset.tables(prefix)
    assert before == set()
    guest_rules(prefix)
    assert ruleset.tables(prefix) == set(TABLES)
    assert ruleset.remove_frames(before, prefix) == []  # a guest's rules: all three kept
    guest_gone(prefix)
    assert ruleset.remove_frames(before, prefix) == list(TABLES)
    assert ruleset.tables(prefix) == set()


def test_a_table_with_more_than_the_frame_stays(prefix):
    before = ruleset.tables(prefix)
    guest_rules(prefix)
    guest_gone(prefix, families=("iptables",))  # ip6 filter: the guest's chain is left
    run(prefix, "ebtables", "-t", "nat", "-A", "PREROUTING", "-j", "ACCEPT")  # another's rule
    assert ruleset.remove_frames(before, prefix) == [("ip", "filter")]
    assert ruleset.tables(prefix) == {("bridge", "nat"), ("ip6", "filter")}
    # nor does a set in it, or a base chain that drops
    guest_rules(prefix, "vnet8", ("iptables",))
    run(prefix, "iptables", "-D", "libvirt-in", "-i", "vnet8", "-j", "FI-vnet8")
    run(prefix, "iptables", "-X", "FI-vnet8")
    run(prefix, "nft", "add", "set", "ip", "filter", "theirs", "{ type ipv4_addr; }")
    assert ruleset.remove_frames(before, prefix) == []
    run(prefix, "nft", "delete", "set", "ip", "filter", "theirs")
    run(prefix, "iptables", "-P", "FORWARD", "DROP")
    assert ruleset.remove_frames(before, prefix) == []
    run(prefix, "iptables", "-P", "FORWARD", "ACCEPT")
    assert ruleset.remove_frames(before, prefix) == [("ip", "filter")]


def test_a_table_that_was_there_before_stays(prefix):
    run(prefix, "iptables", "-N", "libvirt-in")
    run(prefix, "iptables", "-A", "FORWARD", "-j", "libvirt-in")
    before = ruleset.tables(prefix)
    assert before == {("ip", "filter")}
    assert ruleset.remove_frames(before, prefix) == []
    assert ruleset.tables(prefix) == before
