"""The HTTP contract on a live gunicorn server with the real bb, real witnesses, bb verify."""
import base64
import gzip
import json
import os
import re
import time

import pytest

from support import VALID, expected, fixture_bytes, request, request_json

ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@pytest.mark.parametrize("name", VALID)
def test_prove_valid_witness_gives_a_proof_bb_verifies(server, verify, name):
    status, headers, body = request_json(server.port, "POST", "/api/prove", fixture_bytes(name),
                                         {"Content-Type": "application/gzip"})
    assert status == 200, body
    assert headers["content-type"] == "application/json"
    assert UUID.match(headers["x-request-id"])
    assert body["success"] is True
    proof = base64.b64decode(body["proof"], validate=True)
    assert len(proof) > 1000
    assert body["publicInputs"] == expected()[name]["public_inputs"]
    assert verify(proof, body["publicInputs"])
    assert server.leftovers() == []


def test_proof_does_not_verify_with_other_public_inputs(server, verify):
    _, _, body = request_json(server.port, "POST", "/api/prove", fixture_bytes("valid_1.gz"),
                              {"Content-Type": "application/octet-stream"})
    proof = base64.b64decode(body["proof"])
    other = expected()["valid_2.gz"]["public_inputs"]
    assert verify(proof, body["publicInputs"])
    assert not verify(proof, other)


def test_unsatisfied_witness_is_422(server):
    status, _, body = request_json(server.port, "POST", "/api/prove", fixture_bytes("unsatisfied.gz"))
    assert status == 422
    assert body == {"error": "Proof generation failed",
                    "message": "bb prove failed: the witness does not satisfy the circuit's constraints"}
    assert server.leftovers() == []


def test_witness_of_another_circuit_is_422_with_readable_reason(server):
    status, _, body = request_json(server.port, "POST", "/api/prove", fixture_bytes("other_circuit.gz"))
    assert status == 422
    assert body["error"] == "Proof generation failed"
    assert body["message"].startswith("bb prove failed: ACIR witness size")
    assert "/" not in body["message"] and "mem:" not in body["message"]
    assert server.leftovers() == []


def test_gzip_of_garbage_is_400_before_bb(server):
    status, _, body = request_json(server.port, "POST", "/api/prove", gzip.compress(b"not a witness" * 10))
    assert status == 400
    assert "format byte 0x6e" in body["message"] and "msgpack-compact" in body["message"]
    assert server.leftovers() == []


@pytest.mark.parametrize("body, words", [
    (b"", "empty body"),
    (b"hello, not gzip", "not a gzipped witness"),
    (fixture_bytes("valid_1.gz")[:100], "truncated"),
    (b"\x1f\x8b\x08\x00" + b"\xff" * 200, "not valid gzip"),
])
def test_bad_bodies_are_400_without_running_bb(server, body, words):
    status, headers, payload = request_json(server.port, "POST", "/api/prove", body)
    assert status == 400
    assert payload["error"] == "Bad request"
    assert words in payload["message"]
    assert UUID.match(headers["x-request-id"])
    assert server.leftovers() == []


def test_unknown_path_is_404_listing_endpoints(server):
    status, _, body = request_json(server.port, "GET", "/nope")
    assert status == 404
    assert body["error"] == "Not found"
    assert body["available_endpoints"] == ["/api/health", "/api/live", "/api/metrics", "/api/openapi.json",
                                           "/api/prove", "/api/verify", "/api/vk"]


@pytest.mark.parametrize("method, path, allow", [
    ("GET", "/api/prove", "POST"), ("PUT", "/api/prove", "POST"), ("POST", "/api/health", "GET, HEAD")])
def test_wrong_method_is_405_with_allow(server, method, path, allow):
    status, headers, body = request_json(server.port, method, path, b"" if method != "GET" else None)
    assert status == 405
    assert headers["allow"] == allow
    assert body["error"] == "Method not allowed"


def test_health_reports_bb(server, bb):
    started = time.monotonic()
    status, headers, body = request_json(server.port, "GET", "/api/health")
    assert time.monotonic() - started < 5
    assert status == 200
    assert set(body) == {"status", "architecture", "bb", "verifier_target", "timestamp"}
    assert body["verifier_target"] is None  # bb's default (VERIFIER_TARGET unset)
    assert body["status"] == "ok"
    assert body["architecture"] == os.uname().machine
    assert body["bb"]["available"] is True
    assert body["bb"]["version"].startswith("5.0.0")
    assert body["bb"]["binary_arch"].startswith(f"{bb}: ELF 64-bit LSB executable, ")
    assert ISO_Z.match(body["timestamp"])
    assert UUID.match(headers["x-request-id"])


def test_health_head_has_no_body(server):
    status, headers, body = request(server.port, "HEAD", "/api/health")
    assert status == 200 and body == b""
    assert int(headers["content-length"]) > 0


def test_access_log_line_per_request(server):
    status, headers, _ = request(server.port, "POST", "/api/prove", fixture_bytes("valid_2.gz"))
    rid = headers["x-request-id"]
    size = len(fixture_bytes("valid_2.gz"))
    for _ in range(50):
        lines = [line for line in server.output().splitlines() if rid in line and "bb_worker.access" in line]
        if lines:
            break
        time.sleep(0.1)
    assert len(lines) == 1
    assert re.search(rf'{rid} POST /api/prove 200 in={size} out=\d+ ms=\d+\.\d bb=0 outcome=success fault=- '
                     rf'client=127.0.0.1 ua=""$', lines[0]), lines[0]


def test_chunked_upload_is_proved(server, verify):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    data = fixture_bytes("valid_3.gz")
    conn.request("POST", "/api/prove", body=iter([data[:50], data[50:]]),
                 headers={"Content-Type": "application/gzip"}, encode_chunked=True)
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 200, body
    assert verify(base64.b64decode(body["proof"]), body["publicInputs"])


def test_bogus_bb_binary_gives_503_health_and_503_prove(start_server, tmp_path):
    srv = start_server(BB_BINARY=str(tmp_path / "no-such-bb"))
    status, _, body = request_json(srv.port, "GET", "/api/health")
    assert status == 503
    assert body["status"] == "unavailable"
    assert body["bb"]["available"] is False and body["bb"]["version"] is None
    assert "no-such-bb" in body["bb"]["binary_arch"]
    assert body["reasons"][0].startswith("bb is not usable: ") and "no-such-bb" in body["reasons"][0]
    status, headers, body = request_json(srv.port, "POST", "/api/prove", fixture_bytes("valid_1.gz"))
    assert status == 503 and "retry-after" in headers  # not ready: bb never runs
    assert body["error"] == "Service unavailable"
    assert body["message"].startswith("bb is not usable")
    assert srv.leftovers() == []


def test_prove_timeout_is_504_and_kills_bb(start_server, fake_bb, tmp_path):
    from support import bb_processes
    srv = start_server(BB_BINARY=fake_bb, FAKE_BB_MODE="sleep", PROVE_TIMEOUT_SECONDS="1")
    started = time.monotonic()
    status, _, body = request_json(srv.port, "POST", "/api/prove", fixture_bytes("valid_1.gz"))
    assert status == 504
    assert body["error"] == "Proof generation timed out"
    assert time.monotonic() - started < 10
    assert bb_processes(fake_bb) == []
    assert srv.leftovers() == []


def test_bb_killed_by_a_signal_on_one_witness_is_422_and_the_server_stays_ready(start_server, fake_bb):
    """bb crashing on a witness while it proves the server's own: the witness's fault (422), and readiness
    stays 200. (Crashing on every witness is ours: tests/live/test_faults.py.)"""
    srv = start_server(BB_BINARY=fake_bb, FAKE_BB_MODE="segv", FAKE_BB_SPARE_OWN_WITNESS="1")
    status, _, body = request_json(srv.port, "POST", "/api/prove", fixture_bytes("valid_1.gz"))
    assert status == 422
    assert "SIGSEGV" in body["message"] and body["message"].startswith("bb prove failed on this witness")
    status, _, body = request_json(srv.port, "GET", "/api/health")
    assert status == 200


def test_control_characters_in_the_path_cannot_forge_log_lines(server):
    status, headers, _ = request(server.port, "GET", "/x%0aFORGED%1b[31m")
    assert status == 404
    rid = headers["x-request-id"]
    for _ in range(50):
        line = [x for x in server.output().splitlines() if rid in x]
        if line:
            break
        time.sleep(0.1)
    assert "/x\\nFORGED\\u001b[31m 404" in line[0]
    assert not any(x.startswith("FORGED") for x in server.output().splitlines())
