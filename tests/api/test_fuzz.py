"""Fuzzing the contract: schemathesis over every operation of /api/v1/openapi.json.

In-process over WSGI with an admin token, on PostgreSQL, with a fleet that has a node,
addresses and a VM so that generated ids meet real rows. Every answer must be a
documented status with a body matching the documented schema, and never a 5xx.
Bounded and derandomized so it runs in CI in about a minute.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    positive_data_acceptance,
    unsupported_method,
)

from tests.conftest import vm_body
from vmapi.api.openapi import openapi_document

# The document is built from the same registry the app serves from (no app needed);
# test_openapi.py proves the app serves exactly this document.
schema = schemathesis.openapi.from_dict(openapi_document())


class CurrentApp:
    """A WSGI app that forwards to the app of the running test (operations capture the
    schema's app when pytest collects them, before any fixture exists)."""

    app = None

    def __call__(self, environ, start_response):
        return self.app(environ, start_response)


current_app = CurrentApp()
schema.app = current_app


@pytest.fixture
def fleet(app, api, vm_host, test_method):
    vm_host()
    api.post("vm", json=vm_body(test_method))
    current_app.app = app  # every request of this test, checks included, goes here


@schema.parametrize()
@settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_contract(case, app, api, fleet):
    # positive_data_acceptance expects every schema-valid body to succeed; references to
    # rows that do not exist, conflicts and capacity rightly answer 4xx. unsupported_method
    # reads Allow headers, which rightly list UPDATE: OpenAPI 3.0 cannot name it, the
    # document marks it with x-method-aliases (and test_openapi.py checks it).
    excluded = [positive_data_acceptance, unsupported_method, allow_header_conformance]
    case.call_and_validate(
        base_url="http://localhost",
        headers={"Authorization": f"Bearer {api.token}"},
        excluded_checks=excluded,
    )
