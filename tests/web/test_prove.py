"""POST /api/prove through the WSGI app (no network, no bb): bodies, limits, gzip, prover errors, busy slots.

The app is built by tests/web/conftest.py's make_worker around a StubCircuit; body.py's pieces
alone are in test_body.py.
"""
import base64
import copy
import gzip
import logging
import os
import time

import gevent
import pytest
from prometheus_client import REGISTRY

from bbworker import errors
from bbworker.bbrunner import messages
from bbworker.server.scheduler import Scheduler
from bbworker.web import body
from support import fixture_bytes

MiB = 1024 * 1024


def counted(outcome, circuit="default"):
    """bb_worker_proofs_total for (circuit, outcome) now (float; 0 before the first)."""
    return REGISTRY.get_sample_value("bb_worker_proofs_total", {"circuit": circuit, "outcome": outcome}) or 0.0


def access_record(caplog, request_id):
    """The one bb_worker.access record of request `request_id`."""
    records = [r for r in caplog.records if r.name == "bb_worker.access" and r.request_id == request_id]
    assert len(records) == 1, records
    return records[0]


# ---------------------------------------------------------------- proving

def test_prove_passes_the_exact_body_and_answers_the_proof(worker, prover, work_dir, prove):
    witness = fixture_bytes("valid_1.gz")
    code, _, body = prove(worker, witness)
    assert code == 200, body
    assert body == {"success": True, "proof": base64.b64encode(b"\x00proof\xff").decode(),
                    "publicInputs": ["0x" + "00" * 31 + "07", "0x" + "ab" * 32]}
    assert prover.calls == [{"witness": witness, "workdir_entries": [], "threads": 1}]  # the scheduler's
    assert os.listdir(work_dir) == []


def test_a_proof_is_accounted_as_success_in_the_access_log(worker, prove, caplog):
    caplog.set_level(logging.INFO, logger="bb_worker.access")
    before = counted("success")
    code, headers, _ = prove(worker, fixture_bytes("valid_1.gz"))
    assert code == 200
    record = access_record(caplog, headers["X-Request-Id"])
    assert (record.outcome, record.fault, record.bb_exit_code, record.status) == ("success", None, 0, 200)
    assert record.bytes_in == len(fixture_bytes("valid_1.gz"))
    assert counted("success") == before + 1


def test_chunked_body_without_content_length_is_read_to_the_end(worker, prover, work_dir, prove, stream):
    witness = fixture_bytes("valid_2.gz")
    code, _, body = prove(worker, None, stream=stream(witness), HTTP_TRANSFER_ENCODING="chunked")
    assert code == 200, body
    assert prover.calls[0]["witness"] == witness
    assert os.listdir(work_dir) == []


# ---------------------------------------------------------------- prover errors

# (error raised by the prover, status, "error" title, "message" (the error's detail), outcome, fault)
PROVER_ERRORS = [
    (errors.ProverFailed(1, "Reason : bad witness"), 422, "Proof generation failed",
     "bb prove failed: Reason : bad witness", "rejected", "client"),
    (errors.ProverTimeout("bb did not finish within 1 s"), 504, "Proof generation timed out",
     "bb did not finish within 1 s", "timeout", None),
    (errors.ProverCrashed(-11, "bb was killed by signal SIGSEGV"), 500, "Internal server error",
     "bb crashed: bb was killed by signal SIGSEGV", "crashed", "server"),
    (errors.ProverUnavailable("cannot run bb: No such file or directory"), 500, "Internal server error",
     "bb is not available: cannot run bb: No such file or directory", "unavailable", "server"),
    (errors.ProofRejected(1, "proof failed verification: Proof verification failed"), 500,
     "Proof failed verification", "proof failed verification: Proof verification failed", "unverified", "server"),
    (errors.ProverOutOfMemory(-6, 2048), 500, "Internal server error", "bb ran out of memory (limit 2048 MiB)",
     "out_of_memory", "server"),
    (errors.ServerFault(1, "unknown option --frobnicate"), 500, "Internal server error",
     "bb failed: unknown option --frobnicate", "server_error", "server"),
    (errors.ResourceUnavailable(0, "bb wrote a proof of 4096 bytes, and its file system is full"), 503,
     "Service unavailable", "a server resource failed: bb wrote a proof of 4096 bytes, and its file system is full",
     "unavailable", "server"),
    (errors.CrsUnavailable(1, "bb tried to download the CRS"), 503, "Service unavailable",
     "the CRS is unavailable: bb tried to download the CRS", "crs_unavailable", "server"),
]


@pytest.mark.parametrize("error, code, title, message, outcome, fault", PROVER_ERRORS,
                         ids=[type(e[0]).__name__ for e in PROVER_ERRORS])
def test_prover_errors_map_to_status_codes(make_worker, stub_circuit, work_dir, prove, caplog,
                                           error, code, title, message, outcome, fault):
    caplog.set_level(logging.INFO, logger="bb_worker.access")
    stub = stub_circuit(error=error)
    before = counted(outcome)
    status, headers, body = prove(make_worker(stub, work_dir), fixture_bytes("valid_1.gz"))
    assert status == code
    assert body == {"error": title, "message": message}
    assert len(stub.calls) == 1
    assert ("Retry-After" in headers) == (code == 503)
    assert os.listdir(work_dir) == []
    record = access_record(caplog, headers["X-Request-Id"])
    assert (record.status, record.outcome, record.fault) == (code, outcome, fault)
    assert record.bb_exit_code == error.returncode
    assert counted(outcome) == before + 1  # exactly one outcome per request


# A failure bb can owe to the witness (it crashed on it, failed without saying why, wrote a proof
# bb verify rejects) is the witness's when the server's own witness proves (the self-check).
MAY_BE_INPUT = [errors.ProverCrashed(-11, "bb was killed by signal SIGSEGV"),
                errors.ServerFault(1, "Assertion failed: (index < size)")]
UNVERIFIED = errors.ProofRejected(0, "proof failed verification: bb verify rejects the proof bb prove wrote")
# Failures of ours whatever the witness: passing resources, the kernel's SIGKILL.
OURS = [errors.ProverOutOfMemory(-6, 2048), errors.ResourceUnavailable(1, "No space left on device"),
        errors.CrsUnavailable(1, "bb tried to download the CRS"), messages.bb_error(-9, b"")]


@pytest.mark.parametrize("error", MAY_BE_INPUT, ids=[type(e).__name__ for e in MAY_BE_INPUT])
def test_a_failure_the_witness_can_cause_is_422_when_the_servers_own_witness_proves(
        make_worker, stub_circuit, work_dir, prove, call, caplog, error):
    caplog.set_level(logging.INFO, logger="bb_worker.access")
    stub = stub_circuit(error=error, check_error=None)
    worker = make_worker(stub, work_dir)
    before = counted("rejected")
    status, headers, body = prove(worker, fixture_bytes("valid_1.gz"))
    assert status == 422 and body["error"] == "Proof generation failed", body
    assert body["message"] == (f"bb prove failed on this witness: {error.detail} (the server proves its own "
                               "witness of this circuit)")
    record = access_record(caplog, headers["X-Request-Id"])
    assert (record.outcome, record.fault) == ("rejected", "client")
    assert counted("rejected") == before + 1
    assert len(stub.checks) == 1 and stub.checks[0]["threads"] == 1  # in the request's own slot
    assert call(worker, "GET", "/api/health")[0] == 200  # readiness never moves for a client's bytes
    assert os.listdir(work_dir) == []


def test_a_proof_bb_verify_rejects_is_the_witnesss_only_while_bb_verify_accepts_a_known_proof(
        make_worker, stub_circuit, work_dir, prove, call):
    """bb verify rejecting the proof of a witness bb did not flag: the witness's (422) when bb verify
    still accepts a proof it accepted before; on a worker that has seen none, nothing can tell (the
    server's own witness rarely satisfies the circuit): ours (500), and readiness does not move."""
    stub = stub_circuit(error=UNVERIFIED, check_error=None)
    worker = make_worker(stub, work_dir)
    status, _, body = prove(worker, fixture_bytes("valid_1.gz"))
    assert (status, body["error"]) == (500, "Proof failed verification")
    assert call(worker, "GET", "/api/health")[0] == 200
    stub.error = None
    assert prove(worker, fixture_bytes("valid_1.gz"))[0] == 200  # a proof bb verify accepted: the reference
    stub.error = UNVERIFIED
    status, _, body = prove(worker, fixture_bytes("valid_1.gz"))
    assert status == 422 and body["message"].startswith("bb prove failed on this witness: proof failed verification")
    assert stub.verified[-1]["proof"] == b"\x00proof\xff"  # the reference, verified again
    stub.verdict = False  # bb verify now rejects what it accepted: ours, and readiness says so
    status, _, body = prove(worker, fixture_bytes("valid_1.gz"))
    assert (status, body["error"]) == (500, "Proof failed verification")
    code, _, data = call(worker, "GET", "/api/health")
    assert code == 503 and "bb verify now rejects a proof it accepted before" in data.decode()


@pytest.mark.parametrize("error", MAY_BE_INPUT + [UNVERIFIED] + OURS,
                         ids=[type(e).__name__ for e in MAY_BE_INPUT + [UNVERIFIED] + OURS])
def test_a_failure_the_self_check_repeats_is_ours_and_takes_the_worker_out(
        make_worker, stub_circuit, work_dir, prove, call, error):
    stub = stub_circuit(error=error)  # its own witness fails the same way: the server is broken
    worker = make_worker(stub, work_dir)
    status, _, body = prove(worker, fixture_bytes("valid_1.gz"))
    assert (status, body["message"]) == (error.status, error.detail)
    code, headers, data = call(worker, "GET", "/api/health")
    assert code == 503 and int(headers["Retry-After"]) >= 1
    assert f"self-check failed: {error.detail}" in data.decode()
    code, _, _ = prove(worker, fixture_bytes("valid_1.gz"))
    assert code == 503 and len(stub.calls) == 1  # refused before bb while the check fails


@pytest.mark.parametrize("error", OURS, ids=[type(e).__name__ for e in OURS])
def test_a_passing_failure_of_ours_is_answered_as_it_is_without_moving_readiness(
        make_worker, stub_circuit, work_dir, prove, call, error):
    stub = stub_circuit(error=error, check_error=None)
    worker = make_worker(stub, work_dir)
    status, _, body = prove(worker, fixture_bytes("valid_1.gz"))
    assert (status, body["message"]) == (error.status, error.detail)
    assert call(worker, "GET", "/api/health")[0] == 200


def test_busy_slots_are_503_with_retry_after(make_worker, prover, work_dir, tmp_path, prove):
    slots = Scheduler(str(tmp_path / "slots"), 1, 1, 1 << 30)
    worker = make_worker(prover, work_dir, slots=slots, queue_timeout=0.3)
    held = slots.take(1)
    try:
        started = time.monotonic()
        code, headers, body = prove(worker, fixture_bytes("valid_1.gz"))
        waited = time.monotonic() - started
    finally:
        slots.release(held)
    assert code == 503
    assert body["error"] == "Service unavailable"
    assert "retry" in body["message"]
    assert headers["Retry-After"] == "1"
    assert 0.3 <= waited < 3
    assert prover.calls == []
    assert os.listdir(work_dir) == []
    assert prove(worker, fixture_bytes("valid_1.gz"))[0] == 200  # the slot is free again


def test_slot_timeout_retry_after_follows_the_queue_timeout(make_worker, prover, work_dir, prove, raising_slots,
                                                           caplog):
    caplog.set_level(logging.INFO, logger="bb_worker.access")
    worker = make_worker(prover, work_dir, slots=raising_slots, queue_timeout=7)
    code, headers, _ = prove(worker, fixture_bytes("valid_1.gz"))
    assert code == 503
    assert headers["Retry-After"] == "7"
    assert prover.calls == []
    record = access_record(caplog, headers["X-Request-Id"])
    assert (record.outcome, record.fault) == ("busy", None)


def test_gevent_timeout_is_not_swallowed(make_worker, stub_circuit, work_dir, call):
    stub = stub_circuit(error=gevent.Timeout(1))
    with pytest.raises(gevent.Timeout):
        call(make_worker(stub, work_dir), "POST", "/api/prove", fixture_bytes("valid_1.gz"))
    assert os.listdir(work_dir) == []


def test_unwritable_work_dir_is_503(make_worker, prover, tmp_path, prove, caplog):
    caplog.set_level(logging.INFO, logger="bb_worker.access")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    code, headers, body = prove(make_worker(prover, not_a_dir), fixture_bytes("valid_1.gz"))
    assert code == 503
    assert headers["Retry-After"] == "5"
    assert prover.calls == []
    assert "temp dir is not writable" in body["message"]
    record = access_record(caplog, headers["X-Request-Id"])
    assert (record.outcome, record.fault) == ("not_ready", "server")


# ---------------------------------------------------------------- request bodies

def corrupt_crc(data):
    return data[:-8] + bytes([data[-8] ^ 0xFF]) + data[-7:]


@pytest.mark.parametrize("body, words", [
    (b"", "empty body"),
    (b"hello, not gzip", "not a gzipped witness"),
    (b"\x1f", "truncated"),
    (fixture_bytes("valid_1.gz")[:100], "truncated"),
    (fixture_bytes("valid_1.gz")[:-1], "truncated"),
    (b"\x1f\x8b\x08\x00" + b"\xff" * 200, "not valid gzip"),
    (corrupt_crc(fixture_bytes("valid_1.gz")), "not valid gzip"),
    (fixture_bytes("valid_1.gz") + b"trailing junk", "not valid gzip"),
], ids=["empty", "not-gzip", "one-byte", "truncated", "no-last-byte", "corrupt", "bad-crc", "junk-after"])
def test_bad_bodies_are_400_and_never_proved(worker, prover, work_dir, prove, caplog, body, words):
    caplog.set_level(logging.INFO, logger="bb_worker.access")
    code, headers, payload = prove(worker, body)
    assert code == 400
    assert payload["error"] == "Bad request"
    assert words in payload["message"]
    assert prover.calls == []
    assert os.listdir(work_dir) == []
    record = access_record(caplog, headers["X-Request-Id"])
    assert (record.outcome, record.fault) == ("bad_request", "client")


def test_content_length_over_the_limit_is_413_without_reading(worker, prover, work_dir, prove, stream):
    prover.acir = copy.copy(prover.acir)
    prover.acir.max_witness_bytes = 64 * MiB  # a circuit whose witnesses may be that big: MAX_BODY_BYTES bounds
    code, _, payload = prove(worker, None, stream=stream(fail=True), CONTENT_LENGTH=str(MiB + 1))
    assert code == 413
    assert payload["error"] == "Payload too large"
    assert str(MiB) in payload["message"]
    assert prover.calls == []
    assert os.listdir(work_dir) == []


def test_a_body_larger_than_the_circuit_s_witnesses_can_need_is_413_without_reading(worker, prover, work_dir,
                                                                                     prove, stream):
    limit = body.witness_body_limit(prover.acir, MiB)
    assert limit < MiB  # the demo circuit's witnesses need far less than MAX_BODY_BYTES
    code, _, payload = prove(worker, None, stream=stream(fail=True), CONTENT_LENGTH=str(limit + 1))
    assert code == 413
    assert payload["message"] == f"request body is {limit + 1} bytes; the limit is {limit}"
    assert prover.calls == []
    assert os.listdir(work_dir) == []


@pytest.mark.parametrize("environ", [{"wsgi.input_terminated": True}, {"HTTP_TRANSFER_ENCODING": "chunked"}],
                         ids=["input-terminated", "chunked"])
def test_body_over_the_limit_without_content_length_is_413(worker, prover, work_dir, prove, stream, environ):
    prover.acir = copy.copy(prover.acir)
    prover.acir.max_witness_bytes = 64 * MiB  # a circuit whose witnesses may be that big
    data = stream(gzip.compress(os.urandom(3 * MiB // 2), compresslevel=1))
    code, _, payload = prove(worker, None, stream=data, **environ)
    assert code == 413
    assert "request body exceeds" in payload["message"]
    assert data.position <= MiB + 64 * 1024, "reading stops soon after the limit"
    assert prover.calls == []
    assert os.listdir(work_dir) == []


def test_a_lying_content_length_bounds_what_is_read(worker, prover, work_dir, prove, stream):
    data = stream(gzip.compress(os.urandom(3 * MiB // 2), compresslevel=1))
    code, _, payload = prove(worker, None, stream=data, CONTENT_LENGTH="1000")
    assert data.position == 1000
    assert code == 400 and "truncated" in payload["message"]
    assert prover.calls == []
    assert os.listdir(work_dir) == []


def test_body_exactly_at_the_limit_is_accepted(make_worker, prover, work_dir, prove):
    witness = fixture_bytes("valid_1.gz")
    worker = make_worker(prover, work_dir, max_body_bytes=len(witness))
    assert prove(worker, witness)[0] == 200
    code, _, _ = prove(make_worker(prover, work_dir, max_body_bytes=len(witness) - 1), witness)
    assert code == 413


def test_gzip_bomb_is_413_and_never_proved(make_worker, prover, work_dir, prove):
    bomb = gzip.compress(bytes(20 * MiB))
    assert len(bomb) < 100 * 1024
    worker = make_worker(prover, work_dir, max_witness_bytes=1 * MiB)
    started = time.monotonic()
    code, _, payload = prove(worker, bomb)
    assert code == 413
    assert "decompressed" in payload["message"]
    assert time.monotonic() - started < 5
    assert prover.calls == []
    assert os.listdir(work_dir) == []


def test_witness_size_limit_is_exact(make_worker, prover, work_dir, prove):
    data = fixture_bytes("valid_1.gz")
    size = len(gzip.decompress(data))
    assert prove(make_worker(prover, work_dir, max_witness_bytes=size), data)[0] == 200
    assert prove(make_worker(prover, work_dir, max_witness_bytes=size - 1), data)[0] == 413
    assert len(prover.calls) == 1
    assert os.listdir(work_dir) == []


def test_stalled_upload_is_408(make_worker, prover, work_dir, prove, stream, caplog):
    caplog.set_level(logging.INFO, logger="bb_worker.access")
    worker = make_worker(prover, work_dir, upload_timeout=0.2)
    started = time.monotonic()
    code, headers, payload = prove(worker, None, stream=stream(b"\x1f\x8b", stall=10), CONTENT_LENGTH="100")
    assert code == 408
    assert payload["error"] == "Request timeout"
    assert time.monotonic() - started < 3
    assert prover.calls == []
    assert os.listdir(work_dir) == []
    record = access_record(caplog, headers["X-Request-Id"])
    assert (record.outcome, record.fault) == ("upload_timeout", "client")
