"""A network for test guests, within this workplace's rules (../shared/recipes/test-guest.md):
a bridge in the root namespace with no address on it, and a network namespace of the
test's own holding the gateway addresses on one end of a veth pair whose other end is a
port of the bridge. Guests join the bridge; every probe runs inside the namespace, so the
root namespace never routes to the guests' network.

Names carry a random tag of their own (``vmapi-`` / ``vmt`` prefixes, within Linux's 15
characters), so runs side by side never meet. Everything is removed when the
``guest_network`` context ends, also after a failure.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@dataclass(frozen=True)
class GuestNetwork:
    bridge: str
    namespace: str
    gateways: tuple[str, ...]  # with their prefixes, inside the namespace

    def get(self, url: str, timeout: int = 3) -> str | None:
        """``wget -qO- URL`` from inside the namespace, once: the page, or None when
        nothing answered within ``timeout`` seconds."""
        command = ["ip", "netns", "exec", self.namespace,
                   "wget", "-qO-", "--tries=1", f"--timeout={timeout}", url]  # fmt: skip
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout + 30)
        except subprocess.TimeoutExpired:
            return None
        return result.stdout if result.returncode == 0 else None


def _remove(bridge: str, veth: str, namespace: str) -> None:
    ip("link", "del", bridge, check=False)
    ip("link", "del", veth, check=False)  # (gone with the namespace's end, normally)
    ip("netns", "del", namespace, check=False)


@contextmanager
def guest_network(gateways: tuple[str, ...]) -> Iterator[GuestNetwork]:
    """The bridge and the namespace, the ``gateways`` (e.g. ``198.51.100.1/24``) on the
    namespace's end of the veth pair."""
    tag = uuid.uuid4().hex[:6]
    bridge, namespace = f"vmapi-b{tag}", f"vmapi-ns-{tag}"
    outside, inside = f"vmt{tag}h", f"vmt{tag}n"
    try:
        # every port sees IPv6's neighbour discovery: no multicast snooping (nothing on
        # this bridge would act as MLD querier)
        ip("link", "add", bridge, "type", "bridge", "mcast_snooping", "0")
        # no address on the bridge, not even IPv6's link-local one
        subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{bridge}.disable_ipv6=1"], check=True)
        ip("link", "set", bridge, "up")
        ip("netns", "add", namespace)
        ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{outside}.disable_ipv6=1"], check=True)
        ip("link", "set", inside, "netns", namespace)
        ip("link", "set", outside, "master", bridge)
        ip("link", "set", outside, "up")
        inns = ("netns", "exec", namespace, "ip")
        ip(*inns, "link", "set", "lo", "up")
        for gateway in gateways:
            family = ("-6", "addr", "add", gateway, "dev", inside, "nodad") if ":" in gateway \
                else ("addr", "add", gateway, "dev", inside)  # fmt: skip
            ip(*inns, *family)
        ip(*inns, "link", "set", inside, "up")
        yield GuestNetwork(bridge, namespace, gateways)
    finally:
        _remove(bridge, outside, namespace)
