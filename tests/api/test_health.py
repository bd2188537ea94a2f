"""/health answers 503 when the database is down."""

import pytest


@pytest.mark.parametrize(
    "app_config", [{"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none?connect_timeout=2"}]
)
def test_health_503_when_database_down(client, app_config):
    response = client.get("/health")
    assert response.status_code == 503
    assert response.json["error_id"] == "general/unavailable"
