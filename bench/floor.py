"""The floor: a minimal WSGI app doing only the unavoidable work, served by the same
gunicorn as vmapi in the same run (issue 7, item 3).

``POST /vm``: one INSERT, one libvirt define + start on the same driver, a commit, JSON
out. ``GET /vm/<id>``: one SELECT by primary key, JSON out. ``GET /vm?limit=N``: one
SELECT of the first N rows in id order, JSON out keyed by id. No auth, no schemas, no
scheduler, no addresses: what a create or a read cannot do without. Connections are
opened once per worker after the fork, as vmapi does.

Configured by environment: ``FLOOR_DATABASE_URL`` (libpq URL), ``FLOOR_LIBVIRT_URI``,
``FLOOR_NODE_ID``, ``FLOOR_VIRT_METHOD_ID``, ``FLOOR_VM_STATE_ID``.
"""

from __future__ import annotations

import json
import os
import uuid
import xml.etree.ElementTree as ET

import libvirt
import psycopg2

_db = None
_conn = None


def database():
    global _db
    if _db is None:
        _db = psycopg2.connect(os.environ["FLOOR_DATABASE_URL"])
    return _db


def hypervisor():
    global _conn
    if _conn is None:
        _conn = libvirt.open(os.environ["FLOOR_LIBVIRT_URI"])
    return _conn


def domain_xml(name: str, uuid_: str, cores: int, ram: int) -> str:
    dom = ET.Element("domain", type="test")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "uuid").text = uuid_
    ET.SubElement(dom, "memory", unit="b").text = str(ram)
    ET.SubElement(dom, "vcpu").text = str(cores)
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type").text = "hvm"
    return ET.tostring(dom, encoding="unicode")


def answer(start_response, status: str, payload: dict) -> list[bytes]:
    body = json.dumps(payload).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))])  # fmt: skip
    return [body]


def create(environ, start_response):
    length = int(environ.get("CONTENT_LENGTH") or 0)
    data = json.loads(environ["wsgi.input"].read(length))
    conn = database()
    vm_uuid = str(uuid.uuid4())
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO vm (cores, ram, uuid, node_id, virt_method_id, vm_state_id, created_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, now()) RETURNING id",
            (data["cores"], data["ram"], vm_uuid, os.environ["FLOOR_NODE_ID"],
             os.environ["FLOOR_VIRT_METHOD_ID"], os.environ["FLOOR_VM_STATE_ID"]),
        )  # fmt: skip
        vm_id = cur.fetchone()[0]
    try:
        dom = hypervisor().defineXML(domain_xml(f"floor-{vm_id}", vm_uuid, data["cores"],
                                                data["ram"]))  # fmt: skip
        dom.create()
    except libvirt.libvirtError:
        conn.rollback()
        raise
    conn.commit()
    return answer(start_response, "201 Created", {"data": {"id": vm_id, "uuid": vm_uuid}})


def read(environ, start_response, vm_id: int):
    conn = database()
    with conn.cursor() as cur:
        cur.execute("SELECT id, cores, ram, uuid, node_id FROM vm WHERE id = %s", (vm_id,))
        row = cur.fetchone()
    conn.rollback()  # end the read transaction
    if row is None:
        return answer(start_response, "404 Not Found", {"error": "not found"})
    keys = ("id", "cores", "ram", "uuid", "node_id")
    return answer(start_response, "200 OK", {"data": dict(zip(keys, row, strict=True))})


def page(environ, start_response):
    query = dict(part.split("=", 1) for part in environ.get("QUERY_STRING", "").split("&") if part)
    limit = int(query.get("limit", 100))
    conn = database()
    with conn.cursor() as cur:
        cur.execute("SELECT id, cores, ram, uuid, node_id FROM vm ORDER BY id LIMIT %s", (limit,))
        rows = cur.fetchall()
    conn.rollback()  # end the read transaction
    keys = ("id", "cores", "ram", "uuid", "node_id")
    data = {str(row[0]): dict(zip(keys, row, strict=True)) for row in rows}
    return answer(start_response, "200 OK", {"data": data})


def app(environ, start_response):
    method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
    if path == "/health":
        return answer(start_response, "200 OK", {"status": "ok"})
    if method == "POST" and path == "/vm":
        return create(environ, start_response)
    if method == "GET" and path == "/vm":
        return page(environ, start_response)
    if method == "GET" and path.startswith("/vm/"):
        return read(environ, start_response, int(path.removeprefix("/vm/")))
    return answer(start_response, "404 Not Found", {"error": "not found"})
