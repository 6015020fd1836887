"""Binary replies, verifier targets, /api/vk, metrics, JSON logs and several circuits (real bb)."""
import base64
import json
import re
import os
import shutil
import subprocess
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bbworker.web.prove import accept_quality, wants_binary
from support import CIRCUIT, FIXTURES, crs_args, expected, fixture_bytes, request, request_json

WITNESS = fixture_bytes("valid_1.gz")
PUBLIC = expected()["valid_1.gz"]["public_inputs"]


# ---------------------------------------------------------------- content negotiation

@pytest.mark.parametrize("accept, default, binary", [
    ("", "json", False),
    ("", "binary", True),
    ("*/*", "json", False),
    ("*/*", "binary", True),
    ("application/octet-stream", "json", True),
    ("application/json", "binary", False),
    ("application/json;q=0.5, application/octet-stream", "json", True),
    ("application/octet-stream;q=0.1, application/json", "binary", False),
    ("application/octet-stream;q=0.9, */*;q=0.1", "json", True),
    ("application/*;q=0.2, application/octet-stream;q=0", "json", False),
    ("text/html", "json", False),  # neither acceptable: a tie, the default wins
    ("application/octet-stream; q=1.0 , application/json ; q=0.999", "json", True),
    ("application/octet-streamx", "json", False),  # no substring matching
])
def test_wants_binary_by_q_values(accept, default, binary):
    assert wants_binary(accept, default) is binary


def test_accept_quality_prefers_the_most_specific_range():
    assert accept_quality("*/*;q=0.1, application/*;q=0.5, application/json;q=0.8", "application/json") == 0.8
    assert accept_quality("*/*;q=0.1, application/*;q=0.5", "application/json") == 0.5
    assert accept_quality("text/*", "application/json") == 0.0
    assert accept_quality("application/json;q=oops", "application/json") == 0.0


def test_binary_reply_carries_the_raw_proof(server, verify):
    status, headers, body = request(server.port, "POST", "/api/prove", WITNESS,
                                    {"Accept": "application/octet-stream", "Content-Type": "application/octet-stream"})
    assert status == 200
    assert headers["content-type"] == "application/octet-stream"
    assert int(headers["content-length"]) == len(body) > 1000
    public = headers["x-public-inputs"].split(",")
    assert public == PUBLIC
    assert verify(body, public)


def test_binary_mode_default_and_json_errors(start_server, verify):
    srv = start_server(PROOF_RESPONSE_FORMAT="binary")
    status, headers, body = request(srv.port, "POST", "/api/prove", WITNESS)
    assert status == 200 and headers["content-type"] == "application/octet-stream"
    assert verify(body, headers["x-public-inputs"].split(","))
    status, headers, body = request_json(srv.port, "POST", "/api/prove", WITNESS, {"Accept": "application/json"})
    assert status == 200 and body["success"] is True
    status, headers, body = request_json(srv.port, "POST", "/api/prove", fixture_bytes("unsatisfied.gz"))
    assert status == 422 and headers["content-type"] == "application/json"
    assert body["error"] == "Proof generation failed"


# ---------------------------------------------------------------- verifier target and /api/vk

def test_vk_endpoint_serves_the_circuit_vk(server, reference_vk):
    status, headers, body = request_json(server.port, "GET", "/api/vk")
    assert status == 200
    with open(reference_vk, "rb") as f:
        assert base64.b64decode(body["vk"]) == f.read()
    with open(os.path.join(os.path.dirname(reference_vk), "vk_hash"), "rb") as f:
        assert body["vk_hash"] == "0x" + f.read().hex()
    assert body["bb_version"].startswith("5.0.0")
    assert body["verifier_target"] is None
    assert re.fullmatch(r'"[0-9a-f]{32}"', headers["etag"])  # a digest of the whole reply
    for tags in (headers["etag"], f'"other", W/{headers["etag"]}', "*"):
        status, headers2, data = request(server.port, "GET", "/api/vk", headers={"If-None-Match": tags})
        assert status == 304 and data == b"" and headers2["etag"] == headers["etag"]
        assert "content-type" not in headers2
    assert request(server.port, "GET", "/api/vk", headers={"If-None-Match": '"other"'})[0] == 200


def test_evm_target_proof_verifies_only_as_evm(start_server, verify, tmp_path):
    srv = start_server(VERIFIER_TARGET="evm")
    status, _, health = request_json(srv.port, "GET", "/api/health")
    assert health["verifier_target"] == "evm"
    status, _, vk = request_json(srv.port, "GET", "/api/vk")
    assert vk["verifier_target"] == "evm"
    vk_path = tmp_path / "evm.vk"
    vk_path.write_bytes(base64.b64decode(vk["vk"]))
    status, _, body = request_json(srv.port, "POST", "/api/prove", WITNESS)
    assert status == 200
    proof = base64.b64decode(body["proof"])
    assert verify(proof, body["publicInputs"], vk=str(vk_path), extra=["-t", "evm"])
    assert not verify(proof, body["publicInputs"], vk=str(vk_path))
    assert not verify(proof, body["publicInputs"])  # the default-target VK


# ---------------------------------------------------------------- metrics

def metric_values(text):
    """{(name, frozenset(labels)): value} of a Prometheus text exposition."""
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return values


@pytest.mark.parametrize("workers", [1, 3])
def test_metrics_count_outcomes_across_workers(start_server, workers):
    srv = start_server(WEB_CONCURRENCY=workers)
    threads = [threading.Thread(target=request, args=(srv.port, "POST", "/api/prove", body))
               for body in [WITNESS] * 4 + [fixture_bytes("unsatisfied.gz")] * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    values = {}
    for _ in range(workers * 3):  # whichever worker answers, the counts are the whole server's
        status, headers, data = request(srv.port, "GET", "/api/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
        values = metric_values(data.decode())
        assert values[("bb_worker_proofs_total", frozenset({("circuit", "default"), ("outcome", "success")}))] == 4
        assert values[("bb_worker_proofs_total", frozenset({("circuit", "default"), ("outcome", "rejected")}))] == 2
        assert values[("bb_worker_prove_duration_seconds_count", frozenset({("circuit", "default")}))] == 4
        assert values[("bb_worker_queue_wait_seconds_count", frozenset())] == 6
        assert values[("bb_worker_proofs_in_flight", frozenset())] == 0
        assert values[("bb_worker_queued_requests", frozenset())] == 0
        assert values[("bb_worker_received_bytes_total", frozenset())] == 4 * len(WITNESS) + 2 * len(
            fixture_bytes("unsatisfied.gz"))
    assert any(name == "bb_worker_bb_info" and dict(labels)["version"].startswith("5.0.0")
               for name, labels in values)


# ---------------------------------------------------------------- JSON logs

def test_json_logs_one_object_per_line(start_server):
    srv = start_server(LOG_FORMAT="json")
    status, headers, _ = request(srv.port, "POST", "/api/prove", WITNESS)
    request(srv.port, "POST", "/api/prove", fixture_bytes("unsatisfied.gz"))
    srv.stop()
    lines = [json.loads(line) for line in srv.output().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    access = [line for line in lines if line.get("request_id") == headers["x-request-id"]]
    assert len(access) == 1
    entry = access[0]
    assert (entry["method"], entry["path"], entry["status"], entry["bytes_in"], entry["bb_exit_code"]) == (
        "POST", "/api/prove", 200, len(WITNESS), 0)
    assert entry["bytes_out"] > 1000 and entry["duration_ms"] > 0
    assert any(line.get("status") == 422 for line in lines)
    assert any(line["logger"] == "gunicorn.error" for line in lines)


# ---------------------------------------------------------------- several circuits

@pytest.fixture
def circuits_dir(tmp_path):
    d = tmp_path / "circuits"
    d.mkdir()
    shutil.copyfile(CIRCUIT, d / "demo.json")
    shutil.copyfile(os.path.join(FIXTURES, "other_circuit.json"), d / "other.json")
    shutil.copyfile(CIRCUIT, d / "bad name.json")
    shutil.copyfile(CIRCUIT, d / "default.json")  # reserved: the metrics label of CIRCUIT_PATH
    (d / "notes.txt").write_text("not a circuit")
    return d


def test_several_circuits(start_server, circuits_dir, bb, crs_dir, verify, tmp_path):
    srv = start_server(CIRCUITS_DIR=circuits_dir)
    status, _, body = request_json(srv.port, "POST", "/api/prove/other", fixture_bytes("other_circuit.gz"))
    assert status == 200, body
    assert body["publicInputs"] == ["0x" + "0" * 62 + "0f"]
    status, _, vk = request_json(srv.port, "GET", "/api/vk/other")
    assert status == 200 and vk["circuit"] == "other"
    other_vk = tmp_path / "other.vk"
    other_vk.write_bytes(base64.b64decode(vk["vk"]))
    reference = tmp_path / "ref"
    subprocess.run([bb, "write_vk", "-b", str(circuits_dir / "other.json"), "-o", str(reference)]
                   + crs_args(crs_dir), check=True, capture_output=True)
    assert other_vk.read_bytes() == (reference / "vk").read_bytes()
    assert verify(base64.b64decode(body["proof"]), body["publicInputs"], vk=str(other_vk))

    status, _, body = request_json(srv.port, "POST", "/api/prove/demo", WITNESS)
    assert status == 200 and verify(base64.b64decode(body["proof"]), body["publicInputs"])
    status, _, body = request_json(srv.port, "POST", "/api/prove/other", WITNESS)
    assert status == 422  # a demo witness for the other circuit
    status, _, body = request_json(srv.port, "POST", "/api/prove", WITNESS)
    assert status == 200  # /api/prove still serves CIRCUIT_PATH

    for path in ("/api/prove/nope", "/api/prove/bad%20name", "/api/prove/default", "/api/prove/../circuit",
                 "/api/prove/",
                 "/api/prove/demo/x"):
        status, _, body = request_json(srv.port, "POST", path, WITNESS)
        assert status == 404, path
        assert body["available_circuits"] == ["demo", "other"]
    status, headers, _ = request_json(srv.port, "GET", "/api/prove/demo")
    assert status == 405 and headers["allow"] == "POST"
    status, _, body = request_json(srv.port, "GET", "/nope")
    assert "/api/prove/<circuit>" in body["available_endpoints"]
    assert srv.leftovers() == []


def test_log_level_warning_drops_access_lines(start_server):
    srv = start_server(LOG_LEVEL="warning")
    request(srv.port, "POST", "/api/prove", WITNESS)
    request(srv.port, "POST", "/api/prove", fixture_bytes("unsatisfied.gz"))
    srv.stop()
    out = srv.output()
    assert "bb_worker.access" not in out and "[INFO]" not in out
    assert "ProverFailed" in out  # the warning for the rejected witness is kept
