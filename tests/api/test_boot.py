"""Boot from an image on libvirt's test driver: the checks, roles, root disk rules, the
scheduler's preference and the undo of every step the test driver can run.

The test driver has no volume upload, so it cannot copy an image to a node: a node
"holds" an image here because the test put its base volume there with the real driver
(``create_volume``) and recorded it, as a copy would. The copy itself, the overlay's
bytes and a guest that boots are tested on a real libvirtd (tests/hypervisor/test_boot.py).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from tests.conftest import MIB, vm_body
from tests.faults import FaultyDriver
from tests.image_files import OCTET, ImageFiles
from vmapi.extensions import db
from vmapi.models import ImageCopy
from vmapi.services.hosts import DRIVER_KEY
from vmapi.services.names import image_volume_name

pytestmark = pytest.mark.embedded

POOL = "vmapi"  # the seeded local-qcow2 type's


@pytest.fixture
def files(tmp_path):
    return ImageFiles(tmp_path / "files")


@pytest.fixture
def faults(app):
    real = app.extensions[DRIVER_KEY]
    app.extensions[DRIVER_KEY] = FaultyDriver(real)
    return app.extensions[DRIVER_KEY]


def make_image(api, files, size=2 * MIB, **fields):
    body = {"name": "tiny", "format": "raw", **fields}
    image = api.post("image", json=body)
    assert image.status_code == 201, image.json
    ident = image.json["data"]["id"]
    sent = api.call("PUT", f"image/{ident}/file", data=files.raw(size), headers=OCTET)
    assert sent.status_code == 200, sent.json
    return sent.json["data"]


@pytest.fixture
def image(api, files):
    """An active raw image of 2 MiB (virtual size 2 MiB)."""
    return make_image(api, files)


def hold(app, node, image):
    """Put the image's base volume on the node, as a copy would (see the module's text)."""
    driver = app.extensions[DRIVER_KEY]
    driver = getattr(driver, "real", driver)
    uri = node["libvirt_uri"]
    with app.app_context():
        name = image_volume_name(image["id"])
        driver.ensure_pool(uri, POOL, f"/{POOL}")
        path = driver.create_volume(uri, POOL, name, image["virtual_size"], "raw")
        db.session.add(ImageCopy(image_id=image["id"], node_id=node["id"], pool=POOL,
                                 volume_name=name, path=path))  # fmt: skip
        db.session.commit()
        db.session.remove()


def volumes(driver, node):
    driver = getattr(driver, "real", driver)
    try:
        return driver.volumes(node["libvirt_uri"], POOL)
    except Exception:  # no pool yet: nothing in it
        return []


def boot_body(method, image, **fields):
    return vm_body(method, image={"id": image["id"]}, **fields)


def test_a_vm_boots_from_an_image_its_node_holds(app, api, vm_host, test_method, image, driver,
                                                 installation):  # fmt: skip
    node = vm_host()
    hold(app, node, image)
    made = api.post("vm", json=boot_body(test_method, image, root_size=3 * MIB + 1))
    assert made.status_code == 201, made.json
    vm = made.json["data"]
    assert vm["image"] == {"id": image["id"]}
    assert "root_size" not in vm  # write-only: the root disk's /storage object has it
    [root] = api.get(f"storage?vm.id={vm['id']}").json["data"].values()
    assert root["boot"] is True and root["image"] == {"id": image["id"]}
    assert root["size"] == 4 * MIB  # rounded up to a whole MiB
    assert root["storage_type"] == {"id": 1}  # the seeded local-qcow2
    # the overlay is in the pool beside the copy, named like every volume
    assert volumes(driver, node) == sorted(
        [f"{installation}-image-{image['id']}", f"{installation}-storage-{root['id']}"]
    )
    domain = driver.connections.get(node["libvirt_uri"], 5).lookupByName(vm["domain_name"])
    disk = ET.fromstring(domain.XMLDesc(2)).find("devices/disk")  # the first disk
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}
    assert disk.find("driver").get("type") == "qcow2"
    assert disk.find("source").get("file").endswith(f"/{installation}-storage-{root['id']}")
    assert ET.fromstring(domain.XMLDesc(2)).find("os/boot").get("dev") == "hd"
    assert api.get(f"vm/{vm['id']}?nest=image").json["data"]["image"]["id"] == image["id"]
    assert api.get(f"storage/{root['id']}?nest=image").json["data"]["image"]["name"] == "tiny"


def test_root_size_defaults_to_the_virtual_size(app, api, vm_host, test_method, files):
    image = make_image(api, files, size=3 * MIB + 512)  # not a whole MiB
    node = vm_host()
    hold(app, node, image)
    vm = api.post("vm", json=boot_body(test_method, image)).json["data"]
    [root] = api.get(f"storage?vm.id={vm['id']}").json["data"].values()
    assert root["size"] == 4 * MIB
