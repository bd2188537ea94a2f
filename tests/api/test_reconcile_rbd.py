"""flask vmapi reconcile with rbd storage types, on the API tier: their libvirt pools are
never listed on the nodes (the API host's Ceph client looks at the images, once for all
nodes), and a cluster the API host cannot reach or a key it cannot read is a finding
(``ceph_unreachable``), not a crash. The images themselves (``missing_volume``,
``unowned_volume``) on a real cluster: tests/hypervisor/test_rbd_volumes.py."""

import socket

import pytest

from tests.api.test_storage_rbd import KEY, add_row, rbd_body
from tests.conftest import vm_body
from tests.faults import FaultyDriver
from vmapi.services.nodes.hosts import DRIVER_KEY

pytestmark = pytest.mark.embedded


@pytest.fixture
def key_dir(tmp_path):
    folder = tmp_path / "ceph-keys"
    folder.mkdir()
    (folder / "client.libvirt.key").write_text(KEY + "\n")
    return folder


@pytest.fixture
def app_config(key_dir):
    # the rbd tool's bound (and its own wait for a monitor) is LIBVIRT_TIMEOUT's
    return {"CEPH_KEY_DIR": str(key_dir), "LIBVIRT_TIMEOUT": 2.0}


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def setup(app, api, vm_host, test_method, installation):
    """A node with a VM that has a volume of an rbd type whose monitor is a closed
    loopback port; the app's driver wrapped to record every call."""
    node = vm_host()
    body = rbd_body(ceph_monitors=[f"127.0.0.1:{closed_port()}"])
    rbd_type = api.post("storage_type", json=body).json["data"]
    vm = api.post("vm", json=vm_body(test_method, node={"id": node["id"]})).json["data"]
    vm = {**vm, "node_id": node["id"], "installation": installation}
    storage_id = add_row(app, vm, rbd_type)
    app.extensions[DRIVER_KEY] = FaultyDriver(app.extensions[DRIVER_KEY])
    return {"type": rbd_type, "storage": storage_id, "driver": app.extensions[DRIVER_KEY]}


def reconcile(runner):
    result = runner.invoke(args=["vmapi", "reconcile"])
    return result.exit_code, result.output


def test_an_rbd_pool_is_not_listed_on_the_nodes(runner, setup):
    code, output = reconcile(runner)
    listed = [args[0] for name, args in setup["driver"].called if name == "volumes"]
    assert "vmapi" in listed  # the dir pools still are
    assert setup["type"]["pool"] not in listed
    # the cluster is out of reach: said once for its Ceph pool, never with the key
    assert code == 1, output
    lines = [line for line in output.splitlines() if "ceph_unreachable" in line]
    assert len(lines) == 1, output
    assert "storage types" in lines[0] and "were not looked at" in lines[0]
    assert KEY not in output and KEY[:20] not in output
    assert "missing_volume" not in output and "unowned_volume" not in output


def test_a_key_the_api_host_cannot_read_is_a_finding(runner, setup, key_dir):
    (key_dir / "client.libvirt.key").unlink()
    code, output = reconcile(runner)
    assert code == 1, output
    [line] = [line for line in output.splitlines() if "ceph_unreachable" in line]
    assert "the key file" in line and "cannot be read" in line
    assert "missing_volume" not in output
