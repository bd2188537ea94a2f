"""The whole console path as shipped: a QEMU VM booted from the test guest's image, both
made through the API, the console
proxy started with the command of deploy/systemd/vmapi-console-proxy.service, nginx with
deploy/nginx/vmapi-site.conf (noVNC from Debian's novnc package, the websocket location),
a websocket VNC client down to the framebuffer size, and headless Chromium opening the
answered URL until noVNC says it is connected (its screenshot is kept in the test's
temporary directory). The tests share the session's vmapi on the real libvirtd (``env``,
tests/hypervisor/boot_env.py) and one booted guest; each opens a console of its own."""

import base64
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import websocket

from tests.concurrency.test_nginx import local_paths
from tests.conftest import unavailable
from tests.hypervisor.qemu_host import INSTALLATION
from tests.vnc import RfbClient, VncRefused, WebSocketTransport
from vmapi.extensions import db
from vmapi.models import ConsoleToken

pytestmark = [pytest.mark.hypervisor]

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DEADLINE = 60  # seconds a service or the browser may take; success ends the wait at once


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, process: subprocess.Popen, log: Path):
    """Poll ``check`` until it answers truthy; fail when the process died or at the
    deadline, with its log."""
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            result = check()
            if result:
                return result
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what} did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def unit_command(port: int) -> list[str]:
    """The console proxy unit's ExecStart, with this checkout's venv and a free port."""
    text = (DEPLOY / "systemd" / "vmapi-console-proxy.service").read_text()
    line = re.search(r"^ExecStart=(.*)$", text, re.MULTILINE).group(1)
    line = line.replace("/opt/vmapi/.venv/bin/python", sys.executable)
    return line.replace("127.0.0.1:6080", f"127.0.0.1:{port}").split()


@pytest.fixture(scope="module")
def proxy(env, tmp_path_factory):
    """The console proxy as its unit runs it, on the database of the vmapi of ``env``."""
    log = tmp_path_factory.mktemp("console-proxy") / "websockify.log"
    port = free_port()
    database = env.app.config["DATABASE_URL"]
    variables = {"PATH": "/usr/bin:/bin", "VMAPI_DATABASE_URL": database,
                 "VMAPI_INSTALLATION_ID": INSTALLATION, "VMAPI_LIBVIRT_TIMEOUT": "60"}  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(unit_command(port), cwd=ROOT, env=variables, stdout=out,
                                   stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for("websockify", lambda: socket.create_connection(("127.0.0.1", port), 1).close()
                 or True, process, log)  # fmt: skip
        yield {"port": port, "log": log}
    finally:
        stop(process)


@pytest.fixture(scope="module")
def nginx(proxy, tmp_path_factory):
    """The shipped site, made local: plain HTTP on a free port, the test's proxy upstream,
    its logs in a temporary directory."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        unavailable("nginx is not installed")
    if not Path("/usr/share/novnc/vnc.html").exists():
        unavailable("Debian's novnc package is not installed")
    tmp = tmp_path_factory.mktemp("nginx")
    port = free_port()
    site = (DEPLOY / "nginx" / "vmapi-site.conf").read_text()
    site = (site.replace("server 127.0.0.1:6080;", f"server 127.0.0.1:{proxy['port']};")
            .replace("listen 443 ssl;", f"listen 127.0.0.1:{port};")
            .replace("listen 80;", f"listen 127.0.0.1:{free_port()};")
            .replace("/var/log/nginx/access.log", str(tmp / "console.log"))
            .replace("include /etc/nginx/vmapi-proxy.conf;",
                     f"include {DEPLOY}/nginx/vmapi-proxy.conf;"))  # fmt: skip
    site = local_paths(site, tmp)
    site = "\n".join(line for line in site.splitlines() if "ssl_certificate" not in line)
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"daemon off;\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log;\nevents {{}}\n"
        "http {\ninclude /etc/nginx/mime.types;\n"  # as Debian's nginx.conf has it
        f"access_log {tmp}/access.log;\nclient_body_temp_path {tmp};\nproxy_temp_path {tmp};\n"
        f"{site}\n}}\n"
    )
    process = subprocess.Popen([binary, "-c", str(conf), "-p", str(tmp)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        page = wait_for("nginx", lambda: urllib.request.urlopen(f"{url}/console/vnc.html",
                                                                timeout=2).read(),
                        process, tmp / "error.log")  # fmt: skip
        assert b"noVNC" in page
        yield {"url": url, "logs": tmp}
    finally:
        stop(process)


@pytest.fixture(scope="module")
def guest(env, guest_image):
    """A VM booted from the test guest (uploaded through the API); it goes with the
    module (``env``: the VM and the image, their root disk, copy and log with them)."""
    image = env.upload(guest_image.path)
    vm = env.create(image["id"])
    booted = wait_until(lambda: "VMAPI-TICK" in console_text(env.api, vm["id"]))
    assert booted, console_text(env.api, vm["id"])[-2000:]
    return vm


@pytest.fixture
def console(env, guest, nginx):
    """A new console of the guest, its URL pointing at the test's nginx."""
    response = env.api.post(f"vm/{guest['id']}/console", base_url=nginx["url"])
    assert response.status_code == 201, response.json
    return {"vm": guest, **response.json["data"]}


def console_text(api, vm_id: int) -> str:
    answer = api.get(f"vm/{vm_id}/console_log")
    assert answer.status_code == 200, answer.json
    return answer.json["data"]["text"]


def wait_until(check) -> bool:
    """Poll ``check`` until it holds or DEADLINE passes (a boot takes ~10 s under TCG)."""
    deadline = time.monotonic() + DEADLINE
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def websocket_url(nginx, token: str) -> str:
    return f"{nginx['url'].replace('http', 'ws', 1)}/console/websockify?token={token}"


def connect(nginx, token: str) -> RfbClient:
    ws = websocket.create_connection(websocket_url(nginx, token), subprotocols=["binary"],
                                     timeout=30)  # fmt: skip
    return RfbClient(WebSocketTransport(ws))


def test_a_websocket_client_logs_in_to_the_vms_display(console, nginx, proxy):
    client = connect(nginx, console["token"])
    try:
        assert client.greeting() == b"RFB 003.008\n"
        screen = client.login(console["password"])
    finally:
        client.close()
    assert screen.width > 0 and screen.height > 0
    assert console["vm"]["name"] in screen.name  # QEMU names the display after the domain
    # a wrong password gets VNC's refusal, through the same proxy
    client = connect(nginx, console["token"])
    try:
        assert client.greeting() == b"RFB 003.008\n"
        with pytest.raises(VncRefused):
            client.login("Wr0ngPwd")
    finally:
        client.close()


def test_expired_and_unknown_tokens_are_refused(env, console, nginx, proxy):
    with pytest.raises(websocket.WebSocketBadStatusException):
        connect(nginx, "x" * 43)
    with env.app.app_context():
        db.session.execute(sa.update(ConsoleToken).values(
            expires_at=datetime.now(UTC) - timedelta(seconds=1)))  # fmt: skip
        db.session.commit()
        db.session.remove()
    with pytest.raises(websocket.WebSocketBadStatusException):
        connect(nginx, console["token"])
    log = proxy["log"].read_text()
    assert "refused an unknown console token" in log
    assert f"refused an expired console token of {console['vm']['name']}" in log


def test_no_token_in_the_proxys_or_nginxs_logs(console, nginx, proxy):
    connect(nginx, console["token"]).close()
    connect(nginx, console["token"]).close()
    logs = [proxy["log"], nginx["logs"] / "console.log", nginx["logs"] / "access.log",
            nginx["logs"] / "error.log"]  # fmt: skip
    assert "GET /console/websockify" in (nginx["logs"] / "console.log").read_text()
    assert "<redacted>" in proxy["log"].read_text()  # websockify logged the path, blanked
    for path in logs:
        text = path.read_text()
        assert console["token"] not in text and console["password"] not in text, path


class Browser:
    """Headless Chromium driven over its DevTools protocol (loopback only)."""

    def __init__(self, profile: Path) -> None:
        binary = shutil.which("chromium")
        if binary is None:
            unavailable("Debian's chromium package is not installed")
        self.log = profile.parent / "chromium.log"
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--no-default-browser-check", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-default-apps",
                 "--disable-extensions", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                 "--window-size=1024,768", f"--user-data-dir={profile}",
                 "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                 "about:blank"],
                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        active = profile / "DevToolsActivePort"
        port = wait_for("chromium", lambda: active.exists() and active.read_text().split()[0],
                        self.process, self.log)  # fmt: skip
        pages = wait_for("chromium's page", lambda: [t for t in json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{port}/json/list", timeout=5).read()) if t["type"] == "page"],
            self.process, self.log)  # fmt: skip
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=30,
                                              suppress_origin=True)  # fmt: skip
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise AssertionError(message["error"])
                return message["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)[
            "result"
        ].get("value")

    def close(self) -> None:
        self.ws.close()
        stop(self.process)


NOVNC_STATE = """({
  connected: document.documentElement.classList.contains('noVNC_connected'),
  status: (document.getElementById('noVNC_status') || {}).textContent || '',
  drawn: (() => {
    const canvas = document.querySelector('#noVNC_container canvas');
    if (!canvas || !canvas.width) return false;
    const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    for (let i = 0; i < pixels.length; i += 4) {
      if (pixels[i] || pixels[i + 1] || pixels[i + 2]) return true;
    }
    return false;
  })(),
})"""


def test_a_browser_opens_the_console_url(console, nginx, tmp_path):
    browser = Browser(tmp_path / "profile")
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=console["url"])
        deadline = time.monotonic() + DEADLINE
        state = {}
        while time.monotonic() < deadline:
            state = browser.evaluate(NOVNC_STATE) or {}
            if state.get("connected") and state.get("drawn"):
                break
            time.sleep(0.25)
        shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
        (tmp_path / "console.png").write_bytes(shot)
    finally:
        browser.close()
    assert state.get("connected"), (state, browser.log.read_text()[-2000:])
    assert state["status"].startswith("Connected") and console["vm"]["name"] in state["status"]
    assert state["drawn"]  # the firmware's screen reached the page
    assert shot.startswith(b"\x89PNG")
