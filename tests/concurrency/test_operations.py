"""Operating vmapi as deployed (issue 8): metrics added up over gunicorn's workers, the
shipped systemd units verified and their commands run, and the Puppet ENC script run
against a real gunicorn."""

import os
import re
import shutil
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.concurrency.conftest import ROOT, free_port
from tests.conftest import node_body, unavailable

UNITS = ROOT / "deploy" / "systemd"
ENC = ROOT / "deploy" / "puppet" / "vmapi-enc"


def scrape(server) -> dict:
    request = urllib.request.Request(f"{server.url}/metrics")
    request.add_header("Authorization", f"Bearer {server.token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_add_up_every_worker(server):
    route = (("method", "GET"), ("route", "/api/<api_version>/vm_state"), ("status", "200"))
    # the module's server may have answered such requests before this test
    before = scrape(server).get(("vmapi_http_requests_total", route), 0)
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: server.call("GET", "vm_state")[0], range(60)))
    assert statuses == [200] * 60
    samples = scrape(server)
    # 60 requests answered by 5 workers: any worker's scrape counts all of them
    assert samples[("vmapi_http_requests_total", route)] == before + 60
    assert samples[("vmapi_db_connections_open", ())] >= 2  # more than one worker's pool


def exec_start(unit: str) -> list[str]:
    text = (UNITS / unit).read_text()
    line = re.search(r"^ExecStart=(.*)$", text, re.MULTILINE).group(1)
    return line.replace("/opt/vmapi/.venv/bin/", str(ROOT / ".venv" / "bin") + "/").split()


def test_the_systemd_units_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        unavailable("systemd-analyze is not installed")
    units = []
    for unit in sorted(UNITS.iterdir()):
        text = unit.read_text().replace("/opt/vmapi", str(ROOT))
        (tmp_path / unit.name).write_text(text)
        units.append(str(tmp_path / unit.name))
    done = subprocess.run([analyze, "verify", "--man=no", *units], capture_output=True,
                          text=True)  # fmt: skip
    problems = [line for line in done.stderr.splitlines() if "vmapi" in line]
    assert done.returncode == 0 and not problems, done.stderr


def test_the_units_commands_run(server, tmp_path):
    env = {**server.env, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    status, _ = server.call("POST", "node", node_body(libvirt_uri="test:///default"))
    assert status == 201
    for unit in ("vmapi-node-check.service", "vmapi-reconcile.service",
                 "vmapi-event-purge.service", "vmapi-backup.service"):  # fmt: skip
        done = subprocess.run(exec_start(unit), cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, (unit, done.stdout, done.stderr)
    assert "1 node(s), 0 unreachable" in subprocess.run(
        exec_start("vmapi-node-check.service"), cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=120).stdout  # fmt: skip
    # the API unit's command serves, with the metrics directory systemd would make
    port = free_port()
    api = subprocess.Popen(exec_start("vmapi.service"), cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL,
                           env={**env, "GUNICORN_BIND": f"127.0.0.1:{port}",
                                "GUNICORN_WORKERS": "2"})  # fmt: skip
    try:
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                time.sleep(0.2)
        else:
            raise AssertionError("the unit's gunicorn did not answer")
        assert any(name.endswith(".db") for name in os.listdir(tmp_path))
    finally:
        api.terminate()
        api.wait(timeout=30)


def run_enc(server, tmp_path, fqdn, unknown="fail"):
    header = tmp_path / "header"
    header.write_text(f"Authorization: Bearer {server.token}\n")
    conf = tmp_path / "enc.conf"
    conf.write_text(f"VMAPI_URL={server.url}\nVMAPI_HEADER_FILE={header}\n"
                    f"VMAPI_ENC_UNKNOWN={unknown}\n")  # fmt: skip
    return subprocess.run([str(ENC), fqdn], env={**os.environ, "VMAPI_ENC_CONF": str(conf)},
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_the_puppet_enc_script(server, tmp_path):
    body = node_body(libvirt_uri="test:///default", interface_mode="bridge")
    status, node = server.call("POST", "node", body)
    assert status == 201
    done = run_enc(server, tmp_path, body["fqdn"])
    assert done.returncode == 0, done.stderr
    answer = yaml.safe_load(done.stdout)
    assert answer["parameters"]["vmapi_node_id"] == node["data"]["id"]
    assert answer["classes"]["vmapi::hypervisor"]["interface_mode"] == "bridge"
    assert server.token not in done.stdout + done.stderr
    missing = run_enc(server, tmp_path, "unknown.example.com")
    assert missing.returncode == 1 and "node/not_found" in missing.stderr
    empty = run_enc(server, tmp_path, "unknown.example.com", unknown="empty")
    assert empty.returncode == 0 and yaml.safe_load(empty.stdout) == {"classes": {}}
    refused = run_enc(server, tmp_path, "bad;name")
    assert refused.returncode == 2
