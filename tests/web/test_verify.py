"""POST /api/verify through the WSGI app (bbworker.web.verify; no network, no bb): bodies, verdicts, bb's errors.

The request body's parsing alone (body.parse_verify_request) is in test_body.py.
"""
import base64
import json
import logging
import os

import pytest
from prometheus_client import REGISTRY

from bbworker import errors

PROOF = bytes(range(64))  # two field elements
INPUTS = ["0x07", "0x" + "1b" * 32]
INPUT_BYTES = bytes(31) + b"\x07" + b"\x1b" * 32


def counted(outcome, circuit="default"):
    """bb_worker_verifications_total for (circuit, outcome) now (float)."""
    return REGISTRY.get_sample_value("bb_worker_verifications_total",
                                     {"circuit": circuit, "outcome": outcome}) or 0.0


def verify(call, worker, payload, **environ):
    """POST a JSON {"proof", "publicInputs"} to /api/verify: (status, headers, JSON reply)."""
    body = json.dumps(payload).encode() if isinstance(payload, dict) else payload
    environ.setdefault("CONTENT_TYPE", "application/json")
    code, headers, data = call(worker, "POST", "/api/verify", body, **environ)
    return code, headers, json.loads(data)


def access(caplog):
    (record,) = [r for r in caplog.records if r.name == "bb_worker.access"]
    return record


@pytest.mark.parametrize("verdict, outcome, exit_code", [(True, "valid", 0), (False, "invalid", 1)])
def test_a_proof_is_verified_with_the_exact_bytes(make_worker, stub_circuit, work_dir, call, caplog,
                                                  verdict, outcome, exit_code):
    caplog.set_level(logging.INFO, logger="bb_worker.access")
    stub = stub_circuit(verdict=verdict)
    before = counted(outcome)
    code, _, body = verify(call, make_worker(stub, work_dir),
                           {"proof": base64.b64encode(PROOF).decode(), "publicInputs": INPUTS})
    assert (code, body) == (200, {"valid": verdict})
    assert stub.verified == [{"proof": PROOF, "public_inputs": INPUT_BYTES,
                              "workdir_entries": ["proof", "public_inputs"]}]
    assert stub.calls == []  # verifying never proves
    assert os.listdir(work_dir) == []
    record = access(caplog)
    assert (record.outcome, record.fault, record.bb_exit_code) == (outcome, None, exit_code)
    assert counted(outcome) == before + 1


def test_a_raw_proof_takes_its_inputs_from_the_header(prover, worker, work_dir, call):
    code, _, data = call(worker, "POST", "/api/verify", PROOF, CONTENT_TYPE="application/octet-stream",
                         HTTP_X_PUBLIC_INPUTS=",".join(INPUTS))
    assert (code, json.loads(data)) == (200, {"valid": True})
    assert prover.verified[0]["proof"] == PROOF and prover.verified[0]["public_inputs"] == INPUT_BYTES


def test_a_bad_body_is_400_and_never_verified(prover, worker, work_dir, call, caplog):
    caplog.set_level(logging.INFO, logger="bb_worker.access")
    code, _, body = verify(call, worker, {"proof": "!!", "publicInputs": []})
    assert code == 400 and body == {"error": "Bad request", "message": "proof is not valid base64"}
    assert prover.verified == []
    assert (access(caplog).outcome, access(caplog).fault) == ("bad_request", "client")
    assert os.listdir(work_dir) == []


def test_content_length_over_the_verify_limit_is_413_without_reading(prover, worker, call, stream):
    code, _, data = call(worker, "POST", "/api/verify", stream=stream(fail=True), CONTENT_LENGTH=str(1024 * 1024 + 1),
                         CONTENT_TYPE="application/json")
    assert code == 413 and json.loads(data)["error"] == "Payload too large"
    assert prover.verified == []


@pytest.mark.parametrize("error, code, title, message, outcome, fault", [
    (errors.ProverTimeout("bb did not finish within 10 s"), 504, "Proof verification timed out",
     "bb did not finish within 10 s", "timeout", None),
    (errors.ProverCrashed(-11, "bb was killed by signal SIGSEGV"), 500, "Internal server error",
     "bb crashed: bb was killed by signal SIGSEGV", "crashed", "server"),
    (errors.CrsUnavailable(1, "bb tried to download the CRS"), 503, "Service unavailable",
     "the CRS is unavailable: bb tried to download the CRS", "crs_unavailable", "server"),
], ids=["timeout", "crashed", "crs"])
def test_bb_errors_of_verify_are_answered_like_a_proofs(make_worker, stub_circuit, work_dir, call, caplog,
                                                        error, code, title, message, outcome, fault):
    caplog.set_level(logging.INFO, logger="bb_worker.access")
    stub = stub_circuit(verify_error=error)
    status, headers, body = verify(call, make_worker(stub, work_dir),
                                   {"proof": base64.b64encode(PROOF).decode(), "publicInputs": INPUTS})
    assert (status, body) == (code, {"error": title, "message": message})
    assert ("Retry-After" in headers) == (code == 503)
    assert (access(caplog).outcome, access(caplog).fault) == (outcome, fault)
    assert os.listdir(work_dir) == []


def test_verify_of_an_unready_circuit_is_503_before_bb(make_worker, stub_circuit, work_dir, call):
    stub = stub_circuit(available=False, detail="/x/bb: No such file or directory")
    code, headers, body = verify(call, make_worker(stub, work_dir),
                                 {"proof": base64.b64encode(PROOF).decode(), "publicInputs": INPUTS})
    assert code == 503 and body["message"] == "bb is not usable: /x/bb: No such file or directory"
    assert headers["Retry-After"] == "5"
    assert stub.verified == []


def test_verify_waits_for_a_place_then_is_busy(make_worker, prover, work_dir, call):
    worker = make_worker(prover, work_dir, verify_concurrency=1)
    with worker.service.verify_limit.slot():  # the one place, held
        code, headers, body = verify(call, worker, {"proof": base64.b64encode(PROOF).decode(), "publicInputs": []})
    assert code == 503 and "verification slots busy" in body["message"]
    assert headers["Retry-After"] == "1"
    assert prover.verified == []


# ---------------------------------------------------------------- whose fault: the self-check

CRAFTED = errors.ServerFault(1, "bb verify failed: Cannot aggregate: incoming pairing points are at infinity")


def test_a_proof_bb_fails_on_is_invalid_when_bb_verifies_a_known_proof(make_worker, stub_circuit, work_dir, call,
                                                                       caplog):
    caplog.set_level(logging.INFO, logger="bb_worker.access")
    stub = stub_circuit(check_error=None)
    worker = make_worker(stub, work_dir)
    good = {"proof": base64.b64encode(PROOF).decode(), "publicInputs": INPUTS}
    assert verify(call, worker, good)[:3:2] == (200, {"valid": True})  # a proof bb accepts: known from now on
    stub.verify_error = CRAFTED
    crafted = {"proof": base64.b64encode(bytes(64)).decode(), "publicInputs": INPUTS}
    original_verify = stub.verify

    def verify_known_only(proof_path, public_inputs_path):  # bb fails on the crafted proof, not on the known one
        with open(proof_path, "rb") as f:
            stub.verify_error = None if f.read() == PROOF else CRAFTED
        return original_verify(proof_path, public_inputs_path)
    stub.verify = verify_known_only
    before = counted("invalid")
    for _ in range(3):  # the "three of them": readiness never moves
        code, _, body = verify(call, worker, crafted)
        assert (code, body) == (200, {"valid": False})
    assert counted("invalid") == before + 3
    # the good one, then each crafted one followed by the self-check: the known proof verified again (no proving)
    assert [v["proof"] for v in stub.verified] == [PROOF] + [bytes(64), PROOF] * 3
    assert stub.checks == []
    records = [r for r in caplog.records if r.name == "bb_worker.access" and r.path == "/api/verify"]
    assert [(r.outcome, r.fault) for r in records[-3:]] == [("invalid", None)] * 3
    assert call(worker, "GET", "/api/health")[0] == 200


def test_bb_verify_failing_on_every_proof_is_ours_and_takes_the_worker_out(make_worker, stub_circuit, work_dir, call):
    stub = stub_circuit(verify_error=CRAFTED, check_error=None)  # its own proof proves; bb verify fails on all
    worker = make_worker(stub, work_dir)
    code, _, body = verify(call, worker, {"proof": base64.b64encode(PROOF).decode(), "publicInputs": INPUTS})
    assert code == 500 and body["message"] == CRAFTED.detail
    assert stub.checks == []  # no known proof: bb verify of bytes of the server's making failed too, no proving
    code, _, data = call(worker, "GET", "/api/health")
    assert code == 503 and "self-check failed" in data.decode()


def test_a_body_larger_than_the_circuits_proofs_need_is_413_before_reading(make_worker, stub_circuit, work_dir,
                                                                          call, stream):
    from bbworker.bbrunner.circuit import ProofShape
    from bbworker.web.body import verify_body_limit

    stub = stub_circuit()
    stub.shape = ProofShape(14656, 1, 9)  # the demo circuit's
    limit = verify_body_limit(stub.shape)
    assert 2 * 19544 < limit < 50 * 1024  # the JSON of one proof, twice over: not the 1 MiB of any circuit
    code, _, data = call(make_worker(stub, work_dir), "POST", "/api/verify", stream=stream(fail=True),
                         CONTENT_LENGTH=str(limit + 1), CONTENT_TYPE="application/json")
    assert code == 413 and json.loads(data)["error"] == "Payload too large"
    assert stub.verified == []


@pytest.mark.parametrize("proof, inputs, message", [
    (bytes(64), INPUTS[:1], "proof is 64 bytes; this circuit's proofs are 14656"),
    (bytes(14656), INPUTS, "publicInputs has 2 values; this circuit's proofs have 1"),
])
def test_a_proof_of_a_shape_the_circuit_cannot_have_is_400_before_bb(make_worker, stub_circuit, work_dir, call,
                                                                      proof, inputs, message):
    from bbworker.bbrunner.circuit import ProofShape

    stub = stub_circuit()
    stub.shape = ProofShape(14656, 1, 9)
    code, _, body = verify(call, make_worker(stub, work_dir),
                           {"proof": base64.b64encode(proof).decode(), "publicInputs": inputs})
    assert (code, body) == (400, {"error": "Bad request", "message": message})
    assert stub.verified == []
