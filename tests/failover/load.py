"""A load of creates (each with an Idempotency-Key), deletes and reads, sent to nginx's
Unix socket by threads of the test, every answer recorded with its times."""

from __future__ import annotations

import http.client
import itertools
import json
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

MIB = 1024**2


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 30) -> None:
        super().__init__("vmapi.test", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


def call(path: str, method: str, url: str, token: str = "", body: Any = None,
         headers: dict[str, str] | None = None, timeout: float = 30):  # fmt: skip
    """(status, headers, JSON body) of one request over a Unix socket; status 0 when no
    whole HTTP answer came (the connection broke, before or during the answer)."""
    conn = UnixHTTPConnection(path, timeout)
    sent = {"Authorization": f"Bearer {token}", **(headers or {})}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        sent["Content-Type"] = "application/json"
    try:
        conn.request(method, url, body=data, headers=sent)
        response = conn.getresponse()
        raw = response.read()
        try:
            parsed = json.loads(raw) if raw else {}
        except ValueError:
            parsed = {"raw": raw[:200].decode(errors="replace")}
        return response.status, dict(response.headers), parsed
    except (OSError, http.client.HTTPException) as exc:  # (cut mid-answer: IncompleteRead)
        return 0, {}, {"error": repr(exc)}
    finally:
        conn.close()


@dataclass
class Answer:
    op: str  # create, delete, read
    start: float
    end: float
    status: int
    retry_after: str | None
    error_id: str | None
    key: str | None = None
    vm: int | None = None
    attempt: int = 1


class Load:
    """``creators`` threads creating VMs (a 503 is retried with the same key, as a client
    told Retry-After would), ``deleters`` deleting VMs made before, ``readers`` reading."""

    def __init__(self, sock: str, token: str, body: dict, creators: int = 4,
                 deleters: int = 1, readers: int = 2, retry_pause: float = 0.3) -> None:  # fmt: skip
        self.sock, self.token, self.body = sock, token, body
        self.retry_pause = retry_pause
        self.answers: list[Answer] = []
        self.made: dict[str, int] = {}  # key -> the VM its 201 named
        self.retried: set[str] = set()  # keys sent again after a 503
        self.deleted: set[int] = set()  # VMs whose delete answered 200 (or 404 on a retry)
        self.live: list[int] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.creator, daemon=True) for _ in range(creators)]
        self.threads += [
            threading.Thread(target=self.deleter, daemon=True) for _ in range(deleters)
        ]
        self.threads += [threading.Thread(target=self.reader, daemon=True) for _ in range(readers)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self, grace: float = 40) -> None:
        """No new requests; a key being retried is retried until it has its answer."""
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=grace)
        assert not any(t.is_alive() for t in self.threads), "load threads did not finish"

    def send(self, op: str, method: str, url: str, body: Any = None, key: str | None = None,
             attempt: int = 1) -> tuple[int, dict]:  # fmt: skip
        headers = {"Idempotency-Key": key} if key else {}
        start = time.monotonic()
        status, answer_headers, answer = call(self.sock, method, url, self.token, body, headers)
        vm = answer.get("data", {}).get("id") if status in (200, 201) else None
        with self.lock:
            self.answers.append(Answer(
                op, start, time.monotonic(), status, answer_headers.get("Retry-After"),
                answer.get("error_id"), key, vm, attempt,
            ))  # fmt: skip
        return status, answer

    def creator(self) -> None:
        while not self.stopping.is_set():
            key = uuid.uuid4().hex
            body = {**self.body, "hostname": f"k{key[:20]}"}
            attempt = 1
            deadline = time.monotonic() + 60
            while True:
                status, answer = self.send("create", "POST", "/api/v1/vm", body, key, attempt)
                if status == 201:
                    with self.lock:
                        self.made[key] = answer["data"]["id"]
                        self.live.append(answer["data"]["id"])
                    break
                if status != 503 or time.monotonic() > deadline:
                    break  # recorded; the checks judge it
                with self.lock:
                    self.retried.add(key)
                attempt += 1
                time.sleep(self.retry_pause)

    def deleter(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                vm = self.live.pop(0) if len(self.live) > 8 else None
            if vm is None:
                time.sleep(0.1)
                continue
            attempt = 1
            deadline = time.monotonic() + 60
            while True:
                status, _ = self.send("delete", "DELETE", f"/api/v1/vm/{vm}", attempt=attempt)
                # 404 after a retry: the first attempt's commit went through
                if status == 200 or (status == 404 and attempt > 1):
                    with self.lock:
                        self.deleted.add(vm)
                    break
                if status != 503 or time.monotonic() > deadline:
                    break
                attempt += 1
                time.sleep(self.retry_pause)

    def reader(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                vm = random.choice(self.live) if self.live else None
            if vm is None:
                time.sleep(0.05)
                continue
            if self.send("read", "GET", f"/api/v1/vm/{vm}")[0] not in (200, 404):
                time.sleep(0.1)  # as a client would, rather than spin on 503s

    # -- what the checks read ------------------------------------------------------
    def of(self, op: str) -> list[Answer]:
        return [a for a in self.answers if a.op == op]

    def failed(self) -> list[Answer]:
        """Answers that were not what a healthy service gives (404 only for reads of a VM
        deleted meanwhile, and for a delete's retry)."""
        ok = {"create": {201}, "delete": {200}, "read": {200}}
        return [a for a in self.answers
                if a.status not in ok[a.op]
                and not (a.status == 404 and (a.op == "read" or a.attempt > 1))]  # fmt: skip

    def server_errors(self) -> list[Answer]:
        """A 5xx but 503, or no HTTP answer at all."""
        return [a for a in self.answers if a.status == 0 or (a.status >= 500 and a.status != 503)]

    def unavailable_without_retry_after(self) -> list[Answer]:
        return [a for a in self.answers if a.status == 503 and not a.retry_after]

    def longest_gap(self, since: float) -> float:
        """The longest time without a create answering 201, from ``since`` on: the stall
        (creates that hang rather than fail do not show in ``outage``)."""
        ends = sorted(a.end for a in self.of("create") if a.status == 201 and a.end >= since)
        points = [since, *ends]
        return max((b - a for a, b in itertools.pairwise(points)), default=0.0)

    def outage(self, since: float) -> tuple[float, float | None] | None:
        """(end of the first failed create after ``since``, end of the first 201 of a create
        sent after it, or None) in monotonic seconds; None when no create failed."""
        creates = sorted(self.of("create"), key=lambda a: a.end)
        first_failed = next((a for a in creates if a.end >= since and a.status != 201), None)
        if first_failed is None:
            return None
        back = next((a for a in creates if a.status == 201 and a.start > first_failed.end), None)
        return first_failed.end, back.end if back else None
