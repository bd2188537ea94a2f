"""/node and /virt_node: capacity from the host's libvirt, URI safety, nested creation."""

from pathlib import Path

import pytest

from tests.conftest import GIB, node_body
from tests.errors import assert_error

pytestmark = pytest.mark.embedded


def test_capacity_is_read_from_libvirt(api, host_uri):
    response = api.post("node", json=node_body(libvirt_uri=host_uri(cores=12, ram=48 * GIB)))
    assert response.status_code == 201
    data = response.json["data"]
    assert (data["cores"], data["ram"]) == (12, 48 * GIB)
    assert (data["allocated_cores"], data["allocated_ram"]) == (0, 0)
    assert data["cpu_allocation_ratio"] is None and data["reserved_ram"] is None


def test_given_capacity_wins_and_missing_half_is_read(api, host_uri):
    uri = host_uri(cores=12, ram=48 * GIB)
    data = api.post("node", json=node_body(libvirt_uri=uri, cores=4)).json["data"]
    assert (data["cores"], data["ram"]) == (4, 48 * GIB)


def test_unreachable_host(api):
    body = node_body(libvirt_uri="qemu+tcp://127.0.0.1:1/system")
    error = assert_error(api.post("node", json=body), 409, "node/unreachable")
    assert error["data"]["uri"] == "qemu+tcp://127.0.0.1:1/system"
    assert api.get("node").json["data"] == {}
    # with the capacity given, the host is not asked
    body.update(cores=8, ram=8 * GIB)
    assert api.post("node", json=body).status_code == 201


@pytest.mark.parametrize("app_config", [{"LIBVIRT_TIMEOUT": 1.0}])
def test_hung_host_times_out(api, silent_host, app_config):
    error = assert_error(
        api.post("node", json=node_body(libvirt_uri=silent_host)), 409, "node/unreachable"
    )
    assert "within 1 s" in error["message"]


def test_uri_from_template(app, api, tmp_path, host_uri):
    uri = host_uri(cores=6, ram=12 * GIB)
    # the template builds test:///<dir>/<fqdn>; place the host file under that name
    path = uri.removeprefix("test://")
    target = tmp_path / "tmpl-host.example.com"
    target.write_text(Path(path).read_text())
    app.config["LIBVIRT_URI_TEMPLATE"] = f"test://{tmp_path}/{{fqdn}}"
    body = node_body(fqdn="tmpl-host.example.com", libvirt_uri=None)
    data = api.post("node", json=body).json["data"]
    assert (data["cores"], data["ram"], data["libvirt_uri"]) == (6, 12 * GIB, None)


def test_template_that_builds_a_dangerous_uri_is_refused(app, api):
    app.config["LIBVIRT_URI_TEMPLATE"] = "qemu+ext:///system?command=/bin/{fqdn}"
    body = node_body(libvirt_uri=None)
    error = assert_error(api.post("node", json=body), 409, "node/unsafe_uri")
    assert "LIBVIRT_URI_TEMPLATE" in error["message"] and "qemu+ext" not in error["message"]
    assert "qemu+ext:///system?command=/bin/{fqdn}" in error["data"]["node_detail"]  # admins


@pytest.mark.parametrize(
    "uri",
    [
        "qemu+ext:///system?command=/bin/touch",
        "qemu+ssh://root@host.example.com/system?command=/tmp/x",
        "qemu+ssh://root@host.example.com/system?netcat=/tmp/x",
        "qemu+ssh://-oProxyCommand=x@host.example.com/system",
    ],
)
def test_dangerous_uri_is_refused(api, uri, tmp_path):
    error = assert_error(
        api.post("node", json=node_body(libvirt_uri=uri, cores=1, ram=GIB)),
        400,
        "general/validation",
    )
    assert "libvirt_uri" in error["data"]
    assert api.get("node").json["data"] == {}


def test_fqdn_is_unique(api, make_node):
    node = make_node(fqdn="dup.example.com")
    error = assert_error(
        api.post("node", json=node_body(fqdn="dup.example.com")), 409, "node/duplicate"
    )
    assert error["data"]["id"] == node["id"]


def test_update_null_capacity_asks_the_host_again(api, host_uri):
    uri = host_uri(cores=12, ram=48 * GIB)
    node = api.post("node", json=node_body(libvirt_uri=uri, cores=2, ram=GIB)).json["data"]
    data = api.update(f"node/{node['id']}", json={"cores": None}).json["data"]
    assert (data["cores"], data["ram"]) == (12, GIB)


def test_update_node_fields(api, make_node):
    node = make_node()
    data = api.update(f"node/{node['id']}", json={"cpu_allocation_ratio": 2.5, "reserved_ram": 2 * GIB,
                                                  "interface_mode": "ethernet", "location": "fra1"}).json["data"]  # fmt: skip
    assert (
        data["cpu_allocation_ratio"],
        data["reserved_ram"],
        data["interface_mode"],
        data["location"],
    ) == (2.5, 2 * GIB, "ethernet", "fra1")
    assert_error(
        api.update(f"node/{node['id']}", json={"libvirt_uri": "qemu+ext:///x"}),
        400,
        "general/validation",
    )


def test_virt_node_with_new_node_and_method_by_name(api, host_uri):
    body = {"node": node_body(libvirt_uri=host_uri(cores=4, ram=8 * GIB)), "virt_method": {"name": "KVM"},
            "local_storage_path": "/var/lib/vmapi"}  # fmt: skip
    response = api.post("virt_node", json=body)
    assert response.status_code == 201, response.json
    vn = response.json["data"]
    assert vn["virt_method"] == {"id": 1}
    node = api.get(f"node/{vn['node']['id']}").json["data"]
    assert node["cores"] == 4
    nested = api.get(f"virt_node/{vn['id']}?nest=node,virt_method").json["data"]
    assert nested["virt_method"]["name"] == "KVM" and nested["node"]["fqdn"] == body["node"]["fqdn"]


def test_virt_node_unknown_method_name_creates_it(api, make_node):
    node = make_node()
    vn = api.post(
        "virt_node", json={"node": {"id": node["id"]}, "virt_method": {"name": "LXC"}}
    ).json["data"]
    method = api.get(f"virt_method/{vn['virt_method']['id']}").json["data"]
    assert method["name"] == "LXC" and method["domain_type"] == "lxc"


def test_virt_node_unknown_non_libvirt_name_is_refused(api, make_node):
    node = make_node()
    error = assert_error(
        api.post(
            "virt_node", json={"node": {"id": node["id"]}, "virt_method": {"name": "Hyper-Z"}}
        ),
        400,
        "general/validation",
    )
    assert "virt_method" in error["data"]
    assert len(api.get("virt_method").json["data"]) == 2


def test_virt_node_pair_is_unique(api, make_node):
    node = make_node()
    body = {"node": {"id": node["id"]}, "virt_method": {"id": 2}}
    assert api.post("virt_node", json=body).status_code == 201
    assert_error(api.post("virt_node", json=body), 409, "virt_node/duplicate")


def test_virt_node_array_rolls_back_created_nodes(api, make_node):
    node = make_node()
    body = [
        {"node": node_body(cores=2, ram=GIB), "virt_method": {"name": "LXC"}},
        {"node": {"id": node["id"]}, "virt_method": {"id": 99}},
    ]
    error = assert_error(api.post("virt_node", json=body), 400, "general/validation")
    assert error["data"]["index"] == 1
    assert list(api.get("node").json["data"]) == [str(node["id"])]
    assert len(api.get("virt_method").json["data"]) == 2


def test_node_with_virt_node_is_in_use(api, make_node):
    node = make_node()
    vn = api.post("virt_node", json={"node": {"id": node["id"]}, "virt_method": {"id": 1}}).json[
        "data"
    ]
    error = assert_error(api.delete(f"node/{node['id']}"), 409, "node/in_use")
    assert error["data"] == {"virt_node": [vn["id"]]}
    assert api.delete(f"virt_node/{vn['id']}").status_code == 200
    assert api.delete(f"node/{node['id']}").json["data"]["fqdn"] == node["fqdn"]


@pytest.mark.parametrize("body", [{"node": {"id": 1, "x": 1}, "virt_method": {"id": 1}},
                                  {"node": {"id": 1}, "virt_method": {"id": 1, "name": "KVM"}},
                                  {"node": 5, "virt_method": {"id": 1}}])  # fmt: skip
def test_virt_node_reference_shapes(api, make_node, body):
    make_node()
    assert_error(api.post("virt_node", json=body), 400, "general/validation")


def test_values_beyond_a_32_bit_column_are_400_not_500(api, make_node):
    node = make_node()
    body = {"node": {"id": node["id"]}, "virt_method": {"id": 1}, "local_storage_gb": 2**31}
    error = assert_error(api.post("virt_node", json=body), 400, "general/validation")
    assert "local_storage_gb" in error["data"]
