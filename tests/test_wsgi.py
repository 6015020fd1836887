"""The WSGI callable called directly (no network, no bb): routing, headers, errors, body checks."""
import base64
import copy
import gzip
import json
import os
import platform
import re
import time
import uuid
import zlib
from datetime import datetime, timezone
from wsgiref.util import setup_testing_defaults
from wsgiref.validate import validator

import gevent
import pytest

import admission
import bbrunner
import body
import witness
from conftest import CIRCUIT, fixture_bytes

MiB = 1024 * 1024
ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
ELF_TEXT = "/x/bb: ELF 64-bit LSB executable, x86-64, version 1 (SYSV)"


@pytest.fixture(scope="module")
def app():
    """The app module (importing it creates no files: temp dirs are made on first use)."""
    import app as module
    return module


# ---------------------------------------------------------------- stubs

class StubCircuit:
    """Stands in for a bbrunner.Circuit and its BB: records calls, returns a proof or raises `error`."""

    verifier_target = None
    acir = witness.Circuit.from_file(CIRCUIT)

    @property
    def bb(self):
        return self

    def __init__(self, error=None, available=True, version="5.0.0-stub", detail=ELF_TEXT):
        self.error = error
        self.available, self.version, self.detail = available, version, detail
        self.calls = []

    def key(self):
        return "stub"

    def prove(self, witness_path, workdir, keep_fds=(), threads=None):
        with open(witness_path, "rb") as f:
            witness = f.read()
        self.calls.append({"witness": witness, "workdir_entries": os.listdir(workdir), "threads": threads})
        if self.error is not None:
            raise self.error
        return bbrunner.Proof(b"\x00proof\xff", ["0x" + "00" * 31 + "07", "0x" + "ab" * 32])

    def status(self):
        return bbrunner.Status(self.available, self.version if self.available else None, self.detail)

    def problems(self):
        return []

    def vk_cached(self):
        return True

    def binary_arch(self):
        return self.detail


class RaisingSlots:
    """A Scheduler whose every way in (acquire(), take()) times out at once."""

    def acquire(self, timeout, circuit=None):
        raise admission.SlotTimeout(f"no proof slot free within {timeout:g} s")

    take = acquire


class Stream:
    """A wsgi.input: serves `data` in reads of at most `size` bytes; counts what was read."""

    def __init__(self, data=b"", fail=False, stall=0.0):
        self.data, self.fail, self.stall = data, fail, stall
        self.position = 0

    def read(self, size=-1):
        if self.fail:
            raise AssertionError("the body must not be read")
        if self.stall:
            gevent.sleep(self.stall)
        end = len(self.data) if size is None or size < 0 else self.position + size
        chunk = self.data[self.position:end]
        self.position += len(chunk)
        return chunk

    def readline(self, size=-1):
        raise AssertionError("readline is not used")

    def readlines(self, hint=-1):
        raise AssertionError("readlines is not used")

    def __iter__(self):
        raise AssertionError("iteration is not used")


def make_worker(app, prover, work_dir, slots=None, queue_timeout=0.2, response_format="json", **limits):
    """The one place an App is built (its constructor may gain keyword arguments)."""
    options = {"max_body_bytes": 1 * MiB, "max_witness_bytes": 4 * MiB, "upload_timeout": 5.0}
    options.update(limits)
    if slots is None:
        slots = admission.Scheduler(os.path.join(os.path.dirname(work_dir), "slots"), 1, 1, 1 << 30)
    queue = admission.ProofQueue(slots, queue_timeout)
    return app.App({"default": prover}, queue, str(work_dir), app.Limits(**options), response_format)


def call(worker, method, path, body=None, stream=None, **environ_extra):
    """Call `worker` through wsgiref's validator; return (status int, headers dict, body bytes).

    Checks what every response must carry: JSON content type, a Content-Length equal
    to the body length (GET length for HEAD), a uuid4 X-Request-Id.
    """
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "",
               "SCRIPT_NAME": ""}
    if body is not None:
        environ["CONTENT_LENGTH"] = str(len(body))
        stream = Stream(body)
    if stream is not None:
        environ["wsgi.input"] = stream
    environ.update(environ_extra)
    setup_testing_defaults(environ)
    seen = {}

    def start_response(status, headers, exc_info=None):
        seen["status"], seen["headers"] = status, headers
        return lambda data: None

    result = validator(worker)(environ, start_response)
    try:
        data = b"".join(result)
    finally:
        result.close()
    code = int(seen["status"].split()[0])
    headers = dict(seen["headers"])
    assert len(headers) == len(seen["headers"]), f"repeated header in {seen['headers']}"
    assert headers["Content-Type"] == "application/json"
    assert uuid.UUID(headers["X-Request-Id"]).version == 4
    assert str(uuid.UUID(headers["X-Request-Id"])) == headers["X-Request-Id"]
    if method == "HEAD":
        assert data == b""
        assert int(headers["Content-Length"]) > 0
    else:
        assert headers["Content-Length"] == str(len(data))
        json.loads(data)
    return code, headers, data


@pytest.fixture
def work_dir(tmp_path):
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def prover():
    return StubCircuit()


@pytest.fixture
def worker(app, prover, work_dir):
    return make_worker(app, prover, work_dir)


def prove(worker, body, **kw):
    code, headers, data = call(worker, "POST", "/api/prove", body, **kw)
    return code, headers, json.loads(data)


# ---------------------------------------------------------------- routing

@pytest.mark.parametrize("path", ["/", "/nope", "/api", "/api/prove/", "/API/health", "/api/health/x"])
def test_unknown_path_is_404_listing_endpoints(worker, path):
    code, headers, data = call(worker, "GET", path)
    assert code == 404
    body = json.loads(data)
    assert body["error"] == "Not found"
    assert path in body["message"]
    endpoints = body["available_endpoints"]
    assert {"/api/health", "/api/prove"} <= set(endpoints)
    assert endpoints == sorted(endpoints) and all(e.startswith("/api/") for e in endpoints)
    assert "Allow" not in headers


@pytest.mark.parametrize("method, path, allow", [
    ("GET", "/api/prove", "POST"), ("HEAD", "/api/prove", "POST"), ("PUT", "/api/prove", "POST"),
    ("DELETE", "/api/prove", "POST"), ("POST", "/api/health", "GET, HEAD"),
    ("PUT", "/api/health", "GET, HEAD"), ("OPTIONS", "/api/health", "GET, HEAD")])
def test_wrong_method_is_405_with_allow(worker, prover, method, path, allow):
    code, headers, data = call(worker, method, path)
    assert code == 405
    assert headers["Allow"] == allow
    if method != "HEAD":
        assert json.loads(data)["error"] == "Method not allowed"
    assert prover.calls == []


def test_head_on_health_has_empty_body_and_the_get_length(worker):
    _, get_headers, _ = call(worker, "GET", "/api/health")
    code, headers, data = call(worker, "HEAD", "/api/health")
    assert code == 200 and data == b""
    assert headers["Content-Length"] == get_headers["Content-Length"]


def test_each_response_has_its_own_request_id(worker):
    ids = {call(worker, "GET", "/api/health")[1]["X-Request-Id"] for _ in range(5)}
    assert len(ids) == 5


# ---------------------------------------------------------------- health

def test_health_reports_the_prover_status(worker):
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


def test_health_is_503_when_bb_is_unavailable(app, work_dir):
    stub = StubCircuit(available=False, detail="/x/bb: No such file or directory")
    code, _, data = call(make_worker(app, stub, work_dir), "GET", "/api/health")
    body = json.loads(data)
    assert code == 503
    assert body["status"] == "unavailable"
    assert body["bb"] == {"available": False, "version": None,
                          "binary_arch": "/x/bb: No such file or directory"}
    assert ISO_Z.match(body["timestamp"])


# ---------------------------------------------------------------- proving

def test_prove_passes_the_exact_body_and_answers_the_proof(worker, prover, work_dir):
    witness = fixture_bytes("valid_1.gz")
    code, _, body = prove(worker, witness)
    assert code == 200, body
    assert body == {"success": True, "proof": base64.b64encode(b"\x00proof\xff").decode(),
                    "publicInputs": ["0x" + "00" * 31 + "07", "0x" + "ab" * 32]}
    assert prover.calls == [{"witness": witness, "workdir_entries": [], "threads": 1}]  # the scheduler's
    assert os.listdir(work_dir) == []


def test_chunked_body_without_content_length_is_read_to_the_end(worker, prover, work_dir):
    witness = fixture_bytes("valid_2.gz")
    code, _, body = prove(worker, None, stream=Stream(witness), HTTP_TRANSFER_ENCODING="chunked")
    assert code == 200, body
    assert prover.calls[0]["witness"] == witness
    assert os.listdir(work_dir) == []


@pytest.mark.parametrize("error, code, title, message", [
    (bbrunner.ProverFailed(1, "Reason : bad witness"), 422, "Proof generation failed",
     "bb prove failed: Reason : bad witness"),
    (bbrunner.ProverTimeout("bb did not finish within 1 s"), 504, "Proof generation timed out",
     "bb did not finish within 1 s"),
    (bbrunner.ProverCrashed(-11, "bb was killed by signal SIGSEGV"), 500, "Internal server error",
     "bb crashed: bb was killed by signal SIGSEGV"),
    (bbrunner.ProverUnavailable("cannot run bb: No such file or directory"), 500, "Internal server error",
     "bb is not available: cannot run bb: No such file or directory"),
    (bbrunner.ProofRejected(1, "proof failed verification: Proof verification failed"), 500,
     "Proof failed verification", "proof failed verification: Proof verification failed"),
    (bbrunner.ProverOutOfMemory(-6, 2048), 500, "Internal server error", "bb ran out of memory (limit 2048 MiB)"),
    (bbrunner.ResourceUnavailable(0, "bb wrote a proof of 4096 bytes, and its file system is full"), 503,
     "Service unavailable", "a server resource failed: bb wrote a proof of 4096 bytes, and its file system is full"),
])
def test_prover_errors_map_to_status_codes(app, work_dir, error, code, title, message):
    stub = StubCircuit(error=error)
    status, headers, body = prove(make_worker(app, stub, work_dir), fixture_bytes("valid_1.gz"))
    assert status == code
    assert body == {"error": title, "message": message}
    assert len(stub.calls) == 1
    assert ("Retry-After" in headers) == (code == 503)
    assert os.listdir(work_dir) == []


def test_readme_names_every_metrics_outcome(app):
    """Each outcome the app can count (PROVER_ERRORS, REQUEST_OUTCOMES, the verdicts) is in the
    README's /api/metrics section, so an operator's alert can be written from it."""
    with open(os.path.join(os.path.dirname(app.__file__), "README.md")) as f:
        text = f.read()
    section = text[text.index("### `GET /api/metrics`"):text.index("### `GET /api/openapi.json`")]
    outcomes = ({outcome for _, _, outcome in app.PROVER_ERRORS.values()}
                | {outcome for outcome, _ in app.REQUEST_OUTCOMES.values()}
                | {"success", "valid", "invalid", "not_ready"})
    assert [o for o in sorted(outcomes) if not re.search(rf"\b{o}\b", section)] == []


def test_busy_slots_are_503_with_retry_after(app, prover, work_dir, tmp_path):
    slots = admission.Scheduler(str(tmp_path / "slots"), 1, 1, 1 << 30)
    worker = make_worker(app, prover, work_dir, slots=slots, queue_timeout=0.3)
    with slots.acquire(1):
        started = time.monotonic()
        code, headers, body = prove(worker, fixture_bytes("valid_1.gz"))
        waited = time.monotonic() - started
    assert code == 503
    assert body["error"] == "Service unavailable"
    assert "retry" in body["message"]
    assert headers["Retry-After"] == "1"
    assert 0.3 <= waited < 3
    assert prover.calls == []
    assert os.listdir(work_dir) == []
    assert prove(worker, fixture_bytes("valid_1.gz"))[0] == 200  # the slot is free again


def test_slot_timeout_retry_after_follows_the_queue_timeout(app, prover, work_dir):
    worker = make_worker(app, prover, work_dir, slots=RaisingSlots(), queue_timeout=7)
    code, headers, _ = prove(worker, fixture_bytes("valid_1.gz"))
    assert code == 503
    assert headers["Retry-After"] == "7"
    assert prover.calls == []


def test_unexpected_exception_is_a_generic_500(app, work_dir, caplog):
    stub = StubCircuit(error=RuntimeError("secret detail /internal/path"))
    code, headers, data = call(make_worker(app, stub, work_dir), "POST", "/api/prove",
                               fixture_bytes("valid_1.gz"))
    assert code == 500
    assert json.loads(data) == {"error": "Internal server error", "message": "unexpected server error"}
    for word in (b"Traceback", b"secret", b"/internal/path", b"RuntimeError"):
        assert word not in data
    assert os.listdir(work_dir) == []
    logged = [r for r in caplog.records if r.exc_info and headers["X-Request-Id"] in r.getMessage()]
    assert logged, "the exception is logged with the request id"


def test_gevent_timeout_is_not_swallowed(app, work_dir):
    stub = StubCircuit(error=gevent.Timeout(1))
    with pytest.raises(gevent.Timeout):
        call(make_worker(app, stub, work_dir), "POST", "/api/prove", fixture_bytes("valid_1.gz"))
    assert os.listdir(work_dir) == []


def test_unwritable_work_dir_is_503(app, prover, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    code, headers, body = prove(make_worker(app, prover, not_a_dir), fixture_bytes("valid_1.gz"))
    assert code == 503
    assert headers["Retry-After"] == "5"
    assert prover.calls == []


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
def test_bad_bodies_are_400_and_never_proved(worker, prover, work_dir, body, words):
    code, _, payload = prove(worker, body)
    assert code == 400
    assert payload["error"] == "Bad request"
    assert words in payload["message"]
    assert prover.calls == []
    assert os.listdir(work_dir) == []


def test_content_length_over_the_limit_is_413_without_reading(worker, prover, work_dir):
    code, _, payload = prove(worker, None, stream=Stream(fail=True), CONTENT_LENGTH=str(MiB + 1))
    assert code == 413
    assert payload["error"] == "Payload too large"
    assert str(MiB) in payload["message"]
    assert prover.calls == []
    assert os.listdir(work_dir) == []


@pytest.mark.parametrize("environ", [{"wsgi.input_terminated": True}, {"HTTP_TRANSFER_ENCODING": "chunked"}],
                         ids=["input-terminated", "chunked"])
def test_body_over_the_limit_without_content_length_is_413(worker, prover, work_dir, environ):
    prover.acir = copy.copy(prover.acir)
    prover.acir.max_witness_bytes = 64 * MiB  # a circuit whose witnesses may be that big
    stream = Stream(gzip.compress(os.urandom(3 * MiB // 2), compresslevel=1))
    code, _, payload = prove(worker, None, stream=stream, **environ)
    assert code == 413
    assert "request body exceeds" in payload["message"]
    assert stream.position <= MiB + 64 * 1024, "reading stops soon after the limit"
    assert prover.calls == []
    assert os.listdir(work_dir) == []


def test_a_lying_content_length_bounds_what_is_read(worker, prover, work_dir):
    data = gzip.compress(os.urandom(3 * MiB // 2), compresslevel=1)
    stream = Stream(data)
    code, _, payload = prove(worker, None, stream=stream, CONTENT_LENGTH="1000")
    assert stream.position == 1000
    assert code == 400 and "truncated" in payload["message"]
    assert prover.calls == []
    assert os.listdir(work_dir) == []


def test_body_exactly_at_the_limit_is_accepted(app, prover, work_dir):
    witness = fixture_bytes("valid_1.gz")
    worker = make_worker(app, prover, work_dir, max_body_bytes=len(witness))
    assert prove(worker, witness)[0] == 200
    code, _, _ = prove(make_worker(app, prover, work_dir, max_body_bytes=len(witness) - 1), witness)
    assert code == 413


def test_gzip_bomb_is_413_and_never_proved(app, prover, work_dir):
    bomb = gzip.compress(bytes(20 * MiB))
    assert len(bomb) < 100 * 1024
    worker = make_worker(app, prover, work_dir, max_witness_bytes=1 * MiB)
    started = time.monotonic()
    code, _, payload = prove(worker, bomb)
    assert code == 413
    assert "decompressed" in payload["message"]
    assert time.monotonic() - started < 5
    assert prover.calls == []
    assert os.listdir(work_dir) == []


def test_witness_size_limit_is_exact(app, prover, work_dir):
    data = fixture_bytes("valid_1.gz")
    size = len(gzip.decompress(data))
    assert prove(make_worker(app, prover, work_dir, max_witness_bytes=size), data)[0] == 200
    assert prove(make_worker(app, prover, work_dir, max_witness_bytes=size - 1), data)[0] == 413
    assert len(prover.calls) == 1
    assert os.listdir(work_dir) == []


def test_stalled_upload_is_408(app, prover, work_dir):
    worker = make_worker(app, prover, work_dir, upload_timeout=0.2)
    started = time.monotonic()
    code, _, payload = prove(worker, None, stream=Stream(b"\x1f\x8b", stall=10), CONTENT_LENGTH="100")
    assert code == 408
    assert payload["error"] == "Request timeout"
    assert time.monotonic() - started < 3
    assert prover.calls == []
    assert os.listdir(work_dir) == []


@pytest.mark.parametrize("split", [1, 10, None])
def test_multi_member_gzip_is_rewritten_as_one_for_bb(app, tmp_path, split):
    """bb reads only the first gzip member (checked with bb 5): it gets the whole checked witness as one."""
    a, b = gzip.compress(b"first" * 100), gzip.compress(b"second" * 100)
    data = a + b
    sink = body.WitnessSink(str(tmp_path / "w.gz"), 10_000, 10_000)
    cut = len(a) if split is None else split  # None: the chunk ends exactly at the member boundary
    sink.write(data[:cut])
    sink.write(data[cut:])
    sink.finish()
    assert sink.inflated == 1100 and sink.witness == b"first" * 100 + b"second" * 100
    written = (tmp_path / "w.gz").read_bytes()
    assert zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(written) == sink.witness  # in its first member


@pytest.mark.parametrize("split", [1, 10, 100])
def test_one_member_in_any_chunks_is_kept_whole(app, tmp_path, split):
    data = fixture_bytes("valid_1.gz")
    sink = body.WitnessSink(str(tmp_path / "w.gz"), 100_000, 100_000)
    for i in range(0, len(data), split):
        sink.write(data[i:i + split])
    sink.finish()
    assert sink.witness == gzip.decompress(data)
    assert (tmp_path / "w.gz").read_bytes() == data


def test_garbage_after_a_gzip_member_is_400(app, tmp_path):
    sink = body.WitnessSink(str(tmp_path / "w.gz"), 10_000, 10_000)
    with pytest.raises(app.BadRequest, match="not valid gzip"):
        sink.write(gzip.compress(b"x" * 100) + b"garbage!")
    sink.close()
