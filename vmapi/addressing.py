"""Plain rules about addresses, shared by request schemas and services (no dependencies)."""

from __future__ import annotations

import ipaddress

#: Addresses one POST of an IPv4 network may add.
MAX_RANGE = 4096
#: The shortest IPv4 prefix whose hosts fit in MAX_RANGE (/20: 4094 hosts).
MIN_RANGE_PREFIX = 32 - (MAX_RANGE + 2).bit_length() + 1


def network_problems(address: str, prefix: int, gateway: str) -> dict[str, list[str]]:
    """What is wrong with an address, its prefix and its gateway (empty when nothing)."""
    net = ipaddress.ip_interface(f"{address}/{prefix}").network
    gw = ipaddress.ip_address(gateway)
    if gw.version != net.version:
        return {"gateway": [f"Must be an IPv{net.version} address."]}
    if gw not in net:
        return {"gateway": [f"Must be inside {net}."]}
    if gw == ipaddress.ip_address(address):
        return {"gateway": ["Must not be the address itself."]}
    if (
        net.version == 4
        and net.prefixlen < 31
        and address
        in (
            str(net.network_address),
            str(net.broadcast_address),
        )
    ):
        return {"address": [f"Is the network or broadcast address of {net}."]}
    return {}
