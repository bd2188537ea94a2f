"""Assertions on the API's error envelope (API.md §1), shared by the test modules."""


def assert_error(response, status, error_id):
    """``response`` is the error envelope of ``status`` with ``error_id`` and a message;
    its JSON body."""
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.json
    assert body["status"] == "error"
    assert body["status_code"] == status
    assert body["error_id"] == error_id
    assert isinstance(body["message"], str) and body["message"]
    return body
