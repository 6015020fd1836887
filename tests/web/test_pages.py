"""The read-only endpoints through the WSGI app (bbworker.web.pages): health, live, vk, metrics, openapi."""
import base64
import json
import os
import platform
import re
from datetime import datetime, timezone

from bbworker.server import metrics
from bbworker.web.pages import OPENAPI_PATH

ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
ELF_TEXT = "/x/bb: ELF 64-bit LSB executable, x86-64, version 1 (SYSV)"  # the stub's (conftest.py)


# ---------------------------------------------------------------- health

def test_health_reports_the_prover_status(worker, call):
    before = datetime.now(timezone.utc)
    code, _, data = call(worker, "GET", "/api/health")
    after = datetime.now(timezone.utc)
    body = json.loads(data)
    assert code == 200
    assert {"status", "architecture", "bb", "timestamp"} <= set(body)
    assert body["status"] == "ok"
    assert body["architecture"] == platform.machine()
    assert body["bb"] == {"available": True, "version": "5.0.0-stub", "binary_arch": ELF_TEXT}
    assert ISO_Z.match(body["timestamp"]), body["timestamp"]
    stamp = datetime.strptime(body["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    assert before.replace(microsecond=before.microsecond // 1000 * 1000) <= stamp <= after


def test_health_is_503_when_bb_is_unavailable(make_worker, stub_circuit, work_dir, call):
    stub = stub_circuit(available=False, detail="/x/bb: No such file or directory")
    code, headers, data = call(make_worker(stub, work_dir), "GET", "/api/health")
    body = json.loads(data)
    assert code == 503
    assert body["status"] == "unavailable"
    assert body["bb"] == {"available": False, "version": None,
                          "binary_arch": "/x/bb: No such file or directory"}
    assert ISO_Z.match(body["timestamp"])
    assert headers["Retry-After"] == "5"


def test_health_of_one_circuit_answers_for_that_circuit(make_worker, prover, stub_circuit, work_dir, call):
    other = stub_circuit(problems=["starting: the verification key is being computed"])
    worker = make_worker(prover, work_dir, circuits={"other": other})
    code, _, data = call(worker, "GET", "/api/health/other")
    body = json.loads(data)
    assert code == 503 and body["circuit"] == "other" and body["status"] == "starting"
    assert body["reasons"] == ["starting: the verification key is being computed"]
    code, _, data = call(worker, "GET", "/api/health/default")
    assert code == 404  # the default circuit is /api/health itself
    code, _, data = call(worker, "GET", "/api/health")
    body = json.loads(data)
    assert code == 503 and body["circuits"]["default"] == {"ready": True, "reasons": []}


def test_live_answers_while_the_process_does(make_worker, stub_circuit, work_dir, call):
    stub = stub_circuit(available=False)  # not ready, but alive
    code, _, data = call(make_worker(stub, work_dir), "GET", "/api/live")
    assert code == 200 and json.loads(data) == {"status": "alive", "pid": os.getpid()}


# ---------------------------------------------------------------- the verification key

def test_vk_is_served_with_an_etag_and_304_when_it_matches(worker, call):
    code, headers, data = call(worker, "GET", "/api/vk")
    assert code == 200
    assert json.loads(data) == {"vk": base64.b64encode(b"\x01vk-bytes\x02").decode(),
                                "vk_hash": "0x" + bytes(range(32)).hex(), "bb_version": "5.0.0-stub",
                                "verifier_target": None, "circuit": None}
    etag = headers["ETag"]
    assert re.fullmatch(r'"[0-9a-f]{32}"', etag) and headers["Cache-Control"] == "no-cache"
    for sent in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        code, headers, _ = call(worker, "GET", "/api/vk", content_type=None, HTTP_IF_NONE_MATCH=sent)
        assert code == 304 and headers["ETag"] == etag
    assert call(worker, "GET", "/api/vk", HTTP_IF_NONE_MATCH='"other"')[0] == 200


def test_a_missing_vk_is_computed_on_a_slot_then_served(prover, worker, call):
    prover.vk.present = False
    code, _, data = call(worker, "GET", "/api/vk")
    assert code == 200 and json.loads(data)["vk"]
    assert prover.vk.ensured >= 1 and prover.vk.cached()


def test_vk_of_an_unready_circuit_is_503(make_worker, stub_circuit, work_dir, call):
    stub = stub_circuit(problems=["CRS unavailable: /crs: No such file or directory"])
    code, headers, data = call(make_worker(stub, work_dir), "GET", "/api/vk")
    assert code == 503 and json.loads(data)["message"] == "CRS unavailable: /crs: No such file or directory"
    assert headers["Retry-After"] == "30"  # the CRS's
    assert stub.vk.ensured == 0


# ---------------------------------------------------------------- metrics and the OpenAPI document

def test_metrics_are_prometheus_text_naming_the_bb(worker, call):
    code, _, data = call(worker, "GET", "/api/metrics", content_type=metrics.render()[1])
    assert code == 200
    assert re.search(rb'^bb_worker_bb_info\{[^}]*version="5\.0\.0-stub"[^}]*\} 1\.0$', data, re.M), data


def test_openapi_document_is_the_packaged_file(worker, call):
    code, headers, data = call(worker, "GET", "/api/openapi.json")
    with open(OPENAPI_PATH, "rb") as f:
        assert code == 200 and data == f.read()
    assert headers["Cache-Control"] == "no-cache"
    assert json.loads(data)["openapi"].startswith("3.1")
