"""Volume streams and overlays on a real libvirtd: upload, download, sha256, timeouts,
clean-up after failures, a connection of the stream's own (fixtures: tests/hypervisor/conftest.py).
"""

import hashlib
import json
import os
import subprocess
import threading
import time
import xml.etree.ElementTree as ET

import pytest

from tests.conftest import MIB
from tests.hypervisor.streamtest import POOL_ROOT, URI, pool_volumes
from vmapi.hypervisor import (
    CHUNK_SIZE,
    HypervisorError,
    HypervisorTimeout,
    VolumeExists,
    VolumeNotFound,
    read_chunks,
)
from vmapi.hypervisor.libvirt import LibvirtDriver
from vmapi.hypervisor.observed import ObservedDriver

pytestmark = [pytest.mark.hypervisor]


def chunked(data, sizes):
    """``data`` cut in pieces of the given sizes, cycling."""
    offset, index = 0, 0
    while offset < len(data):
        size = sizes[index % len(sizes)]
        yield data[offset : offset + size]
        offset += size
        index += 1


# ---------------------------------------------------------------------- upload, download


def test_upload_in_chunks_and_download_back(libvirtd, hv, pool):
    data = os.urandom(5 * MIB + 12345)
    # smaller than, equal to and larger than one stream packet
    path = hv.upload_volume(URI, pool, "image", len(data),
                            chunked(data, [1000, CHUNK_SIZE, 3 * MIB]), timeout=60)  # fmt: skip
    assert path == str(POOL_ROOT / pool / "image")
    assert hv.volume(URI, pool, "image") == (path, len(data))
    assert b"".join(hv.download_volume(URI, pool, "image", timeout=60)) == data
    part = hv.download_volume(URI, pool, "image", timeout=60, offset=MIB - 7, length=CHUNK_SIZE + 9)
    assert b"".join(part) == data[MIB - 7 : MIB + CHUNK_SIZE + 2]
    assert b"".join(hv.download_volume(URI, pool, "image", 60, offset=len(data) - 5)) == data[-5:]


def test_upload_from_a_file(hv, pool, tmp_path):
    source = tmp_path / "image.raw"
    source.write_bytes(os.urandom(MIB + 1))
    with source.open("rb") as readable:
        hv.upload_volume(URI, pool, "image", MIB + 1, read_chunks(readable), timeout=60)
    assert b"".join(hv.download_volume(URI, pool, "image", 60)) == source.read_bytes()


def test_sha256_through_the_stream(hv, pool):
    data = os.urandom(3 * MIB + 1)
    hv.upload_volume(URI, pool, "image", len(data), chunked(data, [CHUNK_SIZE]), timeout=60)
    assert hv.volume_sha256(URI, pool, "image", timeout=60) == hashlib.sha256(data).hexdigest()


def test_upload_failing_midway_leaves_no_volume(libvirtd, hv, pool):
    class SourceBroke(Exception):
        pass

    def chunks():
        yield os.urandom(CHUNK_SIZE)
        yield os.urandom(CHUNK_SIZE)
        raise SourceBroke("the image store went away")

    with pytest.raises(SourceBroke):  # the caller's own error, as it was
        hv.upload_volume(URI, pool, "image", 4 * MIB, chunks(), timeout=60)
    with pytest.raises(VolumeNotFound):
        hv.volume(URI, pool, "image")
    assert pool_volumes(libvirtd, pool) == []


@pytest.mark.parametrize("sent", [MIB - 1, MIB + 1])
def test_a_stream_of_another_length_leaves_no_volume(libvirtd, hv, pool, sent):
    with pytest.raises(HypervisorError, match="bytes"):
        hv.upload_volume(URI, pool, "image", MIB, chunked(b"x" * sent, [4096]), timeout=60)
    assert pool_volumes(libvirtd, pool) == []


def test_timeout_aborts_and_leaves_no_volume(libvirtd, hv, pool):
    def slow():
        for _ in range(1000):
            yield b"x" * 4096
            time.sleep(0.2)

    with pytest.raises(HypervisorTimeout):
        hv.upload_volume(URI, pool, "image", 1000 * 4096, slow(), timeout=1.0)
    assert pool_volumes(libvirtd, pool) == []


def test_an_existing_volume_is_left_alone(libvirtd, hv, pool):
    hv.upload_volume(URI, pool, "image", 4, [b"mine"], timeout=60)
    with pytest.raises(VolumeExists):
        hv.upload_volume(URI, pool, "image", 6, [b"theirs"], timeout=60)
    assert b"".join(hv.download_volume(URI, pool, "image", 60)) == b"mine"


def clients_of_this_process():
    """Ids of libvirtd's clients connected from this process (virt-admin's view)."""
    listing = subprocess.run(["virt-admin", "srv-clients-list", "libvirtd"], check=True,
                             capture_output=True, text=True).stdout  # fmt: skip
    mine = set()
    for client in [line.split()[0] for line in listing.splitlines()[2:] if line.strip()]:
        info = subprocess.run(["virt-admin", "client-info", "libvirtd", client],
                              capture_output=True, text=True).stdout  # fmt: skip
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        if fields.get("unix_process_id", "").strip() == str(os.getpid()):
            mine.add(client)
    return mine


def test_a_long_upload_has_its_own_connection(libvirtd, hv, pool):
    hv.host_info(URI)  # the shared, cached connection is open
    # (connections of earlier tests may still be closing: they can only disappear)
    before = clients_of_this_process()
    half_way, go_on = threading.Event(), threading.Event()
    data = os.urandom(2 * MIB)

    def chunks():
        yield data[:MIB]
        half_way.set()
        assert go_on.wait(60)
        yield data[MIB:]

    outcome = {}

    def upload():
        try:
            outcome["path"] = hv.upload_volume(URI, pool, "image", len(data), chunks(), 60)
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=upload)
    thread.start()
    try:
        assert half_way.wait(60)
        # while the stream is open mid-way, ordinary calls on the same URI answer ...
        assert hv.host_info(URI).cores > 0
        with pytest.raises(VolumeNotFound):
            hv.volume(URI, pool, "other")
        # ... on the cached connection (no new one), while the stream has one of its own
        during = clients_of_this_process()
        assert len(during - before) == 1
    finally:
        go_on.set()
        thread.join(60)
    assert "error" not in outcome, outcome
    assert b"".join(hv.download_volume(URI, pool, "image", 60)) == data
    stream_client = (during - before).pop()
    deadline = time.monotonic() + 30
    while stream_client in clients_of_this_process() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stream_client not in clients_of_this_process()  # its connection was closed


def test_download_stops_early_and_times_out(hv, pool):
    hv.upload_volume(URI, pool, "image", 4 * MIB, chunked(b"y" * 4 * MIB, [MIB]), timeout=60)
    reader = hv.download_volume(URI, pool, "image", 60)
    first = next(reader)  # (a stream answers what has arrived: up to one packet)
    assert 0 < len(first) <= CHUNK_SIZE and first == b"y" * len(first)
    reader.close()
    assert list(reader) == []
    with pytest.raises(VolumeNotFound):
        list(hv.download_volume(URI, pool, "missing", 60))
    slow = hv.download_volume(URI, pool, "image", timeout=0.5)
    with pytest.raises(HypervisorTimeout):
        for _chunk in slow:
            time.sleep(0.2)  # a reader slower than the copy timeout allows


def test_observed_download_is_timed_until_it_ends(hv, pool):
    actions = []
    observed = ObservedDriver(hv, actions.append)
    observed.upload_volume(URI, pool, "image", MIB, [b"z" * MIB], timeout=60)
    reader = observed.download_volume(URI, pool, "image", 60)
    assert [a.action for a in actions] == ["upload_volume"]  # not yet: it has not run
    assert b"".join(reader) == b"z" * MIB
    assert [(a.action, a.error) for a in actions] == [("upload_volume", None),
                                                      ("download_volume", None)]  # fmt: skip
    failing = observed.download_volume(URI, pool, "missing", 60)
    with pytest.raises(VolumeNotFound):
        list(failing)
    assert (actions[-1].action, actions[-1].error) == ("download_volume", "VolumeNotFound")


# ---------------------------------------------------------------------- overlays


def qemu_img_info(path):
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", path], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return json.loads(out)


def upload_file(hv, pool, name, path):
    with open(path, "rb") as readable:
        return hv.upload_volume(URI, pool, name, os.path.getsize(path), read_chunks(readable), 60)


@pytest.mark.parametrize("base_format", ["raw", "qcow2"])
def test_overlay_on_a_base_volume(libvirtd, hv, pool, tmp_path, base_format):
    image = tmp_path / "base.img"
    subprocess.run(["qemu-img", "create", "-f", base_format, str(image), "8M"], check=True,
                   capture_output=True)  # fmt: skip
    base_path = upload_file(hv, pool, "base", image)
    path = hv.create_overlay(URI, pool, "root", 64 * MIB, "base", base_format)
    info = qemu_img_info(path)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == 64 * MIB
    assert info["backing-filename"] == base_path
    assert info["backing-filename-format"] == base_format
    assert hv.volume(URI, pool, "root") == (path, 64 * MIB)
    xml = ET.fromstring(
        libvirtd.storagePoolLookupByName(pool).storageVolLookupByName("root").XMLDesc(0)
    )
    assert xml.findtext("backingStore/path") == base_path
    assert xml.find("backingStore/format").get("type") == base_format


def test_overlay_of_a_missing_base(libvirtd, hv, pool):
    with pytest.raises(VolumeNotFound):
        hv.create_overlay(URI, pool, "root", 64 * MIB, "missing", "raw")
    assert pool_volumes(libvirtd, pool) == []


def test_a_host_that_never_answers_fails_within_the_copy_timeout(silent_host):
    """libvirt itself hangs (the connection never opens): the caller still gets its answer."""
    driver = LibvirtDriver(timeout=1.0)  # also the wait for the helper to clean up
    with pytest.raises(HypervisorTimeout):
        driver.upload_volume(silent_host, "any", "image", 4096, [b"x" * 4096], timeout=1.0)
    with pytest.raises(HypervisorTimeout):
        list(driver.download_volume(silent_host, "any", "image", timeout=1.0))
