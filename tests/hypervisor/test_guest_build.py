"""The test guest's builder (tests/guest/build.py): one image per key, even when racing.

Builds into a cache folder of its own (one extra build of a few seconds), so the shared
cache the other tests use is neither needed nor touched.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.guest.build import ensure_guest_image
from tests.guest.disks import sha256

pytestmark = [pytest.mark.hypervisor]

ROOT = Path(__file__).resolve().parents[2]


def test_racing_builds_publish_one_image_and_later_sessions_reuse_it(guest_image, tmp_path):
    # guest_image: the tools are there (or the test is reported unavailable)
    cache = tmp_path / "cache"
    killed = cache / ".build-killed" / "image"  # what a build killed half-way leaves
    killed.mkdir(parents=True)
    (killed / "guest.img").write_bytes(b"half an image")
    command = [sys.executable, "-m", "tests.guest.build", "--cache-dir", str(cache)]
    racers = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for _ in range(2)]  # fmt: skip
    results = []
    for racer in racers:
        out, err = racer.communicate(timeout=900)
        assert racer.returncode == 0, err
        results.append(json.loads(out))
    first, second = results
    assert first["path"] == second["path"] and first["sha256"] == second["sha256"]
    assert sorted(r["built"] for r in results) == [False, True]  # one built, one waited
    # one entry, no temporary folder (the killed build's is gone), nothing half-made
    assert sorted(p.name for p in cache.iterdir()) == sorted([".lock", first["key"]])
    assert sorted(p.name for p in (cache / first["key"]).iterdir()) == ["guest.img", "info.json"]
    assert sha256(Path(first["path"])) == first["sha256"]
    assert first["key"] == guest_image.key  # same inputs, same key, whatever the cache

    again = ensure_guest_image(cache)
    assert not again.built
    assert (str(again.path), again.sha256) == (first["path"], first["sha256"])
