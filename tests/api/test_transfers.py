"""Transfer slots of PUT and GET /image/<id>/file: one upload per image (409
``image/busy``), ``VMAPI_TRANSFERS_PER_CUSTOMER`` transfers in flight per customer (429
``general/too_many_requests`` with Retry-After), slots freed however a transfer ends
(also by a killed process, on PostgreSQL); the minimum rate of a transfer Python serves;
and downloads handed to nginx with X-Accel-Redirect.

"Another transfer in flight" is a real slot taken through the service, as another
worker's request holds it (on PostgreSQL, an advisory lock on a connection of its own).
"""

import json
import subprocess
import sys
import textwrap

import pytest

from tests.api.test_image_file import assert_nothing_kept, new_image, put, stored
from tests.errors import assert_error
from tests.image_files import MIB, ImageFiles, sha256
from vmapi.auth import Principal
from vmapi.services.images import transfers
from vmapi.services.images.store import TransferTooSlow
from vmapi.services.images.transfers import RETRY_AFTER

CAP = 2
SEVEN = Principal(0, "other request", "customer", 7)


@pytest.fixture
def app_config():
    return {"IMAGE_MAX_SIZE": 4 * MIB, "TRANSFERS_PER_CUSTOMER": CAP}


@pytest.fixture
def files(tmp_path):
    return ImageFiles(tmp_path / "made")


@pytest.fixture
def store(app):
    return app.config["IMAGE_DIR"]


@pytest.fixture
def held(app):
    """``held(principal, image_id, upload)``: a slot another request holds (freed after)."""
    slots = []

    def take(principal, image_id, upload):
        with app.app_context():
            slots.append(transfers.take(principal, image_id, upload))
        return slots[-1]

    yield take
    for slot in slots:
        with app.app_context():
            slot.release()


@pytest.mark.embedded
def test_a_second_upload_of_an_image_is_busy(api, customer_api, files, store, held):
    seven = customer_api(7)
    ident = new_image(seven, format="raw")
    first = held(SEVEN, ident, True)
    error = assert_error(put(seven, ident, files.raw(MIB)), 409, "image/busy")
    assert error["data"] == {"image": {"id": ident}}
    assert_nothing_kept(seven, store, ident)
    assert_error(put(api, ident, files.raw(MIB)), 409, "image/busy")  # admins too
    other = new_image(seven, format="raw")  # another image is not busy
    assert put(seven, other, files.raw(MIB)).status_code == 200
    first.release()
    data = files.raw(MIB)
    response = put(seven, ident, data)
    assert response.status_code == 200 and response.json["data"]["checksum"] == sha256(data)


@pytest.mark.embedded
def test_a_customer_has_at_most_the_cap_in_flight(api, customer_api, files, held):
    seven, eight = customer_api(7), customer_api(8)
    data = files.raw(MIB)
    mine = new_image(seven, format="raw")
    assert put(seven, mine, data).status_code == 200
    queued = new_image(seven, format="raw")
    slots = [held(SEVEN, mine, False) for _ in range(CAP)]
    for response in (put(seven, queued, data), seven.get(f"image/{mine}/file")):
        error = assert_error(response, 429, "general/too_many_requests")
        assert response.headers["Retry-After"] == str(RETRY_AFTER)
        assert error["data"] == {"customer_id": 7, "limit": CAP}
    # another customer, and admins, are not counted against customer 7
    theirs = new_image(eight, format="raw")
    assert put(eight, theirs, data).status_code == 200
    assert api.get(f"image/{mine}/file").get_data() == data
    slots[0].release()
    with seven.get(f"image/{mine}/file") as response:  # the server closes it when sent
        assert response.get_data() == data
    assert put(seven, queued, data).status_code == 200


@pytest.mark.embedded
def test_a_download_holds_its_slot_until_it_is_closed(customer_api, files, held):
    seven = customer_api(7)
    data = files.raw(3 * MIB)
    ident = new_image(seven, format="raw")
    assert put(seven, ident, data).status_code == 200
    held(SEVEN, ident, False)
    streaming = [seven.get(f"image/{ident}/file", buffered=False) for _ in range(CAP - 1)]
    assert all(response.status_code == 200 for response in streaming)
    assert_error(seven.get(f"image/{ident}/file"), 429, "general/too_many_requests")
    streaming[0].close()  # the client went away mid-file
    with seven.get(f"image/{ident}/file") as response:
        assert response.get_data() == data


def test_a_killed_holder_frees_its_slot(app, customer_api, files, pg_database):
    """A worker killed mid-transfer: PostgreSQL ends its session, and its locks with it."""
    seven = customer_api(7)
    ident = new_image(seven, format="raw")
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, sqlalchemy as sa
            from vmapi.config import database_url
            from vmapi.services.images.transfers import upload_key
            conn = sa.create_engine(database_url({pg_database!r})).connect()
            assert conn.execute(sa.select(sa.func.pg_try_advisory_lock(upload_key({ident})))).scalar()
            conn.commit()
            print("held", flush=True)
            sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        assert_error(put(seven, ident, files.raw(MIB)), 409, "image/busy")
    finally:
        holder.kill()
        holder.wait()
    assert put(seven, ident, files.raw(MIB)).status_code == 200


@pytest.mark.embedded
def test_a_refused_transfer_frees_its_slot(customer_api, files, store):
    """An upload that is refused (here: not the qcow2 it claims) frees the image's lock and
    the customer's slot."""
    seven = customer_api(7)
    ident = new_image(seven, format="qcow2")
    for _ in range(CAP + 1):
        assert_error(put(seven, ident, files.raw(MIB)), 400, "image/invalid")
    assert_nothing_kept(seven, store, ident)
    assert put(seven, ident, files.qcow2("1M")).status_code == 200


@pytest.mark.embedded
@pytest.mark.parametrize("app_config", [{"TRANSFER_MIN_RATE": 10**12,
                                         "TRANSFER_MIN_RATE_GRACE": 0.0}])  # fmt: skip
def test_an_upload_below_the_minimum_rate_is_cut(api, files, store, caplog):
    """No client moves a terabyte a second: the first chunk is already too slow."""
    ident = new_image(api, format="raw")
    error = assert_error(put(api, ident, files.raw(2 * MIB)), 400, "image/invalid")
    assert "below the minimum of 1000000000000 bytes/s" in error["message"]
    assert_nothing_kept(api, store, ident)
    assert "image upload cut" in caplog.text


@pytest.mark.embedded
@pytest.mark.parametrize("app_config", [{"IMAGE_MAX_SIZE": 4 * MIB,
                                         "TRANSFERS_PER_CUSTOMER": 1}])  # fmt: skip
def test_a_download_below_the_minimum_rate_is_cut(app, customer_api, files, caplog):
    """A customer's download (admins take no slot): cut, it frees the customer's one
    slot."""
    seven = customer_api(7)
    ident = new_image(seven, format="raw")
    assert put(seven, ident, files.raw(3 * MIB)).status_code == 200
    app.config.update(TRANSFER_MIN_RATE=10**12, TRANSFER_MIN_RATE_GRACE=0.0)
    response = seven.get(f"image/{ident}/file", buffered=False)
    assert response.status_code == 200
    chunks = iter(response.response)
    assert len(next(chunks)) == MIB  # the first chunk goes out, then the rate is checked
    with pytest.raises(TransferTooSlow):
        next(chunks)
    response.close()
    assert "image download cut" in caplog.text
    app.config.update(TRANSFER_MIN_RATE=0)  # its slot was freed: the cap is not reached
    with seven.get(f"image/{ident}/file") as again:  # closed: its own slot freed
        assert again.status_code == 200


@pytest.mark.embedded
@pytest.mark.parametrize("app_config", [{"ACCEL_REDIRECT": "/_vmapi_image_store/",
                                         "TRANSFERS_PER_CUSTOMER": 1}])  # fmt: skip
def test_behind_nginx_a_download_is_an_accel_redirect(customer_api, files, store):
    seven = customer_api(7)
    data = files.raw(MIB)
    ident = new_image(seven, format="raw")
    assert put(seven, ident, data).status_code == 200
    (name,) = stored(store)
    for _ in range(2):  # no slot stays taken: nginx sends the file, and counts it
        response = seven.get(f"image/{ident}/file")
        assert response.status_code == 200
        assert response.headers["X-Accel-Redirect"] == f"/_vmapi_image_store/{name}"
        assert response.headers["ETag"] == f'"{sha256(data)}"'
        assert response.headers["Content-Type"] == "application/octet-stream"
        assert response.get_data() == b""


@pytest.mark.embedded
def test_nginx_asks_whether_an_upload_may_begin(api, customer_api, files, store):
    """The site's auth_request: the upload's PUT without its body, with
    X-Vmapi-Upload-Check (and the length the client announced): 204 and nothing kept
    nor taken, or the upload's own refusal, its envelope also in X-Vmapi-Refusal."""
    seven, eight = customer_api(7), customer_api(8)
    ident, public = new_image(seven, format="raw"), new_image(api, format="raw")

    def check(client, image, length=None, **headers):
        asked = {"X-Vmapi-Upload-Check": "1", **headers}
        if length is not None:
            asked["X-Vmapi-Upload-Length"] = str(length)
        return put(client, image, b"", headers=asked)

    allowed = check(seven, ident, 1024)
    assert allowed.status_code == 204 and allowed.get_data() == b""
    assert_nothing_kept(seven, store, ident)
    refusals = [(eight, ident, None, 404, "image/not_found"),
                (seven, public, None, 403, "general/authorization/forbidden"),
                (seven, ident, 4 * MIB + 1, 413, "general/body_too_large")]  # fmt: skip
    for client, image, length, code, error_id in refusals:
        refused = check(client, image, length)
        assert_error(refused, code, error_id)
        assert json.loads(refused.headers["X-Vmapi-Refusal"]) == refused.json
    assert_error(check(seven, ident, **{"Content-Type": "text/plain"}), 415,
                 "general/unsupported_media_type")  # fmt: skip
    # the check took no slot: the customer's CAP transfers and the image's upload are free
    assert put(seven, ident, files.raw(MIB)).status_code == 200
    assert_error(check(seven, ident), 409, "image/immutable")
    with seven.get(f"image/{ident}/file") as download:
        assert download.status_code == 200 and "X-Vmapi-Refusal" not in download.headers
