"""Asking a running test guest to try one thing on its network, and reading what it did.

The test guest (tests/guest/) serves ``/cgi-bin/probe`` on port 80 (busybox httpd,
rootfs/www/cgi-bin/probe): each request runs one action inside the guest and answers one
line ``VMAPI-PROBE action=... key=value ...``, which the guest also prints on its serial
console. The request goes from inside the test's namespace (``net.get``), so the probe
channel is HTTP to the guest's port 80: a filter under test must leave that open.

    answer = probe(net, guest, "ping4", src="198.51.100.99", dst="198.51.100.1")
    assert answer["added"] == "yes"     # the guest held the spoofed source meanwhile
    answer["received"]                  # any key of the answer line, as text

A request the guest refuses (a value outside its pattern) or does not answer raises
``ProbeError``. ``ok`` is the command's own success: a ping nobody answered (a filter
dropped it) is not ok, yet its echo requests went out; judge what a filter let through
by the capture (tests/hypervisor/capture.py), not by the answer.

``guest`` is the guest's IPv4 or IPv6 address (the one to send the request to).
Actions and their keywords (addresses as text, either form; MACs ``aa:bb:...``):

==============  =======================================  ==================================
action          keywords                                 what the guest does
==============  =======================================  ==================================
info            -                                        answers dev, mac, addresses,
                                                         tentative, settled
ping4, ping6    dst, src=None, count=2                   pings dst from src (added to the
                                                         NIC for it, IPv6 with no DAD, and
                                                         removed; none: the real address)
garp            ip, count=2                              gratuitous ARP claiming ip
                                                         (arping -U, ip added for it)
mac             new, dst, count=2                        NIC's MAC set to new, pings dst
                                                         from the real address, MAC back
na              target, mac=None (the guest's),          unsolicited NA: target is at mac,
                source=None (target)                     from source
ra              prefix=..., router_lifetime=0, ...       router advertisement from its
                                                         link-local address (frames.py)
dhcp-offer      offered=None, server=None, client=...    DHCPOFFER from UDP 67 to 68
frame           frame (bytes)                            any Ethernet frame, as given
tcp-connect     dst, port                                TCP connection to dst:port (nc),
                                                         sends a line; connected=yes|no,
                                                         got= what came back
tcp-listen      port                                     web server on port answering
                                                         "VMAPI-PORT <port>"
tcp-close       port                                     that server stopped
==============  =======================================  ==================================

``na``, ``ra`` and ``dhcp-offer`` are built here (tests/guest/frames.py) from what the
guest says of itself (``info``: its MAC, link-local and IPv4 address) and sent by the
guest's ``/bin/vmapi-sendframe`` (busybox cannot write them). ``count`` (1..10) and
``dev`` (the guest's NIC, default its first) go with every action.

``wait_ready(net, guest)`` polls ``info`` until the guest answers and its NIC has settled
(no IPv6 address still in duplicate address detection, the link-local one there: right
after a boot the guest's kernel sends IPv6 from addresses not its own, ``::1`` even,
which a spoofing filter rightly drops); ``ProbeError`` is raised
when the guest did not answer or refused the request (a bad value).

A module of the hypervisor tier gets a probe guest with (``env``: tests/hypervisor/
conftest.py; see test_guest_probes.py)::

    @pytest.fixture(scope="module")
    def net(env):
        with guest_network(GATEWAYS) as made, node_on_bridge(env, made):
            yield made

    @pytest.fixture(scope="module")
    def guest(env, net, guest_image) -> ProbeGuest:
        return boot_guest(env, net, env.upload(guest_image.path)["id"])

``boot_guest`` creates the VM through the API (extra fields go into its POST /vm body),
waits for its probes and answers its addresses, MAC and link-local address as the API
and the guest tell them.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tests.conftest import GIB
from tests.guest import console, frames

if TYPE_CHECKING:  # (types only: the unit tests use the probes without a vmapi)
    from tests.hypervisor.boot_env import BootEnv
    from tests.hypervisor.guest_net import GuestNetwork

#: what the CGI does itself; the rest are frames built here
GUEST_ACTIONS = ("info", "ping4", "ping6", "garp", "mac", "tcp-connect", "tcp-listen", "tcp-close")
FRAME_ACTIONS = ("na", "ra", "dhcp-offer", "frame")
#: how long one request may take (a ping of 10 unanswered echoes takes 13 s)
TIMEOUT = 30


class ProbeError(AssertionError):
    """The guest did not answer, or would not do what was asked."""


@dataclass(frozen=True)
class ProbeAnswer:
    """The guest's answer line, by key."""

    fields: dict[str, str]
    text: str = ""

    def __getitem__(self, key: str) -> str:
        return self.fields[key]

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.fields.get(key, default)

    @property
    def action(self) -> str:
        return self.fields.get("action", "")

    @property
    def ok(self) -> bool:
        """The guest ran it and its command succeeded (a ping with an answer, a frame
        sent, ...). A ping nobody answered is not ok, yet its echo requests went out."""
        return self.fields.get("result") != "refused" and self.fields.get("rc", "0") == "0"


@dataclass(frozen=True)
class GuestInfo:
    dev: str
    mac: str
    addresses: list[str] = field(default_factory=list)  # with prefixes, as the NIC has them
    settled: bool = True  # no IPv6 address tentative, the link-local one there

    def _hosts(self, version: int) -> list[str]:
        found = [ipaddress.ip_interface(a) for a in self.addresses]
        return [str(a.ip) for a in found if a.version == version]

    @property
    def ipv4(self) -> list[str]:
        return self._hosts(4)

    @property
    def ipv6(self) -> list[str]:
        """Global IPv6 addresses (no link-local)."""
        return [a for a in self._hosts(6) if not ipaddress.ip_address(a).is_link_local]

    @property
    def link_local(self) -> str:
        found = [a for a in self._hosts(6) if ipaddress.ip_address(a).is_link_local]
        return found[0] if found else frames.link_local(self.mac)


def parse_answer(text: str) -> ProbeAnswer:
    """The last ``VMAPI-PROBE`` line of ``text``, by key."""
    lines = [line for line in text.splitlines() if line.startswith("VMAPI-PROBE ")]
    if not lines:
        raise ProbeError(f"no VMAPI-PROBE line in the guest's answer: {text!r}")
    pairs = (part.split("=", 1) for part in lines[-1].split()[1:] if "=" in part)
    return ProbeAnswer({key: value for key, value in pairs}, text)


def _value(value: Any) -> str:
    """A query value as the CGI takes it: addresses in their canonical form, MACs and hex
    in lower case (the CGI decodes nothing, and accepts only these characters)."""
    if isinstance(value, bytes):
        return value.hex()
    text = str(value).lower()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


def probe_url(guest: str, action: str, **params: Any) -> str:
    host = f"[{ipaddress.ip_address(guest)}]" if ":" in guest else guest
    query = "&".join(f"{key}={_value(value)}" for key, value in
                     [("action", action), *params.items()] if value is not None)  # fmt: skip
    return f"http://{host}/cgi-bin/probe?{query}"


def ask(net, guest: str, action: str, timeout: int = TIMEOUT, **params: Any) -> ProbeAnswer:
    """One request to the guest's CGI, as is (no frame built)."""
    text = net.get(probe_url(guest, action, **params), timeout=timeout)
    if text is None:
        raise ProbeError(f"the guest at {guest} did not answer {action} {params}")
    answer = parse_answer(text)
    if answer.get("result") == "refused":
        raise ProbeError(f"the guest refused {action} {params}: {answer.get('reason')}")
    return answer


def info(net, guest: str) -> GuestInfo:
    answer = ask(net, guest, "info")
    addresses = [] if answer["addresses"] == "-" else answer["addresses"].split(",")
    return GuestInfo(answer["dev"], answer["mac"], addresses, answer.get("settled") == "yes")


def wait_ready(net, guest: str, within: float = 180.0) -> GuestInfo:
    """The guest's info once its probe answers and its NIC has settled (a booting guest
    takes ~10 s under TCG, its IPv6 addresses a few more)."""
    deadline = time.monotonic() + within
    while True:
        try:
            about = info(net, guest)
            if about.settled:
                return about
            problem = f"the guest's NIC has not settled: {about}"
        except ProbeError as exc:
            problem = str(exc)
        if time.monotonic() > deadline:
            raise ProbeError(f"not ready within {within:.0f} s: {problem}")
        time.sleep(1)


def build_frame(action: str, about: GuestInfo, **params: Any) -> bytes:
    """The frame of ``na``, ``ra`` or ``dhcp-offer`` for the guest described by ``about``."""
    if action == "na":
        return frames.neighbour_advert(params.pop("mac", None) or about.mac,
                                       _value(params.pop("target")), **params)  # fmt: skip
    if action == "ra":
        return frames.router_advert(about.mac, about.link_local, **params)
    if action == "dhcp-offer":
        [own] = [a for a in about.addresses if ":" not in a][:1] or [None]
        if own is None and "server" not in params:
            raise ProbeError("a DHCP offer needs the guest's IPv4 address (or server=)")
        server = params.pop("server", None) or str(ipaddress.ip_interface(own).ip)
        offered = params.pop("offered", None)
        if offered is None:  # a free-looking address of the guest's own network
            offered = str(ipaddress.ip_interface(own or f"{server}/24").network[-2])
        return frames.dhcp_offer(about.mac, server, offered, **params)
    raise ValueError(f"no frame is built for {action}")


def probe(net, guest: str, action: str, *, count: int | None = None, dev: str | None = None,
          **params: Any) -> ProbeAnswer:  # fmt: skip
    """Ask the guest at ``guest`` (reached from ``net``'s namespace) to do ``action``; its
    answer. See the module's table for the actions and their keywords."""
    common = {"count": count, "dev": dev}
    if action in GUEST_ACTIONS:
        return ask(net, guest, action, **common, **params)
    if action not in FRAME_ACTIONS:
        raise ValueError(f"unknown probe action {action!r}")
    frame = params.pop("frame") if action == "frame" else \
        build_frame(action, info(net, guest), **params)  # fmt: skip
    return ask(net, guest, action, **common, frame=frame)


@dataclass(frozen=True)
class ProbeGuest:
    """A booted test guest that answers probes: its VM as the API created it, the
    addresses the API assigned it, its MAC and IPv6 link-local address."""

    vm: dict
    ipv4: str
    ipv6: str
    mac: str
    link_local: str


@contextmanager
def node_on_bridge(env: BootEnv, net: GuestNetwork) -> Iterator[None]:
    """The shared node puts its VMs' NICs on ``net``'s bridge for the block; after it
    the VMs go (none may stay on the bridge) and the node's networking is put back."""
    node = f"node/{env.node['id']}"
    body = {"interface_mode": "bridge", "bridge": net.bridge}
    before = env.api.get(node).json["data"]
    changed = env.api.update(node, json=body)
    assert changed.status_code == 200, changed.json
    try:
        yield
    finally:
        for vm in env.api.get("vm").json["data"]:
            gone = env.api.delete(f"vm/{vm}")
            assert gone.status_code == 200, gone.json
        back = env.api.update(node, json={name: before[name] for name in body})
        assert back.status_code == 200, back.json


def boot_guest(env: BootEnv, net: GuestNetwork, image_id: int, **fields) -> ProbeGuest:
    """A VM of the test guest image ``image_id`` (``fields`` go into POST /vm), once its
    probes answer from ``net``'s namespace."""
    vm = env.create(image_id, **{"root_size": GIB, **fields})
    return guest_ready(env.api, env.console(vm["id"]), net, vm)


def guest_ready(api, read_console: Callable[[], str], net: GuestNetwork, vm: dict) -> ProbeGuest:
    """The test guest of ``vm`` (just created through ``api``; ``read_console`` reads its
    console log) once its probes answer from ``net``'s namespace."""
    iface = api.get(f"interface/{vm['interfaces'][0]['id']}").json["data"]
    v4 = api.get(f"ipv4/{iface['ipv4'][0]['id']}").json["data"]["address"]
    v6 = api.get(f"ipv6/{iface['ipv6'][0]['id']}").json["data"]["address"]

    def ready(text: str) -> bool:
        boots = console.boots(text)
        return bool(boots) and boots[-1].httpd and boots[-1].probes_ready

    console.wait_for(read_console, ready, "the guest's web server and probes")
    about = wait_ready(net, v4)
    assert about.mac == iface["mac"].lower(), (about, iface)
    assert v4 in about.ipv4 and v6 in about.ipv6, (about, v4, v6)
    return ProbeGuest(vm, v4, str(ipaddress.ip_address(v6)), about.mac, about.link_local)
