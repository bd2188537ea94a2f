"""Backups on a real libvirtd (issue 24): ``flask vmapi backup run --all --keep 2`` over two
shut-off VMs of the test guest, on three days in a row (the run's day given with its
hidden ``--date``), then again on the last day.

Each run saves both VMs (their root disks copied on the node and read back into the
image store); the third deletes each VM's first backup, file and all. What is left is
each VM's two newest backups, active, downloadable as standalone qcow2 files equal to
each other (the VM did not change between the runs); a run repeated on the last day
saves nothing. No temporary copy or ledger entry is left on the node.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from datetime import date
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.hypervisor.boot_env import BootEnv
from vmapi.extensions import db
from vmapi.models import Image, Leftover
from vmapi.services.images.backups import backup_name

pytestmark = [pytest.mark.hypervisor]

DAYS = [date(2026, 1, 1), date(2026, 1, 2), date(2026, 1, 3)]


@pytest.fixture(scope="module")
def image(env, guest_image) -> dict:
    return env.upload(guest_image.path)


@pytest.fixture(scope="module")
def vms(env, image) -> list[dict]:
    """Two VMs of the test guest, shut off at once (nothing needs them booted), each
    keeping 5 backups (the runs ask for 2)."""
    states = env.api.get("vm_state").json["data"].values()
    shutoff = next(s["id"] for s in states if s["name"] == "shutoff")
    made = []
    for _ in range(2):
        vm = env.create(image["id"])
        stopped = env.api.update(f"vm/{vm['id']}?force=true", json={"vm_state": {"id": shutoff}})
        assert stopped.status_code == 200, stopped.json
        kept = env.api.patch(f"vm/{vm['id']}", json={"backup_keep": 5})
        assert kept.status_code == 200 and kept.json["data"]["backup_keep"] == 5, kept.json
        made.append(kept.json["data"])
    return made


def run(env: BootEnv, day: date) -> str:
    result = env.app.test_cli_runner().invoke(
        args=["vmapi", "backup", "run", "--all", "--keep", "2", "--date", f"{day}"]
    )
    assert result.exit_code == 0, result.output
    return result.output


def backups(env: BootEnv) -> dict[str, dict]:
    """The backup images by name, with their files in the store."""
    listed = env.api.get("image?kind=backup&limit=100").json["data"].values()
    with env.app.app_context():
        files = dict(db.session.execute(sa.select(Image.id, Image.file)).all())
        db.session.remove()
    return {i["name"]: {**i, "file": files[i["id"]]} for i in listed}


def download(env: BootEnv, image: dict, directory: Path) -> Path:
    answer = env.api.get(f"image/{image['id']}/file")
    assert answer.status_code == 200, answer.get_data(as_text=True)[:500]
    path = directory / f"{image['name']}.qcow2"
    path.write_bytes(answer.get_data())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == image["checksum"]
    return path


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=120)


def test_three_nights_keep_each_vms_two_newest(env, vms, tmp_path):
    store = env.app.config["IMAGE_DIR"]
    seen: dict[str, dict] = {}
    for day in DAYS:
        output = run(env, day)
        assert "2 VM(s), 2 saved, 0 skipped, 0 failed" in output, output
        seen.update(backups(env))
    for vm in vms:
        first, *kept = (seen[backup_name(vm["id"], day)] for day in DAYS)
        # the first is gone, row and file
        assert env.api.get(f"image/{first['id']}").status_code == 404
        assert not os.path.exists(os.path.join(store, first["file"]))
        assert [k["name"] for k in kept] == [backup_name(vm["id"], day) for day in DAYS[1:]]
        files = []
        for image in kept:
            now = env.api.get(f"image/{image['id']}").json["data"]
            assert (now["state"], now["kind"], now["format"]) == ("active", "backup", "qcow2")
            assert now["source"] == {"vm": {"id": vm["id"]}}
            assert now["customer_id"] == vm["customer_id"]
            path = download(env, now, tmp_path)
            info = json.loads(qemu_img("info", "--output=json", str(path)).stdout)
            assert info["format"] == "qcow2" and "backing-filename" not in info
            files.append(path)
        # the VM was shut off all along: both backups hold the same disk
        compared = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", *map(str, files))
        assert compared.returncode == 0, compared.stdout + compared.stderr
    assert sorted(backups(env)) == sorted(
        backup_name(vm["id"], day) for vm in vms for day in DAYS[1:]
    )
    # the same day again: nothing saved, nothing deleted
    output = run(env, DAYS[-1])
    assert "2 VM(s), 0 saved, 2 skipped, 0 failed; 0 old backup(s) deleted" in output, output
    assert len(backups(env)) == 4
    # no temporary copy on the node, nothing left in the ledger
    assert [v for v in env.pool_volumes() if "-save-" in v] == []
    with env.app.app_context():
        assert db.session.scalars(sa.select(Leftover)).all() == []
        db.session.remove()
