"""The real host of the hypervisor tier and what its tests share (one module, imported
once: pytest may import a conftest under two names, and this id must be one).

Domains and volumes made here carry a test installation id, in their names too.
"""

import subprocess
import uuid

from tests.conftest import GIB

URI = "qemu:///system"
# at most 16 characters (it goes into every name); the marker finds this tier's leftovers
MARKER = "vmapi-t-"
INSTALLATION = f"{MARKER}{uuid.uuid4().hex[:8]}"


def kvm_works() -> bool:
    result = subprocess.run(["virsh", "-c", URI, "domcapabilities", "--virttype", "kvm"],
                            capture_output=True, timeout=120)  # fmt: skip
    return result.returncode == 0


def create(api, qemu_node, **fields):
    body = {"cores": 2, "ram": GIB, "virt_method": {"id": qemu_node["method"]}, **fields}
    response = api.post("vm", json=body)
    assert response.status_code == 201, response.json
    return response.json["data"]
