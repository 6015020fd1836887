"""The web layer's test harness: stub circuits, the one App builder, a WSGI caller, a wsgi.input.

Shared by tests/web's modules as fixtures (support.py is the one helper *module*; these need
pytest). The App is called directly through wsgiref's validator: no network, no bb.

    make_worker(prover, work_dir, ...) -> App     the one place an App is built (was make_worker)
    stub_circuit(error=..., ...) -> StubCircuit  a bbrunner.Circuit stand-in (`prover`: a default one)
    call(worker, method, path, body) -> (status, headers, body bytes), checked
    prove(worker, body) -> (status, headers, JSON)
    stream(data, error=..., stall=...) -> Stream, a wsgi.input
"""
import json
import os
import uuid
from wsgiref.util import setup_testing_defaults
from wsgiref.validate import validator

import gevent
import pytest

from bbworker import bbrunner
from bbworker.bbrunner import acir
from bbworker.bbrunner.circuit import ProofShape
from bbworker.errors import ProverUnavailable
from bbworker.server import rundir
from bbworker.server.scheduler import Scheduler, SlotTimeout
from bbworker.web.admission import ProofQueue, VerifyLimit
from bbworker.web.app import App
from bbworker.web.health import Health
from bbworker.web.pages import OPENAPI_PATH, Pages
from bbworker.web.prove import Limits, ProveHandler
from bbworker.web.selfcheck import SelfCheck
from bbworker.web.service import ProverService
from bbworker.web.verify import VerifyHandler
from support import CIRCUIT

MiB = 1024 * 1024
ELF_TEXT = "/x/bb: ELF 64-bit LSB executable, x86-64, version 1 (SYSV)"
PROOF = bbrunner.Proof(b"\x00proof\xff", ["0x" + "00" * 31 + "07", "0x" + "ab" * 32])
OWN_PROOF = b"\x01own witness's proof"  # what the stub's self_check "proves"
VK, VK_HASH = b"\x01vk-bytes\x02", bytes(range(32))

with open(CIRCUIT, "rb") as _f:
    PROGRAM = acir.Program.from_json(_f.read())  # the demo circuit: the fixtures' witnesses pass its checks


# ---------------------------------------------------------------- stubs

class StubBB:
    """Stands in for a bbrunner.BB: status() and version() as told, no process."""

    verifier_target = None

    def __init__(self, available=True, version="5.0.0-stub", detail=ELF_TEXT):
        self.available, self._version, self.detail = available, version, detail

    def status(self, wait=None):
        return bbrunner.Status(self.available, self._version if self.available else None, self.detail)

    def version(self):
        if not self.available:
            raise ProverUnavailable(self.detail)
        return self._version


class StubVK:
    """Stands in for a bbrunner.vk.VerificationKey: cached (unless told otherwise), fixed bytes."""

    def __init__(self, cached=True):
        self.present = cached
        self.ensured = 0
        self.error = None

    def cached(self):
        return self.present

    def key(self):
        return "stub"

    def ensure(self, threads=None):
        self.ensured += 1
        self.present = True
        return "/nonexistent/vk"

    def read(self):
        return VK, VK_HASH


class StubCircuit:
    """Stands in for a bbrunner.Circuit: records calls; prove() returns PROOF or raises `error`,
    verify() returns `verdict` or raises `verify_error`; problems() returns `problem_list`;
    self_check() raises `check_error` (default "same": the error prove or verify raise, as a
    server that is really broken would), None: it passes."""

    acir = PROGRAM
    verify_proofs = True

    def __init__(self, error=None, available=True, version="5.0.0-stub", detail=ELF_TEXT, verdict=True,
                 verify_error=None, problems=(), check_error="same"):
        self.bb = StubBB(available, version, detail)
        self.vk = StubVK()
        self.error = error
        self.verdict, self.verify_error = verdict, verify_error
        self.check_error = (error or verify_error) if check_error == "same" else check_error
        self.problem_list = list(problems)
        self.calls = []  # prove() calls
        self.verified = []  # verify() calls: {"proof", "public_inputs", "workdir_entries"}
        self.checks = []  # self_check() calls: {"workdir_entries", "keep_fds", "threads"}
        self.shape = ProofShape(None, None, 64)  # no length pinned, up to 64 public inputs

    @property
    def verifier_target(self):
        return self.bb.verifier_target

    def problems(self):
        return list(self.problem_list)

    def prove(self, witness_path, workdir, keep_fds=(), threads=None):
        with open(witness_path, "rb") as f:
            witness = f.read()
        self.calls.append({"witness": witness, "workdir_entries": os.listdir(workdir), "threads": threads})
        if self.error is not None:
            raise self.error
        return PROOF

    def proof_shape(self):
        return self.shape

    def self_check(self, workdir, keep_fds=(), threads=None):
        self.checks.append({"workdir_entries": os.listdir(workdir), "keep_fds": keep_fds, "threads": threads})
        if self.check_error is not None:
            raise self.check_error
        for name, data in (("proof", OWN_PROOF), ("public_inputs", bytes(32))):  # what bb prove writes
            with open(os.path.join(workdir, name), "wb") as f:
                f.write(data)

    def verify(self, proof_path, public_inputs_path):
        with open(proof_path, "rb") as f, open(public_inputs_path, "rb") as g:
            self.verified.append({"proof": f.read(), "public_inputs": g.read(),
                                  "workdir_entries": sorted(os.listdir(os.path.dirname(proof_path)))})
        if self.verify_error is not None:
            raise self.verify_error
        return self.verdict and self.verified[-1]["proof"] != OWN_PROOF  # 0s rarely satisfy the circuit


class RaisingSlots:
    """A Scheduler whose take() times out at once."""

    state_dir = "/nonexistent/slots"

    def take(self, timeout, peak_key=None):
        raise SlotTimeout(f"no proof slot free within {timeout:g} s")


class Stream:
    """A wsgi.input: serves `data` in reads of at most `size` bytes; counts what was read.

    fail: any read is a test failure (the body must not be read). error: an exception read()
    raises. stall: seconds each read sleeps first.
    """

    def __init__(self, data=b"", fail=False, stall=0.0, error=None):
        self.data, self.fail, self.stall, self.error = data, fail, stall, error
        self.position = 0

    def read(self, size=-1):
        if self.fail:
            raise AssertionError("the body must not be read")
        if self.stall:
            gevent.sleep(self.stall)
        if self.error is not None:
            raise self.error
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


# ---------------------------------------------------------------- the one App builder

with open(OPENAPI_PATH, "rb") as _f:
    OPENAPI = _f.read()


def build_worker(prover, work_dir, slots=None, queue_timeout=0.2, response_format="json", circuits=None,
                 auth=None, cors=None, verify_concurrency=2, **limits):
    """The one place an App is built from its pieces (create_app's shape, with stubs).

    prover: the "default" circuit (a StubCircuit); circuits: more name -> circuit. work_dir:
    the worker's directory for request files (rundir.WorkerDir's path). slots: a Scheduler
    (default: one core, one proof, in work_dir's parent). limits: prove.Limits fields.
    """
    options = {"max_body_bytes": 1 * MiB, "max_witness_bytes": 4 * MiB, "upload_timeout": 5.0}
    options.update(limits)
    parent = os.path.dirname(str(work_dir))
    if slots is None:
        slots = Scheduler(os.path.join(parent, "slots"), 1, 1, 1 << 30)
    every = {"default": prover, **(circuits or {})}
    worker_dir = rundir.WorkerDir(parent, path=str(work_dir))
    queue = ProofQueue(slots, queue_timeout)
    selfcheck = SelfCheck(every, queue, worker_dir)
    service = ProverService(every, queue, VerifyLimit(verify_concurrency),
                            Health(prover.bb, every, worker_dir, selfcheck), selfcheck, worker_dir)
    limits = Limits(**options)
    app = App(service, ProveHandler(service, limits, response_format), VerifyHandler(service, limits),
              Pages(service, OPENAPI), auth=auth, cors=cors)
    return app


# ---------------------------------------------------------------- calling it

def call_app(worker, method, path, body=None, stream=None, content_type="application/json", **environ_extra):
    """Call `worker` through wsgiref's validator; return (status int, headers dict, body bytes).

    Checks what every response carries: a Content-Type of `content_type` (None: none, as on a
    304), a Content-Length equal to the body length (the GET length for HEAD: above 0), a
    uuid4 X-Request-Id unless the request sent an id of its own.
    """
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "", "SCRIPT_NAME": ""}
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
    assert headers.get("Content-Type") == content_type
    if "HTTP_X_REQUEST_ID" not in environ and "HTTP_TRACEPARENT" not in environ:
        assert uuid.UUID(headers["X-Request-Id"]).version == 4
        assert str(uuid.UUID(headers["X-Request-Id"])) == headers["X-Request-Id"]
    if method == "HEAD":
        assert data == b""
        assert int(headers["Content-Length"]) > 0
    elif code in (204, 304):
        assert data == b"" and "Content-Length" not in headers
    else:
        assert headers["Content-Length"] == str(len(data))
        if content_type == "application/json":
            json.loads(data)
    return code, headers, data


def prove_app(worker, body, path="/api/prove", **kw):
    """POST `body` to /api/prove: (status, headers, the JSON reply)."""
    code, headers, data = call_app(worker, "POST", path, body, **kw)
    return code, headers, json.loads(data)


# ---------------------------------------------------------------- fixtures

@pytest.fixture
def work_dir(tmp_path):
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def stub_circuit():
    """StubCircuit, the class: stub_circuit(error=..., available=..., verdict=...) makes one."""
    return StubCircuit


@pytest.fixture
def prover():
    return StubCircuit()


@pytest.fixture
def make_worker():
    """build_worker(prover, work_dir, slots=None, queue_timeout=0.2, ..., **limits) -> App."""
    return build_worker


@pytest.fixture
def worker(prover, work_dir):
    return build_worker(prover, work_dir)


@pytest.fixture
def call():
    """call_app(worker, method, path, body=None, stream=None, content_type=..., **environ)."""
    return call_app


@pytest.fixture
def prove():
    """prove_app(worker, body, path="/api/prove", **call_app keywords) -> (status, headers, JSON)."""
    return prove_app


@pytest.fixture
def stream():
    """Stream, the class: stream(data, fail=False, stall=0.0, error=None) makes a wsgi.input."""
    return Stream


@pytest.fixture
def raising_slots():
    """A Scheduler stand-in whose take() raises SlotTimeout at once."""
    return RaisingSlots()
