"""Where the console proxy can reach a node's VNC displays.

The proxy connects to a display at the node's ``console_address`` (null:
``CONSOLE_ADDRESS``). A loopback or unspecified address (127.0.0.0/8, ::1, 0.0.0.0, ::)
means "this host": right for a node whose libvirt is local, wrong for a remote one, where
the proxy would reach a display or service on its own host instead. Pure functions: the
API (node create/update, POST /vm/<id>/console) and the proxy use them alike.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain"})


def remote_host(uri: str) -> str | None:
    """The host a libvirt URI names when it is not this one (None: local)."""
    try:
        host = urlsplit(uri).hostname
    except ValueError:
        return None
    if not host or host in LOCAL_NAMES or host.endswith(".localhost"):
        return None
    try:
        return None if ipaddress.ip_address(host).is_loopback else host
    except ValueError:
        return host


def this_host(address: str | None) -> bool:
    """A loopback or unspecified address (or none at all)."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return address is None
    return ip.is_loopback or ip.is_unspecified


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
