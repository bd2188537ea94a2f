"""Where the console proxy can reach a node's VNC displays.

The proxy connects to a display at the node's ``console_address`` (null:
``CONSOLE_ADDRESS``). A loopback or unspecified address (127.0.0.0/8, ::1, 0.0.0.0/8,
::, and their IPv4-mapped forms such as ::ffff:127.0.0.1) means "this host": right for
a node whose libvirt is local, wrong for a remote one, where the proxy would reach a
display or service on its own host instead. Pure functions: the API (node create/update,
POST /vm/<id>/console) and the proxy use them alike.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain"})


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """``text`` as an address, an IPv4-mapped IPv6 one (``::ffff:127.0.0.1``) as the IPv4
    address it reaches: Python 3.11 calls ``::ffff:127.0.0.1`` neither loopback nor
    ``::ffff:0.0.0.0`` unspecified, yet a connection to them reaches this host."""
    ip = ipaddress.ip_address(text)
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped if mapped is not None else ip


def _this_host_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Loopback, unspecified, or in 0.0.0.0/8 ("this network", which Linux takes as this
    host)."""
    return (
        ip.is_loopback
        or ip.is_unspecified
        or (ip.version == 4 and ip in ipaddress.ip_network("0.0.0.0/8"))
    )


def remote_host(uri: str) -> str | None:
    """The host a libvirt URI names when it is not this one (None: local)."""
    try:
        host = urlsplit(uri).hostname
    except ValueError:
        return None
    if not host or host in LOCAL_NAMES or host.endswith(".localhost"):
        return None
    try:
        return None if _this_host_ip(_ip(host)) else host
    except ValueError:
        return host


def this_host(address: str | None) -> bool:
    """A loopback or unspecified address, IPv4-mapped or not (or none at all)."""
    try:
        ip = _ip(address or "")
    except ValueError:
        return address is None
    return _this_host_ip(ip)


def display_problem(uri: str, address: str | None) -> str | None:
    """Why the proxy cannot reach displays at ``address`` on the node of ``uri`` (None:
    it can, as far as addresses tell)."""
    host = remote_host(uri)
    if host is None or not this_host(address):
        return None
    return (
        f"the node's libvirt is on {host}, but its displays listen on {address}, an "
        "address of the console proxy's own host; set the node's console_address to an "
        "address of the node that the console proxy reaches"
    )
