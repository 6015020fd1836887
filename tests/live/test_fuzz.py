"""Property-based input fuzzing of /api/prove, on the WSGI app and on the live server (real bb).

Whatever the body and headers: never a 5xx except the documented ones, never a
traceback in the body, always the JSON error shape, nothing left in the temp dir.
"""
import base64
import gzip
import io
import json
import os
import socket
import wsgiref.util
import wsgiref.validate

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bbworker.settings import Settings
from bbworker.web.app import create_app
from support import CIRCUIT, VALID, fixture_bytes

ALLOWED = {200, 400, 408, 413, 422}
LIMIT = 64 * 1024
WITNESSES = [fixture_bytes(name) for name in VALID + ["unsatisfied.gz", "other_circuit.gz"]]

content_types = st.sampled_from(["application/gzip", "application/octet-stream", "text/plain",
                                 "application/json", "multipart/form-data; boundary=x", "", "\u00e9/\u00e9"])
bodies = st.one_of(
    st.binary(max_size=3000),
    st.binary(max_size=3000).map(gzip.compress),
    st.tuples(st.sampled_from(WITNESSES), st.integers(0, 500)).map(lambda t: t[0][:t[1]]),
    st.tuples(st.sampled_from(WITNESSES), st.integers(0, 400), st.binary(min_size=1, max_size=8)).map(
        lambda t: t[0][:t[1]] + t[2] + t[0][t[1] + len(t[2]):]),  # bytes flipped inside a witness
    st.sampled_from(WITNESSES),
    st.just(None),  # stands for a body one byte over the limit (kept out of reprs)
)
OVERSIZE = b"\x1f\x8b" + b"\0" * (LIMIT - 1)
# How Content-Length relates to the body: right, absent (read to EOF), or a lie.
lengths = st.sampled_from(["exact", "absent", "huge", "short", "long"])


def check_answer(status, headers, body):
    assert status in ALLOWED, (status, body[:300])
    assert b"Traceback" not in body
    assert dict(headers)["Content-Type"] == "application/json"
    payload = json.loads(body)
    if status == 200:
        assert payload["success"] is True
    else:
        assert set(payload) == {"error", "message"}
        assert all(isinstance(v, str) and v for v in payload.values())


@pytest.fixture(scope="module")
def worker(bb, crs_dir, tmp_path_factory):
    """The real App with the real bb, small limits, its own temp area."""
    base = tmp_path_factory.mktemp("wsgi")
    config = Settings.from_environ({
        "BB_BINARY": bb, "BB_CRS_PATH": crs_dir or "", "CIRCUIT_PATH": CIRCUIT, "TMPDIR": str(base),
        "PROVE_TIMEOUT_SECONDS": "60", "MAX_BODY_BYTES": str(LIMIT), "MAX_WITNESS_BYTES": str(1024 * 1024),
        "UPLOAD_TIMEOUT_SECONDS": "5", "QUEUE_TIMEOUT_SECONDS": "10", "PROOF_CORES": "1"})
    os.makedirs(base / "work")
    app = create_app(config, work_dir=str(base / "work"))
    app.service.circuits["default"].vk.ensure()  # ready from the first request (a server answers 503 "starting")
    return app


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, content_type=content_types, length=lengths)
def test_wsgi_prove_answers_documented_statuses(worker, body, content_type, length):
    body = OVERSIZE if body is None else body
    environ = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ.update({"REQUEST_METHOD": "POST", "PATH_INFO": "/api/prove", "QUERY_STRING": "",
                    "wsgi.input": io.BytesIO(body)})
    if content_type:
        environ["CONTENT_TYPE"] = content_type
    environ["CONTENT_LENGTH"] = {"exact": str(len(body)), "absent": "", "huge": str(10**12),
                                 "short": str(len(body) // 2), "long": str(len(body) + 10)}[length]
    environ["wsgi.input_terminated"] = length == "absent"
    captured = {}

    def start_response(status, headers, exc_info=None):
        captured["status"], captured["headers"] = int(status.split()[0]), headers
        return lambda data: None

    result = wsgiref.validate.validator(worker)(environ, start_response)
    try:
        body_out = b"".join(result)
    finally:
        result.close()
    check_answer(captured["status"], captured["headers"], body_out)
    assert os.listdir(worker.service.work_dir.path) == []


def raw_request(port, head_lines, body, chunked):
    """Send one request over a socket and parse the answer: (status, headers list, body)."""
    if chunked:
        pieces = [body[i:i + 700] for i in range(0, len(body), 700)]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    else:
        payload = body
    head = "\r\n".join(["POST /api/prove HTTP/1.1", "Host: fuzz"] + head_lines + ["Connection: close", "", ""])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        try:
            s.sendall(head.encode("latin-1") + payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # an early 413 may close first; the answer is still readable
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    while data.startswith(b"HTTP/1.1 100 "):  # interim answer to Expect: 100-continue
        data = data.partition(b"\r\n\r\n")[2]
    head_part, _, body_part = data.partition(b"\r\n\r\n")
    lines = head_part.decode("latin-1").split("\r\n")
    headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:] if ":" in line]
    return int(lines[0].split()[1]), headers, body_part


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, crs_dir, bb):
    from support import Server
    env = {"BB_BINARY": bb, "MAX_BODY_BYTES": str(LIMIT), "UPLOAD_TIMEOUT_SECONDS": "2"}
    if crs_dir:
        env["BB_CRS_PATH"] = crs_dir
    srv = Server(str(tmp_path_factory.mktemp("fuzzsrv")), env).wait_ready()
    yield srv
    srv.stop()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, content_type=content_types, chunked=st.booleans(),
       huge_length=st.booleans(), extra=st.dictionaries(
           st.sampled_from(["Accept", "X-Request-Id", "Content-Encoding", "Expect", "User-Agent"]),
           st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40), max_size=3))
def test_live_prove_answers_documented_statuses(fuzz_server, body, content_type, chunked, huge_length, extra):
    body = OVERSIZE if body is None else body
    if "Expect" in extra:
        extra["Expect"] = "100-continue"  # the only expectation HTTP/1.1 defines
    lines = [f"{k}: {v}" for k, v in extra.items()]
    if content_type.isascii() and content_type:
        lines.append(f"Content-Type: {content_type}")
    if huge_length:
        lines.append("Content-Length: 99999999999")
        body, chunked = b"", False
    elif chunked:
        lines.append("Transfer-Encoding: chunked")
    else:
        lines.append(f"Content-Length: {len(body)}")
    status, headers, data = raw_request(fuzz_server.port, lines, body, chunked)
    check_answer(status, headers, data)
    assert fuzz_server.leftovers() == []


# ---------------------------------------------------------------- well-formed witness stacks (issue 10)

VALID_MAP = msgpack.unpackb(gzip.decompress(fixture_bytes("valid_1.gz"))[1:], strict_map_key=False)[0][0][1]
field_values = st.one_of(st.binary(min_size=32, max_size=32),
                         st.integers(0, 2 ** 256 - 1).map(lambda v: v.to_bytes(32, "big")),
                         st.sampled_from(sorted(set(VALID_MAP.values()))))
indices = st.one_of(st.integers(0, 797), st.integers(798, 2 ** 32 - 1), st.sampled_from([797, 798, 2 ** 28]))


@st.composite
def witness_stacks(draw):
    """A gzipped msgpack-compact witness stack: the valid one edited, or one made up, random indices and values."""
    if draw(st.booleans()):
        witness_map = dict(VALID_MAP)
        for index in draw(st.lists(st.sampled_from(sorted(VALID_MAP)), max_size=3)):
            witness_map.pop(index, None)
        witness_map.update(draw(st.dictionaries(indices, field_values, max_size=3)))
    else:
        witness_map = draw(st.dictionaries(indices, field_values, min_size=1, max_size=40))
    function_index = draw(st.sampled_from([0, 0, 1, 2 ** 31]))
    return gzip.compress(b"\x03" + msgpack.packb([[[function_index, witness_map]]]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=witness_stacks())
def test_live_witness_stacks_never_get_a_proof_bb_rejects(fuzz_server, verify, body):
    """Well-formed stacks, random indices and values: documented statuses only, and every 200 verifies."""
    status, headers, data = raw_request(fuzz_server.port, [f"Content-Length: {len(body)}"], body, False)
    check_answer(status, headers, data)
    if status == 200:
        payload = json.loads(data)
        assert verify(base64.b64decode(payload["proof"]), payload["publicInputs"])
    assert fuzz_server.leftovers() == []
