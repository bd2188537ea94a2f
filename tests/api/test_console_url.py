"""The console ``url``: built on PUBLIC_URL when it is set, else on the URL the request
was sent to. libvirt's test driver cannot set a display password, so the driver here
passes every call to it but that one, which it takes as done."""

import pytest

from tests.conftest import vm_body
from vmapi.services.nodes.hosts import DRIVER_KEY

pytestmark = pytest.mark.embedded


class DisplayPasswords:
    """The real driver, with display passwords taken as set (the test driver has none)."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    def set_display_password(self, uri, name, password, expires_at):
        return None


@pytest.fixture
def console_vm(app, api, vm_host, test_method):
    app.extensions[DRIVER_KEY] = DisplayPasswords(app.extensions[DRIVER_KEY])
    vm_host()
    return api.post("vm", json=vm_body(test_method, customer_id=7)).json["data"]


def test_without_public_url_the_url_is_the_requests_own(api, console_vm):
    response = api.post(f"vm/{console_vm['id']}/console", headers={"Host": "api.example.net"})
    assert response.status_code == 201, response.json
    assert response.json["data"]["url"].startswith("http://api.example.net/console/vnc.html#")


@pytest.mark.parametrize("app_config", [{"PUBLIC_URL": "https://vmapi.example.com/base"}])
def test_public_url_wins_over_the_host_header(api, console_vm, app_config):
    response = api.post(f"vm/{console_vm['id']}/console", headers={"Host": "evil.example.net"})
    assert response.status_code == 201, response.json
    url = response.json["data"]["url"]
    assert url.startswith("https://vmapi.example.com/base/console/vnc.html#"), url
    assert "evil" not in url
