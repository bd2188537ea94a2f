"""``GET /api/v1/node/<fqdn>/enc``: a node's Puppet External Node Classifier answer.

The answer is the YAML Puppet reads from an ENC (not the JSON envelope): the ENC script
in deploy/puppet/ prints it as it is. Errors are the usual envelope. Admin only.
"""

from __future__ import annotations

import yaml
from flask import Response, g

from vmapi.api.resource import ADMIN_ONLY, principal
from vmapi.auth import require_role
from vmapi.services.enc import node_classification


def node_enc(fqdn: str) -> Response:
    g.resource_name = "node"
    require_role(principal(), ADMIN_ONLY, "read a node's classification")
    document = yaml.safe_dump(node_classification(fqdn), sort_keys=False,
                              default_flow_style=False)  # fmt: skip
    return Response(document, mimetype="application/yaml")
