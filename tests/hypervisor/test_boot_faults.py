"""Boot from an image when things go wrong, on a real libvirtd: a failure at each step of
POST /vm (copy, checksum, overlay, define, start) leaves nothing behind — no volume (a
copy the request made included), no domain, no log, no claim, no row; racing requests
and arrays make one copy per node; ``flask vmapi image push`` copies ahead of time; a
node that cannot be reached when an image goes keeps its copy until reconcile removes
it; reconcile's cleanup of a stale ``building`` VM takes its root disk with it.

Faults are injected by wrapping the real driver (tests/faults.py). Images here are a few
MiB of raw bytes: nothing boots from them, which these tests do not need.
"""

from __future__ import annotations

import os
import threading
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from tests.conftest import MIB
from tests.faults import FaultyDriver
from tests.hypervisor.boot_env import IMAGE_POOL
from tests.hypervisor.qemu_host import INSTALLATION
from vmapi.extensions import db
from vmapi.services.nodes.hosts import DRIVER_KEY

pytestmark = [pytest.mark.hypervisor]


@pytest.fixture
def faults(env):
    real = env.app.extensions[DRIVER_KEY]
    wrapped = env.app.extensions[DRIVER_KEY] = FaultyDriver(real)
    yield wrapped
    env.app.extensions[DRIVER_KEY] = real
    for vm in env.api.get("vm").json["data"]:
        env.api.delete(f"vm/{vm}?cascade=storage")
    for image in env.api.get("image").json["data"]:
        env.api.delete(f"image/{image}")


@pytest.fixture
def image(env, tmp_path):
    path = tmp_path / "small.raw"
    path.write_bytes(os.urandom(4 * MIB))
    return env.upload(path, name="small")


def rows(env) -> dict[str, int]:
    counts = {}
    with env.app.app_context():
        for table in ("vm", "storage", "image_copy", "interface"):
            counts[table] = db.session.scalar(sa.select(sa.func.count()).select_from(
                sa.table(table)))  # fmt: skip
        node = env.api.get(f"node/{env.node['id']}").json["data"]
        counts["allocated"] = node["allocated_cores"]
        db.session.remove()
    return counts


NOTHING = {"vm": 0, "storage": 0, "image_copy": 0, "interface": 0, "allocated": 0}


def image_copies(faults) -> int:
    """Uploads of an image's base copy (a VM's cloud-init seed is uploaded too)."""
    return sum(
        1 for name, args in faults.called if name == "upload_volume" and "-image-" in args[1]
    )


def assert_nothing_left(env) -> None:
    assert rows(env) == NOTHING
    assert env.ours() == []


def assert_failed(answer, step: str) -> dict:
    """The one answer of a create whose libvirt side failed: 502 vm/hypervisor_error,
    naming the step."""
    assert answer.status_code == 502, answer.json
    assert answer.json["error_id"] == "vm/hypervisor_error", answer.json
    assert answer.json["data"]["step"] == step, answer.json
    return answer.json


@pytest.mark.parametrize(
    ("method", "step"),
    [
        ("ensure_pool", "copying the image to the node"),
        ("upload_volume", "copying the image to the node"),
        ("download_volume", "copying the image to the node"),  # the checksum's read-back
        ("create_overlay", "creating the root disk"),
        ("define", "defining the domain"),
        ("start", "starting the domain"),
    ],
)
def test_a_failure_at_any_step_leaves_nothing(env, faults, image, method, step):
    faults.fail(method)
    failed = env.api.post("vm", json={"cores": 1, "ram": 128 * MIB, "image": {"id": image["id"]},
                                      "virt_method": {"id": env.method}})  # fmt: skip
    assert_failed(failed, step)
    assert_nothing_left(env)  # the copy this request made went too


def test_a_copy_that_does_not_match_the_checksum_is_refused(env, faults, image):
    store = env.app.config["IMAGE_DIR"]
    with env.app.app_context():
        name = db.session.scalar(
            sa.text("SELECT file FROM image WHERE id = :i"), {"i": image["id"]}
        )
        db.session.remove()
    with open(os.path.join(store, name), "r+b") as stored:  # the store's file rots
        first = stored.read(1)
        stored.seek(0)
        stored.write(bytes([first[0] ^ 0xFF]))
    failed = env.api.post("vm", json={"cores": 1, "ram": 128 * MIB, "image": {"id": image["id"]},
                                      "virt_method": {"id": env.method}})  # fmt: skip
    assert_failed(failed, "copying the image to the node")
    assert "sha256" in failed.json["message"] and image["checksum"] in failed.json["message"]
    assert_nothing_left(env)


def test_a_copy_made_before_stays_when_a_later_step_fails(env, faults, image):
    pushed = env.app.test_cli_runner().invoke(args=["vmapi", "image", "push", str(image["id"])])
    assert pushed.exit_code == 0, pushed.output
    faults.fail("define")
    failed = env.api.post("vm", json={"cores": 1, "ram": 128 * MIB, "image": {"id": image["id"]},
                                      "virt_method": {"id": env.method}})  # fmt: skip
    assert_failed(failed, "defining the domain")
    assert rows(env) == {**NOTHING, "image_copy": 1}
    assert env.ours() == [f"{INSTALLATION}-image-{image['id']}"]


def test_push_copies_ahead_and_only_once(env, faults, image):
    runner = env.app.test_cli_runner()
    first = runner.invoke(args=["vmapi", "image", "push", str(image["id"]), "--node",
                                env.node["fqdn"]])  # fmt: skip
    assert first.exit_code == 0, first.output
    assert f"copied {env.node['fqdn']}" in first.output and "checksum verified" in first.output
    assert env.node["fqdn"] in first.output.splitlines()[0]  # the progress bar's label
    again = runner.invoke(args=["vmapi", "image", "push", str(image["id"])])
    assert again.exit_code == 0, again.output
    assert "has the image already" in again.output
    assert image_copies(faults) == 1
    made = env.api.post("vm", json={"cores": 1, "ram": 128 * MIB, "image": {"id": image["id"]},
                                    "virt_method": {"id": env.method}})  # fmt: skip
    assert made.status_code == 201, made.json
    assert image_copies(faults) == 1  # the VM used the copy: its root disk is backed by it
    [root] = env.api.get(f"storage?vm.id={made.json['data']['id']}").json["data"].values()
    pool = env.conn.storagePoolLookupByName(IMAGE_POOL)
    pool.refresh(0)
    overlay = pool.storageVolLookupByName(f"{INSTALLATION}-storage-{root['id']}")
    base = pool.storageVolLookupByName(f"{INSTALLATION}-image-{image['id']}")
    assert ET.fromstring(overlay.XMLDesc(0)).findtext("backingStore/path") == base.path()
    missing = runner.invoke(args=["vmapi", "image", "push", "999999"])
    assert missing.exit_code == 1, missing.output
    assert "image 999999 does not exist or has no accepted file" in missing.output


def test_racing_requests_make_one_copy(env, faults, image):
    body = {"cores": 1, "ram": 128 * MIB, "image": {"id": image["id"]},
            "virt_method": {"id": env.method}}  # fmt: skip
    answers = []
    start = threading.Barrier(2)

    def create():
        start.wait()
        answers.append(env.api.post("vm", json=body))

    threads = [threading.Thread(target=create) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.status_code for a in answers] == [201, 201], [a.json for a in answers]
    assert image_copies(faults) == 1
    assert rows(env)["image_copy"] == 1
    assert [v for v in env.pool_volumes() if "-image-" in v] == [
        f"{INSTALLATION}-image-{image['id']}"
    ]


def test_an_array_copies_once_and_its_failure_undoes_the_copy(env, faults, image):
    one = {"cores": 1, "ram": 128 * MIB, "image": {"id": image["id"]},
           "virt_method": {"id": env.method}}  # fmt: skip
    faults.fail("start", skip=1)  # the second VM fails to start
    failed = env.api.post("vm", json=[one, one])
    assert assert_failed(failed, "starting the domain")["data"]["index"] == 1
    assert image_copies(faults) == 1
    assert_nothing_left(env)  # the first VM and the copy it made were undone
    made = env.api.post("vm", json=[one, one])
    assert made.status_code == 201, made.json
    assert image_copies(faults) == 2  # once more for this array: once


def test_an_unreachable_node_keeps_its_copy_until_reconcile(env, faults, image):
    runner = env.app.test_cli_runner()
    assert runner.invoke(args=["vmapi", "image", "push", str(image["id"])]).exit_code == 0
    faults.fail("delete_volume", "unavailable")
    deleted = env.api.delete(f"image/{image['id']}")
    assert deleted.status_code == 200, deleted.json
    copy = f"{IMAGE_POOL}/{INSTALLATION}-image-{image['id']}"
    assert env.node["fqdn"] in deleted.json["message"] and copy in deleted.json["message"]
    assert env.ours() == [f"{INSTALLATION}-image-{image['id']}"]
    report = runner.invoke(args=["vmapi", "reconcile"])
    assert report.exit_code == 1
    assert "stale_image_copy" in report.output and "unowned_volume" not in report.output
    fixed = runner.invoke(args=["vmapi", "reconcile", "--fix"])
    assert "fixed  stale_image_copy" in fixed.output, fixed.output
    assert_nothing_left(env)


def test_reconcile_cleans_a_stale_building_vm_with_its_root_disk(env, faults, image):
    made = env.api.post("vm", json={"cores": 1, "ram": 128 * MIB, "image": {"id": image["id"]},
                                    "virt_method": {"id": env.method}})  # fmt: skip
    assert made.status_code == 201, made.json
    vm = made.json["data"]
    long_ago = datetime.now(UTC) - timedelta(hours=2)
    with env.app.app_context():  # its request died half-way, long ago
        db.session.execute(sa.text("UPDATE vm SET vm_state_id = 1, created_at = :t WHERE id = :i"),
                           {"t": long_ago, "i": vm["id"]})  # fmt: skip
        db.session.commit()
        db.session.remove()
    fixed = env.app.test_cli_runner().invoke(args=["vmapi", "reconcile", "--fix"])
    assert "fixed  stale_building" in fixed.output, fixed.output
    assert rows(env) == {**NOTHING, "image_copy": 1}  # the copy stays for the next VM
    assert env.ours() == [f"{INSTALLATION}-image-{image['id']}"]  # no overlay, no log
