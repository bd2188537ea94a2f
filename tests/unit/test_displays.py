"""Which display addresses mean "the console proxy's own host" (vmapi.displays): IPv4-mapped
IPv6 forms included, which Python's ipaddress does not call loopback or unspecified."""

import pytest

from vmapi.displays import display_problem, remote_host, this_host

REMOTE = "qemu+tls://hv9.example.com/system"

THIS_HOST = ["127.0.0.1", "127.1.2.3", "::1", "0.0.0.0", "0.1.2.3", "::",
             "::ffff:127.0.0.1", "::ffff:7f00:1", "::ffff:127.9.9.9", "::ffff:0.0.0.0",
             "::ffff:0.1.2.3"]  # fmt: skip
ELSEWHERE = ["192.0.2.10", "2001:db8::10", "::ffff:192.0.2.10", "1.0.0.0"]


@pytest.mark.parametrize("address", THIS_HOST)
def test_this_host_addresses_are_refused_for_a_remote_node(address):
    assert this_host(address)
    problem = display_problem(REMOTE, address)
    assert problem is not None and "hv9.example.com" in problem


@pytest.mark.parametrize("address", ELSEWHERE)
def test_other_addresses_are_taken(address):
    assert not this_host(address)
    assert display_problem(REMOTE, address) is None


@pytest.mark.parametrize("uri", ["qemu+tcp://[::ffff:127.0.0.1]/system",
                                 "qemu+tcp://127.0.0.2/system", "qemu+tcp://0.0.0.0/system"])  # fmt: skip
def test_a_uri_naming_this_host_in_any_form_is_local(uri):
    assert remote_host(uri) is None
    assert display_problem(uri, "127.0.0.1") is None
