"""A saved VM restored after it moved (issue 24), on the two private libvirtd hosts of
``host_pair``: the test guest, booted on node a, is saved while it runs, moved live to
node b, and rebuilt there from its own saved image. The guest's first boot on the new
root disk reads the marker the saved disk held (the marker its first boot wrote on a),
its addresses are kept, and nothing of the save is left on either host.
"""

from __future__ import annotations

import pytest

from tests.guest import console
from tests.hypervisor.migrate_env import INSTALLATION, migrate_env, wait_for_ticks

pytestmark = [pytest.mark.hypervisor]


@pytest.fixture(scope="module")
def env(host_pair, guest_image, pg_server, tmp_path_factory):
    store = tmp_path_factory.mktemp("images")
    with migrate_env(pg_server, host_pair, guest_image.path, store) as made:
        yield made


def test_a_vm_saved_on_a_is_rebuilt_from_it_on_b(env):
    vm = env.create("a", root_size=128 * 1024**2)  # past the marker's sector (64 MiB in)
    read = env.console(vm["id"])
    wait_for_ticks(read, 2)
    [first] = console.boots(read())
    assert first.marker, first
    interfaces = env.api.get(f"interface?vm.id={vm['id']}&nest=ipv4,ipv6").json["data"]

    saved = env.api.post(f"vm/{vm['id']}/image", json={"name": "on-a"})
    assert saved.status_code == 201, saved.json
    image = saved.json["data"]
    assert [v for v in env.volumes("a") if f"{INSTALLATION}-save-" in v] == []

    moved = env.api.post(f"vm/{vm['id']}/migrate", json={"node": {"id": env.nodes["b"]["id"]}})
    assert moved.status_code == 200, moved.json
    assert moved.json["data"]["node"] == {"id": env.nodes["b"]["id"]}

    rebuilt = env.api.post(f"vm/{vm['id']}/rebuild", json={"image": {"id": image["id"]}})
    assert rebuilt.status_code == 200, rebuilt.json
    answer = rebuilt.json["data"]
    assert (answer["node"], answer["uuid"], answer["image"]) == (
        {"id": env.nodes["b"]["id"]}, vm["uuid"], {"id": image["id"]})  # fmt: skip
    # the new root disk holds the saved one: its first boot reads the marker of the
    # first boot on a (the boots between wrote theirs after the save, on the old disk)
    boot = console.wait_for(
        read, lambda t: any(b.previous_marker == first.marker for b in console.boots(t)),
        "a boot reading the saved marker",
    )  # fmt: skip
    assert boot
    assert env.api.get(f"interface?vm.id={vm['id']}&nest=ipv4,ipv6").json["data"] == interfaces
    for host in ("a", "b"):
        assert [v for v in env.volumes(host) if f"{INSTALLATION}-save-" in v] == []
    assert env.sql("SELECT name FROM leftover") == []
    gone = env.api.delete(f"vm/{vm['id']}")
    assert gone.status_code == 200, gone.json
    gone = env.api.delete(f"image/{image['id']}")
    assert gone.status_code == 200, gone.json
