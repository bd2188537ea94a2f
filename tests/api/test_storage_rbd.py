"""rbd storage types on the API tier: what such a type must say, that it keeps it while
volumes use it, that its key never passes through the API, and what a node that cannot
take the key answers (libvirt's test driver has no secrets; volumes on a real cluster
are in tests/hypervisor/test_rbd_volumes.py)."""

import base64
import uuid

import pytest

from tests.api.test_boot import boot_body, make_image
from tests.api.test_storage import storage_body, volume
from tests.conftest import GIB, vm_body
from tests.errors import assert_error
from tests.image_files import ImageFiles
from vmapi.extensions import db
from vmapi.hypervisor import CephSource, DiskSpec
from vmapi.models import ImageRbd, Storage
from vmapi.services.vms.specs import disk_specs

pytestmark = pytest.mark.embedded

KEY = base64.b64encode(b"sixteen byte key" * 2).decode()
MONITORS = ["127.0.0.1:6789", "[::1]:3300", "mon1.example.com:6789"]


@pytest.fixture
def key_dir(tmp_path):
    folder = tmp_path / "ceph-keys"
    folder.mkdir()
    (folder / "client.libvirt.key").write_text(KEY + "\n")
    (folder / "client.other.key").write_text(base64.b64encode(b"another key").decode())
    return folder


@pytest.fixture
def files(tmp_path):
    return ImageFiles(tmp_path / "files")


@pytest.fixture
def app_config(key_dir):
    return {"CEPH_KEY_DIR": str(key_dir)}


def rbd_body(**fields):
    return {"name": "ceph", "description": "Ceph RBD", "pool": "ceph", "format": "raw",
            "backend": "rbd", "ceph_monitors": MONITORS, "ceph_pool": "rbd",
            "ceph_user": "libvirt", **fields}  # fmt: skip


@pytest.fixture
def rbd_type(api):
    response = api.post("storage_type", json=rbd_body())
    assert response.status_code == 201, response.json
    return response.json["data"]


@pytest.fixture
def vm(api, vm_host, test_method, installation):
    node = vm_host()
    made = api.post("vm", json=vm_body(test_method)).json["data"]
    return {**made, "uri": node["libvirt_uri"], "node_id": node["id"], "installation": installation}


def test_an_rbd_type_is_shared_raw_and_gets_its_secret_uuid(api, rbd_type):
    assert rbd_type == {**rbd_body(), "id": rbd_type["id"], "shared": True,
                        "ceph_secret_uuid": rbd_type["ceph_secret_uuid"]}  # fmt: skip
    assert str(uuid.UUID(rbd_type["ceph_secret_uuid"])) == rbd_type["ceph_secret_uuid"]
    # the types of before are dir types, without any of it
    local = api.get("storage_type/1").json["data"]
    assert local["backend"] == "dir"
    assert [local[k] for k in ("ceph_monitors", "ceph_pool", "ceph_user", "ceph_secret_uuid")] == [
        None
    ] * 4


def test_the_key_is_never_answered(api, rbd_type):
    for response in (api.get(f"storage_type/{rbd_type['id']}"), api.get("storage_type"),
                     api.update(f"storage_type/{rbd_type['id']}", json={"description": "x"})):  # fmt: skip
        assert response.status_code == 200
        assert KEY not in response.get_data(as_text=True)
        assert KEY[:20] not in response.get_data(as_text=True)
    # nor can it be given
    given = api.post("storage_type", json=rbd_body(name="other", description="o", ceph_key=KEY))
    assert assert_error(given, 400, "general/validation")["data"] == {
        "ceph_key": ["Unknown field."]
    }


@pytest.mark.parametrize(
    ("fields", "faulty"),
    [
        ({"ceph_monitors": None}, {"ceph_monitors"}),
        ({"ceph_pool": None, "ceph_user": None}, {"ceph_pool", "ceph_user"}),
        ({"format": "qcow2"}, {"format"}),
        ({"shared": False}, {"shared"}),
        ({"ceph_user": "client.libvirt"}, {"ceph_user"}),
        ({"ceph_user": "nokey"}, {"ceph_user"}),  # no client.nokey.key in the key dir
        ({"ceph_monitors": ["127.0.0.1"]}, {"ceph_monitors"}),  # no port
        ({"ceph_monitors": ["127.0.0.1:65536"]}, {"ceph_monitors"}),
        ({"ceph_monitors": []}, {"ceph_monitors"}),
        ({"backend": "nfs"}, {"backend"}),
        # a dir type has none of the Ceph fields
        ({"backend": "dir"}, {"ceph_monitors", "ceph_pool", "ceph_user"}),
        ({"ceph_secret_uuid": str(uuid.uuid4())}, {"ceph_secret_uuid"}),  # vmapi's to make
    ],
)
def test_a_bad_combination_is_refused_with_its_fields(api, fields, faulty):
    response = api.post("storage_type", json=rbd_body(**fields))
    assert set(assert_error(response, 400, "general/validation")["data"]) == faulty
    assert "ceph" not in [t["name"] for t in api.get("storage_type").json["data"].values()]


def test_a_missing_key_dir_or_a_bad_key_refuses_the_type(app, api, key_dir):
    (key_dir / "client.libvirt.key").write_text("not base64!\n")
    error = assert_error(api.post("storage_type", json=rbd_body()), 400, "general/validation")
    assert "does not hold a base64 cephx key" in error["data"]["ceph_user"][0]
    app.config["CEPH_KEY_DIR"] = None
    error = assert_error(api.post("storage_type", json=rbd_body()), 400, "general/validation")
    assert "VMAPI_CEPH_KEY_DIR is not set" in error["data"]["ceph_user"][0]


def test_one_secret_per_ceph_user(api, rbd_type):
    """A node's libvirt holds one secret per usage (client.<user>): types of one user
    share it, another user has its own."""
    second = api.post("storage_type", json=rbd_body(name="ceph2", description="2",
                                                    pool="ceph2", ceph_pool="vms2"))  # fmt: skip
    assert second.status_code == 201, second.json
    assert second.json["data"]["ceph_secret_uuid"] == rbd_type["ceph_secret_uuid"]
    other = api.post("storage_type", json=rbd_body(name="ceph3", description="3", pool="ceph3",
                                                   ceph_user="other"))  # fmt: skip
    assert other.status_code == 201, other.json
    assert other.json["data"]["ceph_secret_uuid"] != rbd_type["ceph_secret_uuid"]
    # an unused type that changes its user takes that user's secret
    moved = api.update(f"storage_type/{other.json['data']['id']}", json={"ceph_user": "libvirt"})
    assert moved.json["data"]["ceph_secret_uuid"] == rbd_type["ceph_secret_uuid"]


def test_a_dir_type_becomes_rbd_and_back_while_unused(api):
    made = api.post("storage_type", json=rbd_body(backend="dir", ceph_monitors=None,
                                                   ceph_pool=None, ceph_user=None))  # fmt: skip
    assert made.status_code == 201, made.json
    plain = made.json["data"]
    assert plain["backend"] == "dir" and plain["ceph_secret_uuid"] is None
    assert plain["shared"] is False
    path = f"storage_type/{plain['id']}"
    half = api.update(path, json={"backend": "rbd", "ceph_pool": "rbd"})
    assert set(assert_error(half, 400, "general/validation")["data"]) == {
        "ceph_monitors", "ceph_user"
    }  # fmt: skip
    ceph = api.update(path, json={"backend": "rbd", "ceph_monitors": MONITORS[:1],
                                  "ceph_pool": "rbd", "ceph_user": "libvirt"})  # fmt: skip
    assert ceph.status_code == 200, ceph.json
    assert ceph.json["data"]["shared"] is True and ceph.json["data"]["ceph_secret_uuid"]
    back = api.update(path, json={"backend": "dir", "shared": False})
    assert back.status_code == 200, back.json
    assert {k: back.json["data"][k] for k in ("ceph_monitors", "ceph_pool", "ceph_user",
                                              "ceph_secret_uuid")} == dict.fromkeys(
        ("ceph_monitors", "ceph_pool", "ceph_user", "ceph_secret_uuid")
    )  # fmt: skip


def add_row(app, vm, rbd_type, path="rbd/vol"):
    """A storage row of the type, as a volume made on a cluster leaves it."""
    with app.app_context():
        row = Storage(size=GIB, vm_id=vm["id"], storage_type_id=rbd_type["id"], target="vdb",
                      node_id=vm["node_id"], pool=rbd_type["pool"], path=path)  # fmt: skip
        db.session.add(row)
        db.session.flush()
        row.volume_name = volume(vm, row.id)
        db.session.commit()
        return row.id


def test_an_rbd_type_in_use_keeps_where_its_volumes_are(app, api, vm, rbd_type):
    storage_id = add_row(app, vm, rbd_type)
    path = f"storage_type/{rbd_type['id']}"
    for change in ({"ceph_monitors": ["127.0.0.1:6790"]}, {"ceph_pool": "other"},
                   {"ceph_user": "admin"}, {"pool": "other"},
                   {"backend": "dir", "ceph_monitors": None, "ceph_pool": None,
                    "ceph_user": None}):  # fmt: skip
        error = assert_error(api.update(path, json=change), 409, "storage_type/in_use")
        assert error["data"]["storage"] == [storage_id]
        assert set(error["data"]["fields"]) == set(change)
    kept = api.update(path, json={"description": "still Ceph", "ceph_monitors": MONITORS})
    assert kept.status_code == 200, kept.json
    assert kept.json["data"]["ceph_secret_uuid"] == rbd_type["ceph_secret_uuid"]


def test_an_rbd_volume_is_a_network_disk_by_its_image_name(app, vm, rbd_type):
    storage_id = add_row(app, vm, rbd_type, path="rbd/the-image")
    with app.app_context():
        (disk,) = disk_specs(vm["id"])
    assert disk == DiskSpec(
        path=volume(vm, storage_id),
        format="raw",
        target="vdb",
        rbd=CephSource(
            monitors=(("127.0.0.1", 6789), ("::1", 3300), ("mon1.example.com", 6789)),
            pool="rbd",
            user="libvirt",
            secret_uuid=rbd_type["ceph_secret_uuid"],
        ),
    )


def test_a_node_without_secrets_answers_the_step_and_keeps_nothing(app, api, vm, rbd_type,
                                                                  driver):  # fmt: skip
    """libvirt's test driver cannot hold a secret: the node fails the first step."""
    response = api.post("storage", json=storage_body(vm, storage_type={"id": rbd_type["id"]}))
    error = assert_error(response, 502, "vm/hypervisor_error")
    assert error["data"]["step"] == "giving the node the key of client.libvirt"
    assert KEY not in response.get_data(as_text=True)
    assert api.get("storage").json["data"] == {}
    conn = driver.connections.get(vm["uri"], 5)
    assert "ceph" not in conn.listStoragePools() + conn.listDefinedStoragePools()


def test_a_key_gone_from_the_api_host_answers_503_and_makes_nothing(api, vm, rbd_type, key_dir):
    (key_dir / "client.libvirt.key").unlink()
    response = api.post("storage", json=storage_body(vm, storage_type={"id": rbd_type["id"]}))
    error = assert_error(response, 503, "general/unavailable")
    assert error["data"]["step"] == "reading the Ceph key"
    assert "client.libvirt.key" in error["message"]
    assert api.get("storage").json["data"] == {}


# ------------------------------------------------------------------ root disks in rbd types
def test_root_storage_type_is_checked_before_anything_is_placed(api, files, vm_host, test_method,
                                                                rbd_type):  # fmt: skip
    vm_host()
    image = make_image(api, files)
    other = api.post("storage_type", json={"name": "ssd", "description": "SSD", "pool": "ssd",
                                           "format": "qcow2"})  # fmt: skip
    assert other.status_code == 201, other.json
    cases = {
        "no such type": {"id": 999999},
        "a dir type other than local-qcow2": {"id": other.json["data"]["id"]},
    }
    for why, ref in cases.items():
        response = api.post("vm", json=boot_body(test_method, image, root_storage_type=ref))
        error = assert_error(response, 400, "general/validation")
        assert set(error["data"]) == {"root_storage_type"}, why
    alone = api.post("vm", json=vm_body(test_method, root_storage_type={"id": rbd_type["id"]}))
    assert set(assert_error(alone, 400, "general/validation")["data"]) == {"root_storage_type"}
    assert api.get("vm").json["data"] == {}
    # naming the seeded type is the default, said aloud
    local = api.get("storage_type", query_string={"name": "local-qcow2"}).json["data"]
    (local_id,) = [int(k) for k in local]
    body = boot_body(test_method, image, root_storage_type={"id": local_id})
    made = api.post("vm", json=body)
    # (the test driver cannot take the image's upload: the step after placement fails)
    assert_error(made, 502, "vm/hypervisor_error")
    assert made.json["data"]["step"] == "copying the image to the node"


def test_an_rbd_root_disk_asks_the_node_for_the_key_first_and_leaves_nothing(
    app, api, files, vm_host, test_method, rbd_type, driver
):
    """libvirt's test driver holds no secrets: a VM whose root disk is to be an RBD clone
    fails at the node's first Ceph step, before anything is written into any cluster,
    and nothing of it stays (row, root disk row, claim, domain, pool)."""
    node = vm_host()
    image = make_image(api, files)
    body = boot_body(test_method, image, root_storage_type={"id": rbd_type["id"]})
    response = api.post("vm", json=body)
    error = assert_error(response, 502, "vm/hypervisor_error")
    assert error["data"]["step"] == "giving the node the key of client.libvirt"
    assert api.get("vm").json["data"] == {}
    assert api.get("storage").json["data"] == {}
    with app.app_context():
        assert db.session.query(ImageRbd).count() == 0
    assert api.get(f"node/{node['id']}").json["data"]["allocated_cores"] == 0
    conn = driver.connections.get(node["libvirt_uri"], 5)
    assert conn.listAllDomains(0) == []
    assert "ceph" not in conn.listStoragePools() + conn.listDefinedStoragePools()
