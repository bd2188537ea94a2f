"""Fixtures of the hypervisor tier: two private libvirtd hosts (tests/hypervisor/two_hosts.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import unavailable
from tests.hypervisor.two_hosts import HostUnavailable, TwoHosts, check_machine, two_hosts


@pytest.fixture(scope="session")
def host_pair() -> Iterator[TwoHosts]:
    """Hosts ``a`` and ``b``: two libvirtd daemons of their own, started once per session
    and always stopped at its end (domains destroyed, daemons ended, folders removed)."""
    try:
        check_machine()
    except HostUnavailable as exc:
        unavailable(str(exc))
    with two_hosts() as pair:
        yield pair
