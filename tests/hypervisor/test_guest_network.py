"""Guests that know who they are, over a real network (issue 14).

A node on the real libvirtd in ``bridge`` mode whose ``bridge`` is a bridge this test made
(tests/hypervisor/guest_net.py: no address on it; the gateways of the API's address
ranges inside a network namespace of the test's own). A VM booted from the test guest
(tests/guest/) with a host name, an SSH key and user data: its init reads the cloud-init
seed vmapi attached, configures its NIC from it and serves what it was told over HTTP.
From inside the namespace the test reaches it at the IPv4 and the IPv6 address the API
assigned and reads its host name and key. Then the interface moves to other free
addresses through the API, the VM is power-cycled through the API, and the guest answers
at the new addresses only. Diagnostics in the assertions come from GET /vm/<id>/console_log.

The module's tests share the session's vmapi (``env``, tests/hypervisor/boot_env.py), one
network and one guest (a boot costs about 10 s under TCG); each test reads where the guest
is now instead of where another test left it, so they pass in any order and alone.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable

import pytest

from tests.conftest import GIB
from tests.guest import console
from tests.hypervisor.boot_env import BootEnv
from tests.hypervisor.guest_net import GuestNetwork, guest_network

pytestmark = [pytest.mark.hypervisor]

#: the gateways of the address ranges boot_env registers through the API
GATEWAYS = ("198.51.100.1/24", "2001:db8:100::1/64")
SHUTOFF, RUNNING = 4, 2  # the seeded vm_state ids
#: how long a guest may take to answer (TCG on a busy machine); only bounds a hang
WAIT = 180.0


def _wire(*fields: bytes) -> bytes:
    return b"".join(len(f).to_bytes(4, "big") + f for f in fields)


KEY = "ssh-ed25519 " + base64.b64encode(
    _wire(b"ssh-ed25519", bytes(range(100, 132)))
).decode() + " owner@example"  # fmt: skip
USER_DATA = "#cloud-config\nruncmd: [echo hello]\n"


@pytest.fixture(scope="module")
def net(env) -> GuestNetwork:
    with guest_network(GATEWAYS) as made:
        # the node's NICs join the test's bridge: one bridge for every VM (no {suffix})
        body = {"interface_mode": "bridge", "bridge": made.bridge}
        before = env.api.get(f"node/{env.node['id']}").json["data"]
        changed = env.api.update(f"node/{env.node['id']}", json=body)
        assert changed.status_code == 200, changed.json
        yield made
        for vm in env.api.get("vm").json["data"]:  # no domain on the bridge as it goes
            assert env.api.delete(f"vm/{vm}").status_code == 200
        back = {name: before[name] for name in body}
        assert env.api.update(f"node/{env.node['id']}", json=back).status_code == 200


@pytest.fixture(scope="module")
def image(env, guest_image) -> dict:
    """The test guest, uploaded through the API (it goes with the module: ``env``)."""
    return env.upload(guest_image.path)


def make_guest(env: BootEnv, image: dict) -> dict:
    return env.create(image["id"], ram=256 * 1024 * 1024, root_size=GIB, hostname="guest-one",
                      ssh_keys=[KEY], user_data=USER_DATA)  # fmt: skip


@pytest.fixture(scope="module")
def guest(env, net, image) -> dict:
    """A VM of the test guest with a host name, a key and user data, on the bridge."""
    return make_guest(env, image)


def addresses(env: BootEnv, vm: dict) -> tuple[str, str]:
    iface = env.api.get(f"interface/{vm['interfaces'][0]['id']}").json["data"]
    v4 = env.api.get(f"ipv4/{iface['ipv4'][0]['id']}").json["data"]["address"]
    v6 = env.api.get(f"ipv6/{iface['ipv6'][0]['id']}").json["data"]["address"]
    return v4, v6


def url(address: str) -> str:
    return f"http://[{address}]/" if ":" in address else f"http://{address}/"


def console_tail(env: BootEnv, vm: dict) -> str:
    text = env.api.get(f"vm/{vm['id']}/console_log?bytes=8192").json["data"]["text"]
    return "\n".join(console.lines(text)[-40:])


def page_at(net: GuestNetwork, address: str, env: BootEnv, vm: dict) -> dict[str, list[str]]:
    """The guest's page at ``address`` (retried until it answers); its lines by key."""
    deadline = time.monotonic() + WAIT
    while (page := net.get(url(address))) is None:
        assert time.monotonic() < deadline, (
            f"no answer at {url(address)} within {WAIT:.0f} s; console ends:\n"
            + console_tail(env, vm)
        )
        time.sleep(1)
    found: dict[str, list[str]] = {}
    for line in page.splitlines():
        key, _, value = line.partition("=")
        found.setdefault(key, []).append(value)
    return found


def booted(env: BootEnv, vm: dict, count: int) -> Callable[[str], bool]:
    """Whether the console shows ``count`` boots, the last with its web server up."""

    def done(text: str) -> bool:
        boots = console.boots(text)
        return len(boots) >= count and boots[-1].httpd

    return done


def read_console(env: BootEnv, vm: dict) -> Callable[[], str]:
    return lambda: env.api.get(f"vm/{vm['id']}/console_log?bytes=1048576").json["data"]["text"]


def test_the_guest_answers_at_the_addresses_the_api_assigned(env, net, guest):
    vm = guest
    v4, v6 = addresses(env, vm)  # as assigned at its creation, or by a move since
    text = console.wait_for(read_console(env, vm), booted(env, vm, 1), "the guest's web server")
    boot = console.boots(text)[-1]
    assert boot.errors == [], boot.errors
    assert boot.hostname == "guest-one" and boot.keys == 1
    [nic] = boot.nics
    assert nic["addresses"] == f"{v4}/24,{v6}/64", nic
    for address in (v4, v6):
        page = page_at(net, address, env, vm)
        assert page["hostname"] == ["guest-one"], page
        assert page["ssh-key"] == [KEY], page
        # what it was told; beside them, once its kernel has added it, the NIC's IPv6
        # link-local address (listed or not, depending on when the page was written)
        told = [a for a in page["address"] if not a.startswith("fe80:")]
        assert sorted(told) == sorted([f"{v4}/24", f"{v6}/64"]), page


def test_after_a_move_and_a_power_cycle_it_answers_at_the_new_addresses_only(env, net, guest):
    vm = guest
    old4, old6 = addresses(env, vm)
    text = console.wait_for(read_console(env, vm), booted(env, vm, 1), "the guest's web server")
    boots = len(console.boots(text))
    instance = page_at(net, old4, env, vm)["instance-id"]
    # a free IPv4 of the range; and an IPv6 of the pool that a VM took and gave back
    iface = env.api.get(f"interface/{vm['interfaces'][0]['id']}").json["data"]
    free4 = next(a for a in env.api.get("ipv4?limit=1000").json["data"].values()
                 if a["interface"] is None and a["id"] > iface["ipv4"][0]["id"])  # fmt: skip
    other = env.api.post("vm", json={"cores": 1, "ram": 64 * 1024 * 1024,
                                     "virt_method": {"id": env.method}})  # fmt: skip
    assert other.status_code == 201, other.json
    other = other.json["data"]
    spare6 = env.api.get(f"interface/{other['interfaces'][0]['id']}").json["data"]["ipv6"][0]
    assert env.api.delete(f"vm/{other['id']}").status_code == 200
    moved = env.api.update(f"interface/{iface['id']}",
                           json={"ipv4": [{"id": free4["id"]}], "ipv6": [spare6]})  # fmt: skip
    assert moved.status_code == 200, moved.json
    assert "cloud-init seed" in moved.json["message"]
    new4, new6 = addresses(env, vm)
    assert (new4, new6) != (old4, old6) and new4 == free4["address"]

    # the running guest keeps its addresses until it is started again
    off = env.api.update(f"vm/{vm['id']}?force=true", json={"vm_state": {"id": SHUTOFF}})
    assert off.status_code == 200, off.json
    on = env.api.update(f"vm/{vm['id']}", json={"vm_state": {"id": RUNNING}})
    assert on.status_code == 200, on.json
    text = console.wait_for(
        read_console(env, vm), booted(env, vm, boots + 1), "the next boot's server"
    )
    boot = console.boots(text)[-1]
    assert boot.errors == [] and boot.nics[0]["addresses"] == f"{new4}/24,{new6}/64", boot
    for address in (new4, new6):
        page = page_at(net, address, env, vm)
        assert page["hostname"] == ["guest-one"] and page["ssh-key"] == [KEY], page
        assert page["instance-id"] != instance  # a new instance: cloud-init reapplies
    for address in (old4, old6):  # nothing answers at the old ones any more
        assert net.get(url(address)) is None, f"{address} still answers"


def test_the_vm_goes_and_leaves_nothing(env, net, image):
    """A VM of its own: the module's guest stays."""
    found = [v for v in env.pool_volumes() if "-seed-" in v or "-storage-" in v]
    vm = make_guest(env, image)
    assert env.api.delete(f"vm/{vm['id']}").status_code == 200
    assert [v for v in env.pool_volumes() if "-seed-" in v or "-storage-" in v] == found
