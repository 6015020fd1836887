"""bbworker.server.refusals: gunicorn's errors mapped to ours. Answered by the app through the worker:
tests/server/test_worker.py; live: tests/live/test_connections.py."""
import pytest
from gunicorn.http import errors as http_errors

from bbworker.server import refusals


@pytest.mark.parametrize("exc, status, title, outcome", [
    (http_errors.LimitRequestLine(9000, 4094), 414, "URI too long", "too_large"),
    (http_errors.LimitRequestHeaders("limit request headers fields size"), 431, "Request header fields too large",
     "too_large"),
    (http_errors.UnsupportedTransferCoding(",chunked"), 501, "Not implemented", "bad_request"),
    (http_errors.ExpectationFailed("200-ok"), 417, "Expectation failed", "bad_request"),
    (http_errors.ForbiddenProxyRequest("10.0.0.1"), 403, "Forbidden", "bad_request"),
    (http_errors.InvalidHeader("CONTENT-LENGTH"), 400, "Bad request", "bad_request"),
    (http_errors.InvalidChunkSize(b"zz"), 400, "Bad request", "bad_request"),
    (http_errors.ConfigurationProblem("SCRIPT_NAME"), 500, "Internal server error", "server_error"),
    (http_errors.InvalidResponseHeader("X-Bad"), 500, "Internal server error", "server_error"),
    (ValueError("a bug"), 500, "Internal server error", "server_error"),
])
def test_refusal_maps_gunicorn_s_errors_to_ours(exc, status, title, outcome):
    error = refusals.refusal(exc)
    assert (error.status, error.title, error.outcome) == (status, title, outcome)
    assert error.fault == ("server" if status == 500 else "client")
    assert "10.0.0.1" not in error.detail  # gunicorn does not name the proxy either
