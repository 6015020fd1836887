"""bbworker/web/openapi.json: a valid OpenAPI 3.1 document (openapi-spec-validator), served at
/api/openapi.json, listing exactly the routes the server has, and true to real replies:
every request below and its reply from the live server (real bb) are validated against
it with openapi-core (status codes, content types, required headers and fields)."""
import base64
import json
import os
import shutil

import pytest
from openapi_core import OpenAPI
from openapi_core.contrib.werkzeug import WerkzeugOpenAPIRequest, WerkzeugOpenAPIResponse
from openapi_spec_validator import validate
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Response

from support import CIRCUIT, ROOT, fixture_bytes, request

SPEC_PATH = os.path.join(ROOT, "bbworker", "web", "openapi.json")
TOKEN = "openapi-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GZIP = {"Content-Type": "application/gzip"}


def load_spec():
    with open(SPEC_PATH) as f:
        return json.load(f)


def test_document_is_valid_openapi_3_1():
    spec = load_spec()
    assert spec["openapi"].startswith("3.1.")
    validate(spec)


@pytest.fixture(scope="module")
def live(tmp_path_factory, crs_dir, bb):
    """A server with a named circuit and tokens on, so that every route and the 401s exist."""
    from support import Server
    circuits = tmp_path_factory.mktemp("circuits")
    shutil.copy(CIRCUIT, circuits / "demo.json")
    env = {"BB_BINARY": bb, "CIRCUITS_DIR": str(circuits), "API_TOKENS": TOKEN}
    if crs_dir:
        env["BB_CRS_PATH"] = crs_dir
    srv = Server(str(tmp_path_factory.mktemp("openapi-server")), env).wait_ready()
    yield srv
    srv.stop()


def check(api, srv, method, path, body=None, headers=None, malformed=False):
    """Send the request, validate it (unless `malformed` on purpose) and its reply against the document;
    return (status, headers, body)."""
    headers = dict(headers or {})
    status, reply_headers, data = request(srv.port, method, path, body, headers)
    req = WerkzeugOpenAPIRequest(EnvironBuilder(method=method, base_url="http://localhost:8080", path=path,
                                                headers=headers, data=body).get_request())
    if not malformed:
        api.validate_request(req)
    api.validate_response(req, WerkzeugOpenAPIResponse(Response(data, status=status, headers=list(reply_headers.items()))))
    return status, reply_headers, data


def test_served_document_is_the_file(live):
    status, headers, data = request(live.port, "GET", "/api/openapi.json")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(data) == load_spec()


def test_document_lists_exactly_the_server_routes(live):
    spec_routes = {(m.upper(), p) for p, item in load_spec()["paths"].items() for m in item if m != "parameters"}
    status, _, data = request(live.port, "GET", "/api/nowhere")
    served = {p.replace("<circuit>", "{circuit}") for p in json.loads(data)["available_endpoints"]}
    assert {p for _, p in spec_routes} == served, "openapi.json must describe every route the server has"
    for method, path in spec_routes:  # each documented operation exists (not 404, not 405)
        concrete = path.replace("{circuit}", "demo")
        status, _, _ = request(live.port, method, concrete, b"" if method == "POST" else None, AUTH)
        assert status not in (404, 405), (method, path, status)


def test_real_replies_match_the_document(live):
    api = OpenAPI.from_file_path(SPEC_PATH)
    witness = fixture_bytes("valid_1.gz")
    seen = set()

    def call(method, path, body=None, headers=None, malformed=False):
        status, reply_headers, data = check(api, live, method, path, body, headers, malformed)
        seen.add((method, path.replace("/demo", "/{circuit}").replace("/nope", "/{circuit}"), status))
        return status, reply_headers, data

    status, _, data = call("POST", "/api/prove", witness, {**GZIP, **AUTH})
    assert status == 200
    proved = json.loads(data)
    assert call("POST", "/api/prove", witness, {**GZIP, **AUTH, "Accept": "application/octet-stream"})[0] == 200
    assert call("POST", "/api/prove/demo", witness, {**GZIP, **AUTH})[0] == 200
    assert call("POST", "/api/prove", witness, GZIP)[0] == 401
    assert call("POST", "/api/prove", b"not gzip", {**GZIP, **AUTH})[0] == 400
    assert call("POST", "/api/prove", fixture_bytes("unsatisfied.gz"), {**GZIP, **AUTH})[0] == 422
    assert call("POST", "/api/prove/nope", witness, {**GZIP, **AUTH})[0] == 404
    assert call("POST", "/api/prove", b"\x1f\x8b" + b"\0" * 64, {**GZIP, **AUTH, "Content-Length": str(10**9)})[0] == 413
    verify_body = json.dumps({"proof": proved["proof"], "publicInputs": proved["publicInputs"]}).encode()
    json_type = {"Content-Type": "application/json"}
    assert call("POST", "/api/verify", verify_body, {**json_type, **AUTH})[0] == 200
    assert call("POST", "/api/verify/demo", verify_body, {**json_type, **AUTH})[0] == 200
    assert call("POST", "/api/verify", base64.b64decode(proved["proof"]),
                {"Content-Type": "application/octet-stream", "X-Public-Inputs": ",".join(proved["publicInputs"]),
                 **AUTH})[0] == 200
    assert call("POST", "/api/verify", b"{}", {**json_type, **AUTH}, malformed=True)[0] == 400
    assert call("POST", "/api/verify", verify_body, json_type)[0] == 401
    status, headers, _ = call("GET", "/api/vk", headers=AUTH)
    assert status == 200
    assert call("GET", "/api/vk", headers={**AUTH, "If-None-Match": headers["etag"]})[0] == 304
    assert call("GET", "/api/vk/demo", headers=AUTH)[0] == 200
    assert call("GET", "/api/vk")[0] == 401
    assert call("GET", "/api/metrics", headers=AUTH)[0] == 200
    assert call("GET", "/api/metrics")[0] == 401
    assert call("GET", "/api/health")[0] == 200
    assert call("GET", "/api/health/demo")[0] == 200
    assert call("GET", "/api/live")[0] == 200
    assert call("GET", "/api/openapi.json")[0] == 200
    documented = {(m.upper(), p) for p, item in load_spec()["paths"].items() for m in item}
    assert documented <= {(m, p) for m, p, _ in seen}, "every documented operation was exercised"


def test_a_status_with_several_error_titles_names_each():
    import inspect

    from bbworker import errors

    titles = {}
    for _, cls in inspect.getmembers(errors, inspect.isclass):
        if issubclass(cls, errors.Error):
            titles.setdefault(cls.status, set()).add(cls.title)
    with open(SPEC_PATH) as f:
        text = f.read()
    for code, names in titles.items():
        if len(names) > 1:  # a client tells them apart by the title alone
            assert all(name in text for name in names), (code, names)
