"""PUT and GET /image/<id>/file: the upload streamed to the store, inspected with the
real qemu-img, refused with nothing left behind, counted in the owner's quota."""

import io
import os
import time

import pytest
import sqlalchemy as sa

from tests.errors import assert_error
from tests.image_files import MIB, OCTET, ImageFiles, sha256
from vmapi.services.images.store import STALE_AFTER

LIMIT = 4 * MIB


@pytest.fixture
def app_config():
    return {"IMAGE_MAX_SIZE": LIMIT, "IMAGE_MAX_VIRTUAL_SIZE": 64 * MIB}


@pytest.fixture
def files(tmp_path):
    return ImageFiles(tmp_path / "made")


@pytest.fixture
def store(app):
    return app.config["IMAGE_DIR"]


def stored(store):
    return sorted(os.listdir(store)) if os.path.isdir(store) else []


def new_image(api, **fields):
    response = api.post("image", json={"name": "img", **fields})
    assert response.status_code == 201, response.json
    return response.json["data"]["id"]


def put(api, ident, data, headers=None, **kw):
    return api.call("PUT", f"image/{ident}/file", data=data, headers={**OCTET, **(headers or {})},
                    **kw)  # fmt: skip


def put_chunked(api, ident, stream):
    """A chunked body (no length), as it reaches the app from gunicorn."""
    if isinstance(stream, bytes):
        stream = io.BytesIO(stream)
    response = api.call("PUT", f"image/{ident}/file", input_stream=stream,
                        headers={**OCTET, "Transfer-Encoding": "chunked"},
                        environ_overrides={"wsgi.input_terminated": True})  # fmt: skip
    assert response.request.content_length is None
    return response


def assert_nothing_kept(api, store, ident):
    assert stored(store) == []
    image = api.get(f"image/{ident}").json["data"]
    assert (image["state"], image["size"], image["virtual_size"]) == ("queued", None, None)


@pytest.mark.embedded  # also on make run's SQLite
def test_qcow2_upload_and_download(api, files, store):
    data = files.qcow2("16M")
    ident = new_image(api, checksum=sha256(data))
    response = put(api, ident, data)
    assert response.status_code == 200, response.json
    image = response.json["data"]
    assert image["state"] == "active"
    assert image["size"] == len(data)
    assert image["virtual_size"] == 16 * MIB
    assert image["checksum"] == sha256(data)
    assert api.get(f"image/{ident}").json["data"] == image
    (name,) = stored(store)
    assert name.startswith(f"image-{ident}-")
    back = api.get(f"image/{ident}/file")
    assert back.status_code == 200
    assert back.mimetype == "application/octet-stream"
    assert back.headers["Content-Length"] == str(len(data))
    assert back.headers["ETag"] == f'"{sha256(data)}"'
    assert back.get_data() == data
    head = api.call("HEAD", f"image/{ident}/file")
    assert head.status_code == 200 and head.headers["Content-Length"] == str(len(data))
    assert head.get_data() == b""
    head.close()


def test_raw_upload_larger_than_the_json_limit(api, files, store):
    data = files.raw(2 * MIB + 5)  # JSON bodies stop at 1 MiB
    ident = new_image(api, format="raw")
    image = put(api, ident, data).json["data"]
    assert (image["state"], image["size"]) == ("active", len(data))
    assert image["virtual_size"] == 2 * MIB + 512  # qemu counts whole 512-byte sectors
    assert image["checksum"] == sha256(data)
    assert api.get(f"image/{ident}/file").get_data() == data
    # everything else keeps the 1 MiB limit
    big = {"name": "x", "description": "y" * (2 * MIB)}
    assert_error(api.post("image", json=big), 413, "general/body_too_large")


def test_chunked_upload(api, files):
    data = files.qcow2("8M")
    ident = new_image(api)
    response = put_chunked(api, ident, data)
    assert response.status_code == 200, response.json
    assert response.json["data"]["size"] == len(data)


def test_an_active_image_keeps_its_file(api, files, store):
    data = files.qcow2()
    ident = new_image(api)
    assert put(api, ident, data).status_code == 200
    before = stored(store)
    assert_error(put(api, ident, files.qcow2("1M")), 409, "image/immutable")
    assert stored(store) == before
    assert api.get(f"image/{ident}/file").get_data() == data


def test_download_of_a_queued_image(api):
    ident = new_image(api)
    error = assert_error(api.get(f"image/{ident}/file"), 409, "image/not_active")
    assert error["data"] == {"state": "queued"}


def test_the_file_must_be_octet_stream(api, files, store):
    ident = new_image(api)
    response = put(api, ident, files.qcow2(), headers={"Content-Type": "application/json"})
    error = assert_error(response, 415, "general/unsupported_media_type")
    assert "application/octet-stream" in error["message"]
    assert_nothing_kept(api, store, ident)


REFUSALS = {
    "declared raw, is qcow2": (lambda f: f.qcow2(), {"format": "raw"}, "is qcow2, but"),
    "declared qcow2, is raw": (lambda f: f.raw(MIB), {}, "is raw, but"),
    "backing file /etc/shadow": (
        lambda f: f.qcow2("1M", "-b", "/etc/shadow", "-F", "raw"),
        {},
        "backing file",
    ),
    "external data file": (lambda f: f.with_data_file(), {}, "external data file"),
    "encrypted": (lambda f: f.encrypted(), {}, "encrypted"),
    "virtual size above the limit": (lambda f: f.qcow2("65M"), {}, "virtual size"),
    "vmdk": (lambda f: f.create("vmdk", "1M"), {}, "VMDK"),
    "vdi": (lambda f: f.create("vdi", "1M"), {"format": "raw"}, "vdi image"),
    "empty": (lambda f: b"", {"format": "raw"}, "empty"),
    "checksum mismatch": (lambda f: f.qcow2(), {"checksum": "0" * 64}, "sha256"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_files_leave_nothing(api, files, store, case):
    make, fields, reason = REFUSALS[case]
    ident = new_image(api, **fields)
    error = assert_error(put(api, ident, make(files)), 400, "image/invalid")
    assert reason in error["message"]
    assert_nothing_kept(api, store, ident)
    # the image stays queued: a good file is accepted afterwards
    good = files.raw(MIB) if fields.get("format") == "raw" else files.qcow2()
    if "checksum" not in fields:
        assert put(api, ident, good).json["data"]["state"] == "active"


def test_a_refusal_is_in_the_audit_trail(api, files):
    ident = new_image(api, format="raw")
    put(api, ident, files.qcow2())
    events = api.get(f"event?resource=image&object_id={ident}").json["data"].values()
    assert [(e["action"], e["outcome"], e["status"]) for e in events] == [
        ("create", "ok", None),
        ("update", "image/invalid", 400),
    ]


def test_announced_length_above_the_limit(api, store):
    ident = new_image(api, format="raw")
    response = put(api, ident, b"\0" * (LIMIT + 1))
    error = assert_error(response, 413, "general/body_too_large")
    assert str(LIMIT) in error["message"]
    assert_nothing_kept(api, store, ident)


def test_chunked_body_above_the_limit(api, store, files):
    ident = new_image(api, format="raw")
    assert_error(put_chunked(api, ident, files.raw(LIMIT + 1)), 413, "general/body_too_large")
    assert_nothing_kept(api, store, ident)
    # exactly the limit is fine
    assert put_chunked(api, ident, files.raw(LIMIT)).status_code == 200


def test_truncated_upload(api, store, files):
    ident = new_image(api, format="raw")
    data = files.raw(MIB)
    response = put(api, ident, data, environ_overrides={"CONTENT_LENGTH": str(2 * MIB)})
    error = assert_error(response, 400, "image/invalid")
    assert f"ended after {MIB} of {2 * MIB} bytes" in error["message"]
    assert_nothing_kept(api, store, ident)


def test_chunked_body_that_breaks_off(api, store, files):
    """A chunked body has no length to compare with: a broken connection must fail the
    upload, not end it (the part that came would be a valid raw image)."""
    ident = new_image(api, format="raw")

    class Broken(io.BytesIO):
        def read(self, size=-1):
            if self.tell() >= MIB:
                raise OSError("connection reset by peer")
            return super().read(min(size, MIB - self.tell()))

    error = assert_error(put_chunked(api, ident, Broken(files.raw(2 * MIB))), 400, "image/invalid")
    assert f"broke off after {MIB} bytes" in error["message"]
    assert_nothing_kept(api, store, ident)


def test_image_deleted_while_its_file_arrives(app, api, store, files):
    """No transaction is open while the bytes arrive; the delete wins, the upload finds
    no image to activate and removes its file."""
    ident = new_image(api)
    engine = sa.create_engine(app.config["SQLALCHEMY_DATABASE_URI"])

    class DeletingStream(io.BytesIO):
        def readinto(self, buffer):
            if self.tell() == 0:
                with engine.begin() as conn:
                    conn.execute(sa.text("DELETE FROM image WHERE id = :id"), {"id": ident})
            return super().readinto(buffer)

    data = files.qcow2()
    response = api.call("PUT", f"image/{ident}/file", input_stream=DeletingStream(data),
                        headers=OCTET, content_length=len(data))  # fmt: skip
    engine.dispose()
    assert_error(response, 404, "image/not_found")
    assert stored(store) == []


def test_delete_removes_the_file(api, store, files):
    ident = new_image(api)
    put(api, ident, files.qcow2())
    assert len(stored(store)) == 1
    assert api.delete(f"image/{ident}").status_code == 200
    assert stored(store) == []


def test_temporary_files_of_dead_uploads_are_swept(api, store, files):
    os.makedirs(store, exist_ok=True)
    old, recent = os.path.join(store, ".upload-99-dead"), os.path.join(store, ".upload-98-live")
    for path in (old, recent):
        with open(path, "wb") as handle:
            handle.write(b"partial")
    past = time.time() - STALE_AFTER - 60
    os.utime(old, (past, past))
    put(api, new_image(api), files.qcow2())
    names = stored(store)
    assert ".upload-99-dead" not in names and ".upload-98-live" in names


# ---------------------------------------------------------------- customers and quotas
@pytest.fixture
def quota(api):
    response = api.post("quota", json={"customer_id": 7, "max_storage": 3 * MIB})
    assert response.status_code == 201
    return response.json["data"]


def test_customers_upload_and_read_their_own(api, customer_api, files):
    seven, eight = customer_api(7), customer_api(8)
    data = files.qcow2()
    ident = new_image(seven)
    assert put(seven, ident, data).status_code == 200
    assert seven.get(f"image/{ident}/file").get_data() == data
    assert_error(eight.get(f"image/{ident}/file"), 404, "image/not_found")
    assert_error(put(eight, ident, data), 404, "image/not_found")
    public = new_image(api)
    put(api, public, data)
    assert eight.get(f"image/{public}/file").get_data() == data


def test_an_upload_beyond_the_quota(api, customer_api, files, store, quota):
    seven = customer_api(7)
    ident = new_image(seven, format="raw")
    error = assert_error(put(seven, ident, files.raw(3 * MIB + 1)), 403, "image/quota_exceeded")
    assert error["data"] == {"quota": "max_storage", "limit": 3 * MIB, "usage": 0,
                             "requested": 3 * MIB + 1}  # fmt: skip
    assert_nothing_kept(seven, store, ident)
    # a chunked body is stopped where it passes the quota
    assert_error(put_chunked(seven, ident, files.raw(3 * MIB + 1)), 403, "image/quota_exceeded")
    assert_nothing_kept(seven, store, ident)
    # public images (admins') count for nobody
    assert put(api, new_image(api, format="raw"), files.raw(3 * MIB)).status_code == 200


def test_images_and_volumes_share_the_quota(api, customer_api, files, quota, vm_host, test_method):
    from tests.conftest import vm_body

    seven = customer_api(7)
    first = new_image(seven, format="raw")
    assert put(seven, first, files.raw(2 * MIB)).status_code == 200
    second = new_image(seven, format="raw")
    error = assert_error(put(seven, second, files.raw(2 * MIB)), 403, "image/quota_exceeded")
    assert error["data"]["usage"] == 2 * MIB
    vm_host()
    vm = seven.post("vm", json=vm_body(test_method, cores=1, ram=1024**3)).json["data"]
    body = {"size": 2 * MIB, "vm": {"id": vm["id"]}, "storage_type": {"id": 1}}
    error = assert_error(seven.post("storage", json=body), 403, "storage/quota_exceeded")
    assert error["data"]["usage"] == 2 * MIB
    assert seven.delete(f"image/{first}").status_code == 200
    assert put(seven, second, files.raw(2 * MIB)).status_code == 200
