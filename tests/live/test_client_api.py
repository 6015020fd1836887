"""What operators and browser clients get, on a live server with the real bb: bearer-token
auth, CORS over HTTP (the real browser is in test_browser.py), POST /api/verify, request
ids and client addresses in the access log, keep-alive."""
import base64
import fcntl
import glob
import gzip
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest

from support import (CIRCUIT, FAKE_BB, ROOT, expected, fixture_bytes, request, request_json, valid_map, wait_for,
                     witness_stack)

VALID_MAP = valid_map()
from bbworker.bbrunner import acir

TOKENS = ("tok-alpha-1f3b", "tok-beta-77c2")
WITNESS = fixture_bytes("valid_1.gz")
GZIP = {"Content-Type": "application/gzip"}
ORIGIN = "http://app.example:3000"
P64 = base64.b64encode(b"\0" * 64).decode()  # a proof-shaped body (whole field elements) for input checks


def public_paths():
    """Paths whose operations openapi.json marks as open (`security: [{}]`), e.g. /api/health."""
    with open(os.path.join(ROOT, "bbworker", "web", "openapi.json")) as f:
        paths = json.load(f)["paths"]
    found = [p for p, item in paths.items() for op in item.values()
             if op.get("security") == [{}] and "{" not in p]  # a server without CIRCUITS_DIR has no /{circuit}
    assert "/api/health" in found and "/api/live" in found
    return found


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def proved(server):
    """(proof bytes, public inputs) of valid_1.gz from the live server."""
    status, _, body = request_json(server.port, "POST", "/api/prove", WITNESS, GZIP)
    assert status == 200, body
    return base64.b64decode(body["proof"]), body["publicInputs"]


def verify_json(port, proof, public_inputs, headers=None, path="/api/verify"):
    body = json.dumps({"proof": base64.b64encode(proof).decode(), "publicInputs": public_inputs}).encode()
    return request_json(port, "POST", path, body, {"Content-Type": "application/json", **(headers or {})})


# ---------------------------------------------------------------- bearer tokens

PROTECTED = [("POST", "/api/prove", WITNESS), ("POST", "/api/verify", b"{}"), ("GET", "/api/vk", None),
             ("GET", "/api/metrics", None)]


def test_tokens_guard_prove_verify_vk_and_metrics(start_server, proved):
    srv = start_server(API_TOKENS=",".join(TOKENS))
    for method, path, body in PROTECTED:
        status, headers, payload = request_json(srv.port, method, path, body)
        assert status == 401, (path, payload)
        assert headers["www-authenticate"].startswith("Bearer") and "error=" not in headers["www-authenticate"]
        assert payload["error"] == "Unauthorized"
        for wrong in ({"Authorization": "Bearer tok-alpha"}, {"Authorization": f"Basic {TOKENS[0]}"}):
            status, headers, _ = request_json(srv.port, method, path, body, wrong)
            assert status == 401 and 'error="invalid_token"' in headers["www-authenticate"], path
    status, _, body = request_json(srv.port, "POST", "/api/prove", WITNESS, {**GZIP, **bearer(TOKENS[1])})
    assert status == 200 and body["publicInputs"] == expected()["valid_1.gz"]["public_inputs"]
    status, _, body = verify_json(srv.port, *proved, bearer(TOKENS[0]))
    assert (status, body) == (200, {"valid": True})
    assert request(srv.port, "GET", "/api/vk", headers=bearer(TOKENS[0]))[0] == 200
    assert request(srv.port, "GET", "/api/metrics", headers=bearer(TOKENS[1]))[0] == 200
    for path in public_paths():  # health, liveness and the docs: load balancers have no token
        assert request(srv.port, "GET", path)[0] == 200, path
    log = srv.output()
    assert "401" in log and not any(token in log for token in TOKENS), "tokens must never be logged"


def test_token_file_is_reread_without_a_restart(start_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# bb-worker clients\nfirst-token\n")
    srv = start_server(API_TOKENS_FILE=str(tokens))
    assert request(srv.port, "GET", "/api/vk", headers=bearer("first-token"))[0] == 200
    assert request(srv.port, "GET", "/api/vk", headers=bearer("second-token"))[0] == 401
    tokens.write_text("second-token\n")
    os.utime(tokens, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert request(srv.port, "GET", "/api/vk", headers=bearer("second-token"))[0] == 200
    assert request(srv.port, "GET", "/api/vk", headers=bearer("first-token"))[0] == 401
    tokens.write_text("# nothing\n")  # no token (half-written, emptied): the last good set stays, logged
    os.utime(tokens, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert request(srv.port, "GET", "/api/vk", headers=bearer("second-token"))[0] == 200
    assert request(srv.port, "GET", "/api/vk", headers=bearer("first-token"))[0] == 401
    assert "holds no token: keeping the 1 tokens read before" in srv.output()
    assert request(srv.port, "GET", "/api/health")[0] == 200
    assert "second-token" not in srv.output()


@pytest.mark.parametrize("env, words", [
    ({"API_TOKENS_FILE": "/nonexistent/tokens"}, "API_TOKENS_FILE"),
    ({"API_TOKENS": ","}, "API_TOKENS=',' holds no token"),
    ({"API_TOKENS": " , ,"}, "API_TOKENS=', ,' holds no token"),
    ({"API_TOKENS_FILE": "{empty_tokens}"}, "holds no token"),
    ({"CORS_ALLOW_ORIGINS": "https://app.example/path"}, "CORS_ALLOW_ORIGINS"),
    ({"KEEPALIVE_SECONDS": "0"}, "KEEPALIVE_SECONDS"),
    ({"VERIFY_CONCURRENCY": "0"}, "VERIFY_CONCURRENCY"),
])
def test_bad_settings_stop_the_server(start_server, tmp_path, env, words):
    empty = tmp_path / "no-tokens"
    empty.write_text("# no token yet\n\n")
    srv = start_server(ready=False, **{k: v.format(empty_tokens=empty) for k, v in env.items()})
    assert srv.proc.wait(timeout=60) != 0
    assert words in srv.output()


# ---------------------------------------------------------------- CORS over HTTP

def test_cors_preflight_and_replies(start_server):
    srv = start_server(CORS_ALLOW_ORIGINS=f"https://other.example {ORIGIN}", API_TOKENS=TOKENS[0])
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    status, headers, body = request(srv.port, "OPTIONS", "/api/prove", headers=preflight)  # no token needed
    assert status == 204 and body == b""
    assert headers["access-control-allow-origin"] == ORIGIN and "Origin" in headers["vary"]
    assert "POST" in headers["access-control-allow-methods"]
    allowed = {h.strip().lower() for h in headers["access-control-allow-headers"].split(",")}
    assert {"content-type", "authorization", "accept"} <= allowed
    assert int(headers["access-control-max-age"]) >= 600
    status, headers, _ = request(srv.port, "OPTIONS", "/api/prove", headers=dict(preflight, Origin="https://evil.example"))
    assert "access-control-allow-origin" not in headers
    status, _, _ = request(srv.port, "OPTIONS", "/api/nowhere", headers=preflight)
    assert status == 404
    for path, body, extra in (("/api/prove", WITNESS, bearer(TOKENS[0])), ("/api/prove", b"not gzip", bearer(TOKENS[0])),
                              ("/api/prove", WITNESS, {})):
        status, headers, _ = request(srv.port, "POST", path, body, {**GZIP, "Origin": ORIGIN, **extra})
        assert headers["access-control-allow-origin"] == ORIGIN, status  # errors too: the page can read them
        exposed = {h.strip() for h in headers["access-control-expose-headers"].split(",")}
        assert {"X-Public-Inputs", "X-Request-Id", "Retry-After", "ETag"} <= exposed


def test_without_cors_nothing_changes(server):
    status, headers, _ = request(server.port, "OPTIONS", "/api/prove",
                                 headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert status == 405 and "POST" in headers["allow"]
    _, headers, _ = request(server.port, "GET", "/api/health", headers={"Origin": ORIGIN})
    assert not any(name.startswith("access-control-") for name in headers)


# ---------------------------------------------------------------- POST /api/verify

def test_verify_answers_valid_for_a_real_proof(server, proved):
    proof, public_inputs = proved
    status, headers, body = verify_json(server.port, proof, public_inputs)
    assert (status, body) == (200, {"valid": True}) and headers["content-type"] == "application/json"
    status, _, body = request_json(server.port, "POST", "/api/verify", proof,
                                   {"Content-Type": "application/octet-stream",
                                    "X-Public-Inputs": ",".join(public_inputs)})
    assert (status, body) == (200, {"valid": True})
    assert server.leftovers() == []


def test_verify_answers_invalid_for_tampered_proofs(server, proved):
    proof, public_inputs = proved
    flipped = bytearray(proof)
    flipped[200] ^= 1
    other = expected()["valid_2.gz"]["public_inputs"]
    for candidate, inputs in ((bytes(flipped), public_inputs), (proof, other)):
        status, _, body = verify_json(server.port, candidate, inputs)
        assert (status, body) == (200, {"valid": False}), (len(candidate), inputs)
    # Not the shape of this circuit's proofs: malformed input, 400 before bb.
    for candidate, inputs, message in (
            (proof[:-32], public_inputs, f"proof is {len(proof) - 32} bytes; this circuit's proofs are {len(proof)}"),
            (proof + proof, public_inputs, f"proof is {2 * len(proof)} bytes; this circuit's proofs are {len(proof)}"),
            (proof, public_inputs * 2, "publicInputs has 2 values; this circuit's proofs have 1"),
            (proof, [], "publicInputs has 0 values; this circuit's proofs have 1")):
        status, _, body = verify_json(server.port, candidate, inputs)
        assert (status, body) == (400, {"error": "Bad request", "message": message})
    # Damaged fields, every 19th: out of range, points off the curve, or just wrong (bb words each its own way).
    for field in range(0, len(proof) // 32, 19):
        for byte, mask in ((0, 0x80), (0, 0x20), (31, 0x01)):
            damaged = bytearray(proof)
            damaged[field * 32 + byte] ^= mask
            status, _, body = verify_json(server.port, bytes(damaged), public_inputs)
            assert (status, body) == (200, {"valid": False}), (field, byte, mask, body)
    assert server.leftovers() == []


def test_verifications_are_counted(server, proved):
    def count(outcome):
        _, _, text = request(server.port, "GET", "/api/metrics")
        m = re.search(rf'^bb_worker_verifications_total{{circuit="default",outcome="{outcome}"}} (\S+)$',
                      text.decode(), re.M)
        return float(m.group(1)) if m else 0.0
    before = count("valid"), count("invalid")
    verify_json(server.port, *proved)
    verify_json(server.port, proved[0], expected()["valid_2.gz"]["public_inputs"])
    assert (count("valid"), count("invalid")) == (before[0] + 1, before[1] + 1)


def outcome_counts(port, family):
    """{(circuit, outcome): count} of a bb_worker_*_total family on /api/metrics."""
    text = request(port, "GET", "/api/metrics")[2].decode()
    return {m.groups()[:2]: float(m.group(3)) for m in
            re.finditer(rf'^bb_worker_{family}_total{{circuit="(\w+)",outcome="(\w+)"}} (\S+)$', text, re.M)}


@pytest.mark.parametrize("path, body, sent, code, outcome, fault", [
    ("/api/prove", gzip.compress(witness_stack({**VALID_MAP, 2 ** 28: bytes(32)})), GZIP, 422, "rejected", "client"),
    ("/api/prove", gzip.compress(witness_stack({**VALID_MAP, 0: acir.MODULUS_BYTES})), GZIP, 422, "rejected", "client"),
    ("/api/prove", b"not gzip", GZIP, 400, "bad_request", "client"),
    ("/api/prove", gzip.compress(b"\x03" + bytes(1 << 20)), GZIP, 413, "too_large", "client"),
    ("/api/prove", WITNESS, GZIP, 200, "success", "-"),
    ("/api/prove", fixture_bytes("unsatisfied.gz"), GZIP, 422, "rejected", "client"),
    ("/api/verify", b"not json", {"Content-Type": "application/json"}, 400, "bad_request", "client"),
    ("/api/verify", b"{}", {"Content-Type": "application/json", "Content-Length": str(1 << 30)}, 413,
     "too_large", "client"),
], ids=["index-2^28", "modulus", "not-gzip", "too-large", "valid", "unsatisfied", "verify-not-json",
        "verify-too-large"])
def test_every_prove_and_verify_request_has_one_outcome(server, path, body, sent, code, outcome, fault):
    """Rejected before bb or by bb, each request is one access line with its outcome and fault,
    and one count of that outcome in the metrics (prove: proofs_total, verify: verifications_total)."""
    family = "proofs" if path == "/api/prove" else "verifications"
    before = outcome_counts(server.port, family)
    status, headers, reply = request(server.port, "POST", path, body, {**sent, "X-Request-Id": uuid.uuid4().hex})
    assert status == code, reply
    assert wait_for(lambda: access_lines(server, headers["x-request-id"]))
    line = access_lines(server, headers["x-request-id"])
    assert len(line) == 1 and re.search(rf" {code} .* outcome={outcome} fault={fault} client=", line[0]), line
    after = outcome_counts(server.port, family)
    changed = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}
    assert changed == {("default", outcome): 1.0}


def test_the_verify_in_prove_keeps_verify_timeout_seconds(start_server, tmp_path):
    """bb verify of a fresh proof hangs: the proof request ends at VERIFY_TIMEOUT_SECONDS, not
    PROVE_TIMEOUT_SECONDS, with nothing left behind."""
    fake = tmp_path / "bb"
    shutil.copy(FAKE_BB, fake)
    srv = start_server(BB_BINARY=str(fake), FAKE_BB_VERIFY_MODE="sleep", VERIFY_TIMEOUT_SECONDS="2",
                       PROVE_TIMEOUT_SECONDS="600")
    status, _, body = request_json(srv.port, "POST", "/api/prove", WITNESS, GZIP)
    assert (status, body["error"]) == (504, "Proof generation timed out"), body
    assert body["message"] == "bb verify did not finish within 2 s"
    assert srv.leftovers() == []


@pytest.mark.parametrize("body, headers, words", [
    (b"not json", {"Content-Type": "application/json"}, "JSON"),
    (b"[]", {"Content-Type": "application/json"}, "object"),
    (b'{"proof": "AAAA"}', {"Content-Type": "application/json"}, "publicInputs"),
    (b'{"publicInputs": []}', {"Content-Type": "application/json"}, "proof"),
    (b'{"proof": "!!!", "publicInputs": []}', {"Content-Type": "application/json"}, "base64"),
    (b'{"proof": "", "publicInputs": []}', {"Content-Type": "application/json"}, "empty"),
    (b'{"proof": "AAAA", "publicInputs": []}', {"Content-Type": "application/json"}, "multiple of 32"),
    (json.dumps({"proof": P64, "publicInputs": ["12"]}).encode(), {"Content-Type": "application/json"}, "0x"),
    (json.dumps({"proof": P64, "publicInputs": ["0x" + "f" * 64]}).encode(), {"Content-Type": "application/json"},
     "field"),
    (json.dumps({"proof": P64, "publicInputs": ["0x" + "1" * 66]}).encode(), {"Content-Type": "application/json"},
     "32 bytes"),
    (json.dumps({"proof": P64, "publicInputs": [7]}).encode(), {"Content-Type": "application/json"}, "string"),
    (json.dumps({"proof": P64, "publicInputs": [], "vk": "x"}).encode(), {"Content-Type": "application/json"},
     "vk"),
    (b"\0" * 64, {"Content-Type": "application/octet-stream"}, "X-Public-Inputs"),
    (b"\0" * 64, {"Content-Type": "application/octet-stream", "X-Public-Inputs": "0x1,zz"}, "0x"),
    (b"", {"Content-Type": "application/octet-stream", "X-Public-Inputs": ""}, "empty"),
    (b"[" * 5000 + b"]" * 5000, {"Content-Type": "application/json"}, "nested too deep"),  # was a 500, ours
    (b'{"a":' * 3000 + b"1" + b"}" * 3000, {"Content-Type": "application/json"}, "nested too deep"),
])
def test_bad_verify_input_is_400(server, body, headers, words):
    status, _, payload = request_json(server.port, "POST", "/api/verify", body, headers)
    assert status == 400, payload
    assert payload["error"] == "Bad request" and words in payload["message"], payload
    assert server.leftovers() == []


def test_verify_limits_its_body(server):
    status, _, payload = request_json(server.port, "POST", "/api/verify", b"\0" * (2 * 1024 * 1024),
                                      {"Content-Type": "application/octet-stream", "X-Public-Inputs": ""})
    assert status == 413, payload


def test_verify_routes_and_methods(start_server, tmp_path, proved):
    circuits = tmp_path / "circuits"
    circuits.mkdir()
    shutil.copy(CIRCUIT, circuits / "demo.json")
    srv = start_server(CIRCUITS_DIR=str(circuits))
    status, _, body = verify_json(srv.port, *proved, path="/api/verify/demo")
    assert (status, body) == (200, {"valid": True})
    status, _, body = verify_json(srv.port, *proved, path="/api/verify/nope")
    assert status == 404 and body["available_circuits"] == ["demo"]
    status, headers, _ = request(srv.port, "GET", "/api/verify")
    assert status == 405 and headers["allow"] == "POST"


def test_verify_never_waits_for_a_proof_slot(server, proved):
    """With every proof slot held (here by the test itself), proofs queue but verifications answer."""
    holds = []
    for path in sorted(glob.glob(os.path.join(server.tmpdir, "bb-worker-slots", "slot-*.lock"))):
        fd = os.open(path, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        holds.append(fd)
    assert holds, "no proof slot lock files: did the server prove anything yet?"
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        conn.request("POST", "/api/prove", WITNESS, GZIP)  # queued behind the held slot
        started = time.monotonic()
        status, _, body = verify_json(server.port, *proved)
        assert (status, body) == (200, {"valid": True})
        assert time.monotonic() - started < 10
    finally:
        for fd in holds:
            os.close(fd)  # the queued proof goes on
    assert conn.getresponse().status == 200
    conn.close()


def test_verify_has_its_own_limit_and_deadline(start_server, tmp_path):
    """A fake bb whose verify hangs: VERIFY_CONCURRENCY runs at once, each cut at VERIFY_TIMEOUT_SECONDS."""
    fake = tmp_path / "bb"
    shutil.copy(FAKE_BB, fake)
    pidfile = tmp_path / "pids"
    srv = start_server(BB_BINARY=str(fake), FAKE_BB_VERIFY_MODE="sleep", FAKE_BB_PIDFILE=str(pidfile),
                       VERIFY_CONCURRENCY="1", VERIFY_TIMEOUT_SECONDS="5")
    raw = {"Content-Type": "application/octet-stream", "X-Public-Inputs": "0x07"}
    proof = b"\0" * 14656  # the fake bb's VK: the default target's proof length, one public input
    first = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    first.request("POST", "/api/verify", proof, raw)
    for _ in range(100):  # until its bb verify runs (it holds the only place)
        if pidfile.exists() and pidfile.read_text().strip():
            break
        time.sleep(0.05)
    status, headers, body = request_json(srv.port, "POST", "/api/verify", proof, raw)  # not the first's 5 s
    assert status == 503 and int(headers["retry-after"]) >= 1, body
    reply = first.getresponse()
    assert reply.status == 504
    assert json.loads(reply.read()) == {"error": "Proof verification timed out",
                                        "message": "bb verify did not finish within 5 s"}
    first.close()
    assert re.search(r" POST /api/verify 503 .* outcome=busy fault=- ", srv.output())
    assert wait_for(lambda: re.search(r" POST /api/verify 504 .* outcome=timeout fault=- ", srv.output()))
    assert srv.leftovers() == []


# ---------------------------------------------------------------- request ids and the access log

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def access_lines(srv, request_id):
    return [line for line in srv.output().splitlines() if "bb_worker.access" in line and request_id in line]


def test_inbound_request_ids_are_echoed_and_logged(server):
    status, headers, _ = request(server.port, "GET", "/api/health", headers={"X-Request-Id": "client-req-42"})
    assert headers["x-request-id"] == "client-req-42"
    assert len(access_lines(server, "client-req-42")) == 1
    _, headers, _ = request(server.port, "GET", "/api/health",
                            headers={"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"})
    assert headers["x-request-id"] == TRACE and access_lines(server, TRACE)
    for unsafe in ("a b", "x" * 129, "a;b", '"quoted"'):
        _, headers, _ = request(server.port, "GET", "/api/health", headers={"X-Request-Id": unsafe})
        assert headers["x-request-id"] not in (unsafe, "") and len(headers["x-request-id"]) == 36


def test_request_ids_never_name_files(server, tmp_path):
    """A client's id with path characters proves normally and writes nothing outside the work dir."""
    outside = os.path.join(server.tmpdir, "escaped")
    status, headers, _ = request(server.port, "POST", "/api/prove", WITNESS,
                                 {**GZIP, "X-Request-Id": "../escaped"})
    assert status == 200 and headers["x-request-id"] == "../escaped"
    assert not glob.glob(outside + "*") and server.leftovers() == []


def test_access_log_has_client_address_and_user_agent(start_server):
    srv = start_server(FORWARDED_ALLOW_IPS="127.0.0.1")
    request(srv.port, "GET", "/api/health", headers={"X-Request-Id": "ua-1", "User-Agent": "game-client/2.1 (test)"})
    [line] = access_lines(srv, "ua-1")
    assert "client=127.0.0.1" in line and 'ua="game-client/2.1 (test)"' in line
    request(srv.port, "GET", "/api/health", headers={"X-Request-Id": "xff-1",
                                                     "X-Forwarded-For": "6.6.6.6, 198.51.100.7"})
    [line] = access_lines(srv, "xff-1")
    assert "client=198.51.100.7" in line  # the trusted proxy's view, not the client's claim
    request(srv.port, "GET", "/api/health", headers={"X-Request-Id": "ua-2", "User-Agent": 'a" client=1.2.3.4\tb'})
    [line] = access_lines(srv, "ua-2")
    assert 'ua="a\\" client=1.2.3.4\\tb"' in line  # quotes and controls escaped: no forged fields
    untrusted = start_server(FORWARDED_ALLOW_IPS="10.9.9.9")
    request(untrusted.port, "GET", "/api/health", headers={"X-Request-Id": "xff-2", "X-Forwarded-For": "198.51.100.7"})
    [line] = access_lines(untrusted, "xff-2")
    assert "client=127.0.0.1" in line


def test_json_access_log_has_the_same_fields(start_server):
    srv = start_server(LOG_FORMAT="json")
    request(srv.port, "GET", "/api/health", headers={"X-Request-Id": "json-1", "User-Agent": "ua/1"})
    [record] = [json.loads(line) for line in srv.output().splitlines() if '"json-1"' in line]
    assert record["request_id"] == "json-1" and record["client"] == "127.0.0.1" and record["user_agent"] == "ua/1"


# ---------------------------------------------------------------- keep-alive

def idle_then_request(port, idle):
    """Send a request, stay idle `idle` seconds, send another on the same connection: its status, or None if closed."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        request_bytes = b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n"
        sock.sendall(request_bytes)
        conn = http.client.HTTPResponse(sock)
        conn.begin()
        conn.read()
        time.sleep(idle)
        try:
            sock.sendall(request_bytes)
            second = http.client.HTTPResponse(sock)
            second.begin()
            return second.status
        except (OSError, http.client.HTTPException):
            return None
    finally:
        sock.close()


def test_keepalive_outlasts_load_balancer_idle_timeouts(server, start_server):
    script = "import runpy; print(runpy.run_path('gunicorn.conf.py')['keepalive'])"
    env = {k: v for k, v in os.environ.items() if k != "KEEPALIVE_SECONDS"}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert int(out) > 60, "above the 60 s idle timeout of AWS ALB, GCP and nginx upstreams"
    assert idle_then_request(server.port, 3) == 200  # default: the connection outlives a short idle spell
    short = start_server(KEEPALIVE_SECONDS="1")
    assert idle_then_request(short.port, 3) is None  # the setting is what gunicorn uses
