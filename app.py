"""bb-worker: a WSGI app that turns a Noir witness into an UltraHonk proof with bb.

Drop-in for the Rust/Axum proving worker: same endpoints, same JSON.

    POST /api/prove[/<circuit>]  gzipped witness -> {"success": true, "proof": <base64>, "publicInputs": [...]}
                                 (or the raw proof when Accept prefers application/octet-stream)
    GET  /api/health[/<circuit>] -> readiness: {"status", "architecture", "bb": {...}, "verifier_target",
                                    "timestamp"[, "reasons"][, "circuits"]}; 503 when a proof cannot succeed
    GET  /api/live               -> liveness: 200 while the process answers
    POST /api/verify[/<circuit>] {"proof": <base64>, "publicInputs": [...]} (or the raw proof with
                                 X-Public-Inputs) -> {"valid": true|false}, by bb verify with the served VK
    GET  /api/vk[/<circuit>]     -> {"vk": <base64>, "vk_hash", "bb_version", "verifier_target", "circuit"}
    GET  /api/metrics            -> Prometheus text format
    GET  /api/openapi.json       -> the OpenAPI 3.1 description of all this (openapi.json)

Errors answer {"error": <title>, "message": <detail>} (httperrors.py). Serve it with
gunicorn and the gevent worker (gunicorn.conf.py). Rooms: App routes and renders;
body reads request bodies within their limits; admission.ProofQueue admits proof
requests and hands out proof slots; health.Health says whether a proof can succeed;
bbrunner runs bb; settings.py holds the config; auth.TokenAuth, cors.CorsPolicy and
correlation (request ids, client addresses) deal with who is calling.
"""
import base64
import errno
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections import namedtuple

import atexit
import contextlib
import functools

import gevent

import bbrunner
import connection
import correlation
import observability
import ownership
import settings
import witness
from admission import Busy, ProofQueue, Scheduler, VerifyLimit
from auth import TokenAuth
from body import (MAX_VERIFY_BODY_BYTES, MemorySink, WitnessSink, has_body, parse_verify_request, read_body,
                  refuse_oversized)
from cors import CorsPolicy
from health import Health
from httperrors import (BadRequest, HTTPError, MethodNotAllowed, NotFound, PayloadTooLarge, ProofFailed,
                        ProofTimeout, ProofUnverified, RequestTimeout, ServiceUnavailable, Unauthorized,
                        VerifyTimeout, status_line)

log = logging.getLogger("bb_worker")
access_log = logging.getLogger("bb_worker.access")

OPENAPI_PATH = os.path.join(settings.APP_DIR, "openapi.json")
# X-Public-Inputs is sent only up to this length (45 public inputs): nginx's default buffer for a
# whole upstream reply head is 4 KiB (proxy_buffer_size). Longer: see App.proof_reply.
PUBLIC_INPUTS_HEADER_BYTES = 3072
CRS_RETRY_AFTER_SECONDS = 30
WARM_UP_MAX_DELAY_SECONDS = 30.0  # longest pause between two attempts to compute a failed VK


# ---------------------------------------------------------------- errors

class ClientGone(Exception):
    """Raised into a request's greenlet when its client closes the connection."""


# bbrunner error -> (the HTTPError answered, its message with {} for bb's reason, the metrics outcome).
# The one place bb failures become statuses; a subclass takes its nearest listed base's row.
# 422 ("rejected") is the witness's fault only; every other row is ours (server-side: Health.breaker).
PROVER_ERRORS = {
    bbrunner.ProverFailed: (ProofFailed, "bb prove failed: {}", "rejected"),
    bbrunner.ProofRejected: (ProofUnverified, "{}", "unverified"),
    bbrunner.ProverOutOfMemory: (HTTPError, "{}", "out_of_memory"),
    bbrunner.ProverTimeout: (ProofTimeout, "{}", "timeout"),
    bbrunner.CrsUnavailable: (functools.partial(ServiceUnavailable, retry_after=CRS_RETRY_AFTER_SECONDS),
                              "the CRS is unavailable: {}", "crs_unavailable"),
    bbrunner.ResourceUnavailable: (ServiceUnavailable, "a server resource failed: {}", "unavailable"),
    bbrunner.ServerFault: (HTTPError, "bb failed: {}", "server_error"),
    bbrunner.ProverUnavailable: (HTTPError, "bb is not available: {}", "unavailable"),
    bbrunner.ProverCrashed: (HTTPError, "bb crashed: {}", "crashed"),
    bbrunner.ProverError: (HTTPError, "bb crashed: {}", "crashed"),
}
# Whose fault an outcome is, for the access log and the breaker (a timeout may be either's).
FAULTS = {"rejected": "client", "timeout": None}  # every other failure: "server"

# A prove or verify request that ended before bb's verdict -> (metrics outcome, whose fault), by
# the error that ended it (its nearest listed base). bb's own failures go through PROVER_ERRORS.
REQUEST_OUTCOMES = {
    ClientGone: ("client_gone", "client"),
    Busy: ("busy", None),
    ProofFailed: ("rejected", "client"),  # the witness checks (witness.py), before bb
    BadRequest: ("bad_request", "client"),
    RequestTimeout: ("upload_timeout", "client"),
    PayloadTooLarge: ("too_large", "client"),
    ServiceUnavailable: ("unavailable", "server"),  # the temp dir, before bb
    Exception: ("server_error", "server"),
}


@contextlib.contextmanager
def accounted(environ, counter, name):
    """Give one prove or verify request of circuit `name` exactly one outcome: in the access log
    (environ's bb_worker.outcome and bb_worker.fault) and counted once in `counter` (a metrics
    counter labelled circuit, outcome). The handler sets the outcome where it knows it (success,
    valid, bb_failed, not_ready); an error that ends the request unset is placed by
    REQUEST_OUTCOMES, and a client that hung up ends it as client_gone whatever came before.
    """
    try:
        yield
    except Exception as exc:
        if isinstance(exc, ClientGone) or "bb_worker.outcome" not in environ:
            for cls in type(exc).__mro__:
                if cls in REQUEST_OUTCOMES:
                    environ["bb_worker.outcome"], environ["bb_worker.fault"] = REQUEST_OUTCOMES[cls]
                    break
        raise
    finally:
        if environ.get("bb_worker.outcome"):
            counter.labels(name, environ["bb_worker.outcome"]).inc()


def prover_error(exc):
    """Map a bbrunner.ProverError to (the HTTPError answered for it, its metrics outcome)."""
    for cls in type(exc).__mro__:
        if cls in PROVER_ERRORS:
            error, message, outcome = PROVER_ERRORS[cls]
            return error(message.format(exc)), outcome
    raise TypeError(f"not a bbrunner.ProverError: {exc!r}")


# ---------------------------------------------------------------- content negotiation

def accept_quality(accept, media_type):
    """q-value (float, 0..1) that an Accept header gives `media_type` ("type/subtype").

    RFC 9110 section 12.5.1: the most specific matching range wins (type/subtype over
    type/* over */*); no Accept header means everything is acceptable (1.0).
    """
    if not accept.strip():
        return 1.0
    kind = media_type.split("/")[0]
    best = (-1, 0.0)
    for item in accept.split(","):
        parts = [p.strip() for p in item.split(";")]
        mrange, q = parts[0].lower(), 1.0
        for param in parts[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    q = 0.0
        specificity = {media_type: 2, f"{kind}/*": 1, "*/*": 0}.get(mrange)
        if specificity is not None and specificity > best[0]:
            best = (specificity, q)
    return best[1]


def wants_binary(accept, default):
    """True when the proof should be sent as raw bytes (application/octet-stream).

    The Accept header decides by q-values; a tie keeps `default` ("json" or "binary").
    """
    binary = accept_quality(accept, "application/octet-stream")
    as_json = accept_quality(accept, "application/json")
    if binary != as_json:
        return binary > as_json
    return default == "binary"


# ---------------------------------------------------------------- the app

Reply = namedtuple("Reply", "status body content_type headers")


def json_reply(status, payload, headers=()):
    """A Reply whose body is `payload` as compact JSON."""
    return Reply(status, json.dumps(payload, separators=(",", ":")).encode(), "application/json", list(headers))


def printable(text):
    """`text` with control characters escaped, for a text log line (no forged lines)."""
    return json.dumps(text)[1:-1]


# witness.WitnessError.status -> the HTTPError answered (bb is not started).
WITNESS_ERRORS = {400: BadRequest, 413: PayloadTooLarge, 422: ProofFailed}


Limits = namedtuple("Limits", "max_body_bytes max_witness_bytes upload_timeout upload_deadline", defaults=(60.0,))
Limits.__doc__ = """Per-request limits: body bytes (compressed), witness bytes (decompressed),
seconds the body may stall (idle), seconds for the whole body. (The deadline of bb verify
is the circuit's: bbrunner.Circuit.verify_timeout.)"""

DEFAULT = "default"  # the circuit at /api/prove and /api/vk (CIRCUIT_PATH); also its metrics label
CIRCUIT_PREFIXES = ("/api/prove/", "/api/verify/", "/api/vk/", "/api/health/")


class App:
    """The WSGI callable: a thin wrapper (__call__) around dispatch(environ) -> Reply.

    circuits: dict name -> bbrunner.Circuit, "default" (served at /api/prove and
    /api/vk) plus named ones (at /api/prove/<name>, /api/vk/<name>), all sharing one
    bbrunner.BB. queue: admission.ProofQueue. work_dir: this worker's private directory
    for per-request witness files and bb output (made mode 0700 when missing). limits:
    Limits. response_format: "json" or "binary", the proof format when Accept does not
    choose. start() (gunicorn's post_worker_init, else the first request) computes
    the VKs in the background: until then /api/health answers 503 "starting".
    """

    def __init__(self, circuits, queue, work_dir, limits, response_format="json", verify_limit=None,
                 auth=None, cors=None, trusted_proxies="127.0.0.1,::1", openapi=b"{}"):
        self.circuits = dict(circuits)
        self.queue = queue
        self.verify_limit = verify_limit or VerifyLimit(2)
        self.auth = auth or TokenAuth()
        self.cors = cors or CorsPolicy(None)
        self.trusted_proxies = correlation.TrustedProxies(trusted_proxies)
        self.openapi = openapi
        self.health = Health(self.circuits[DEFAULT].bb, self.circuits, work_dir, stopping=connection.stopping)
        self.work_dir = work_dir
        self._warm_up = None  # the greenlet computing missing VKs
        self.limits = limits
        self.response_format = response_format
        self.named = sorted(name for name in self.circuits if name != DEFAULT)
        # (method, path) -> (handler, args): one rule per served circuit, built once.
        self.routes = {
            ("GET", "/api/health"): (self.get_health, ()),
            ("GET", "/api/live"): (self.get_live, ()),
            ("GET", "/api/metrics"): (self.metrics, ()),
            ("GET", "/api/openapi.json"): (self.get_openapi, ()),
            ("GET", "/api/vk"): (self.vk, (DEFAULT,)),
            ("POST", "/api/prove"): (self.prove, (DEFAULT,)),
            ("POST", "/api/verify"): (self.verify, (DEFAULT,)),
        }
        self.endpoints = sorted({p for _, p in self.routes})
        for name in self.named:
            self.routes[("GET", f"/api/health/{name}")] = (self.get_health, (name,))
            self.routes[("GET", f"/api/vk/{name}")] = (self.vk, (name,))
            self.routes[("POST", f"/api/prove/{name}")] = (self.prove, (name,))
            self.routes[("POST", f"/api/verify/{name}")] = (self.verify, (name,))
        if self.named:
            self.endpoints += ["/api/health/<circuit>", "/api/prove/<circuit>", "/api/verify/<circuit>",
                               "/api/vk/<circuit>"]
        # Handlers anyone may call; every other route needs a token when tokens are set.
        self.public = {self.get_health, self.get_live, self.get_openapi}

    # -- WSGI

    def __call__(self, environ, start_response):
        started = time.monotonic()
        request_id = correlation.request_id(environ)
        environ["bb_worker.request_id"] = request_id
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "") or "/"
        reply = self.dispatch(environ)
        if has_body(environ) and not environ.get("bb_worker.body_read"):
            connection.close_after_reply(environ)  # a refused body is not drained
        headers = [("X-Request-Id", request_id)] + reply.headers
        if reply.status not in (204, 304):  # RFC 9110 8.6: no Content-Length on these
            headers.insert(0, ("Content-Length", str(len(reply.body))))
        if not any(name == "Access-Control-Allow-Origin" for name, _ in reply.headers):
            headers += self.cors.reply_headers(environ)
        if reply.content_type:
            headers.insert(0, ("Content-Type", reply.content_type))
        start_response(status_line(reply.status), headers)
        self.log_access(environ, request_id, method, path, reply, started,
                        correlation.client_address(environ, self.trusted_proxies))
        return [b""] if method == "HEAD" else [reply.body]

    def dispatch(self, environ):
        """Route one request and run its handler; return its Reply (errors rendered as JSON)."""
        request_id = environ["bb_worker.request_id"]
        method, path = environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", "") or "/"
        self.start()
        try:
            if self.cors.is_preflight(method, environ):
                return self.preflight(environ, path)
            handler, args = self.match(method, path)
            if handler not in self.public:
                self.authenticate(environ)
            return handler(environ, request_id, *args)
        except HTTPError as exc:
            payload = {"error": exc.title, "message": exc.message}
            payload.update(exc.extra)
            if isinstance(exc, NotFound) and not exc.extra:
                payload["available_endpoints"] = self.endpoints
            return json_reply(exc.code, payload, exc.headers)
        except ClientGone:
            return json_reply(499, {"error": "Client closed request", "message": "client disconnected"})
        except Exception:
            log.exception("request %s: unhandled error", request_id)
            return json_reply(500, {"error": HTTPError.title, "message": "unexpected server error"})

    @staticmethod
    def log_access(environ, request_id, method, path, reply, started, client):
        """One access line per request, with the fields as `extra` for LOG_FORMAT=json.

        client: the client's address (correlation.client_address). Never logs
        Authorization or other headers, only the user agent (at most 256 characters).
        """
        fields = {"request_id": request_id, "method": method, "path": path, "status": reply.status,
                  "bytes_in": environ.get("bb_worker.bytes_in", 0), "bytes_out": len(reply.body),
                  "duration_ms": round((time.monotonic() - started) * 1000, 1),
                  "bb_exit_code": environ.get("bb_worker.bb_exit_code"),
                  "outcome": environ.get("bb_worker.outcome"), "fault": environ.get("bb_worker.fault"),
                  "client": client, "user_agent": environ.get("HTTP_USER_AGENT", "")[:256]}
        access_log.info('%s %s %s %d in=%d out=%d ms=%.1f bb=%s outcome=%s fault=%s client=%s ua="%s"',
                        request_id, method, printable(path), reply.status,
                        fields["bytes_in"], fields["bytes_out"], fields["duration_ms"],
                        "-" if fields["bb_exit_code"] is None else fields["bb_exit_code"],
                        fields["outcome"] or "-", fields["fault"] or "-",
                        printable(client), printable(fields["user_agent"]), extra=fields)

    def authenticate(self, environ):
        """Raise Unauthorized (401) unless the request carries an accepted bearer token (when tokens are set)."""
        header = environ.get("HTTP_AUTHORIZATION")
        if not self.auth.allows(header):
            if header:
                raise Unauthorized("the bearer token is not accepted", invalid=True)
            raise Unauthorized("this endpoint needs Authorization: Bearer <token>")

    def preflight(self, environ, path):
        """The 204 answering a CORS preflight for `path` (404 for a path the server does not have)."""
        allowed = {m for m, p in self.routes if p == path}
        if not allowed:
            raise NotFound(f"no endpoint at {path}")
        if "GET" in allowed:
            allowed.add("HEAD")
        return Reply(204, b"", None, self.cors.preflight(environ, allowed))

    def match(self, method, path):
        """Return (handler, args) for (method, path): a lookup, a 405 scan, else 404."""
        lookup = "GET" if method == "HEAD" else method
        route = self.routes.get((lookup, path))
        if route is not None:
            return route
        allowed = {m for m, p in self.routes if p == path}
        if allowed:
            raise MethodNotAllowed(path, allowed)
        if self.named and path.startswith(CIRCUIT_PREFIXES):
            name = path.split("/", 3)[3]
            raise NotFound(f"no circuit named {name!r}", extra={"available_circuits": self.named})
        raise NotFound(f"no endpoint at {path}")

    # -- start-up: the VKs, computed after the port is open

    def start(self):
        """Compute missing VKs in a background greenlet (again whenever one goes missing); idempotent."""
        if self._warm_up is None or self._warm_up.dead:
            if any(not self._vk_ready(c) for c in self.circuits.values()):
                self._warm_up = gevent.spawn(self.warm_up)

    @staticmethod
    def _vk_ready(circuit):
        try:
            return circuit.vk_cached()
        except bbrunner.ProverError:
            return False

    def warm_up(self):
        """Compute every circuit's VK, each on a proof slot; retry failures with a growing pause."""
        delay = 1.0
        while True:
            missing = [(name, c) for name, c in self.circuits.items() if not self._vk_ready(c)]
            if not missing:
                return
            for name, circuit in missing:
                try:
                    self.compute_vk(circuit)
                    log.info("circuit %s: VK ready (bb %s)", name, circuit.version())
                except (bbrunner.ProverError, ServiceUnavailable) as exc:
                    log.error("circuit %s: the verification key could not be computed: %s", name,
                              getattr(exc, "message", exc))
            gevent.sleep(delay)
            delay = min(delay * 2, WARM_UP_MAX_DELAY_SECONDS)

    def compute_vk(self, circuit):
        """circuit.ensure_vk() on a proof slot: `bb write_vk` runs bb like a proof does.

        The slot names no circuit, so write_vk's peak RSS is not taken for a proof's.
        Raises what ProofQueue.slot() and Circuit.ensure_vk() raise.
        """
        with self.queue.slot() as grant:
            circuit.ensure_vk(grant.threads)

    # -- GET /api/health[/<circuit>], GET /api/live

    def get_health(self, environ, request_id, name=None):
        """Readiness: 503 with the reasons whenever a proof (of circuit `name`) cannot succeed."""
        ready, payload = self.health.check()
        if name is not None:
            circuit = payload.get("circuits", {}).get(name, {"ready": ready, "reasons": payload.get("reasons", [])})
            payload.update(circuit=name, status="ok" if circuit["ready"] else payload["status"])
            payload["reasons"] = circuit["reasons"]
            ready = circuit["ready"]
        return json_reply(200 if ready else 503, payload)

    def get_live(self, environ, request_id):
        """Liveness: 200 while this process answers requests."""
        return json_reply(200, self.health.live())

    # -- GET /api/openapi.json

    def get_openapi(self, environ, request_id):
        return Reply(200, self.openapi, "application/json", [("Cache-Control", "no-cache")])

    # -- GET /api/metrics

    def metrics(self, environ, request_id):
        bb = self.circuits[DEFAULT].bb
        status = bb.status()
        if status.available:
            observability.BB_INFO.labels(status.version, bb.verifier_target or "default").set(1)
        body, content_type = observability.render()
        return Reply(200, body, content_type, [])

    # -- GET /api/vk[/<circuit>]

    def vk(self, environ, request_id, name):
        circuit = self.circuits[name]
        self.refuse_unless_ready(environ, name)  # a VK that failed is not computed again per call
        try:
            if not circuit.vk_cached():
                self.compute_vk(circuit)
            vk, vk_hash = circuit.vk_bytes()
            version = circuit.version()
        except bbrunner.ProverError as exc:
            raise self.bb_failed(environ, request_id, exc) from None
        reply = json_reply(200, {"vk": base64.b64encode(vk).decode(), "vk_hash": "0x" + vk_hash.hex(),
                                 "bb_version": version, "verifier_target": circuit.verifier_target,
                                 "circuit": None if name == DEFAULT else name})
        etag = f'"{hashlib.sha256(reply.body).hexdigest()[:32]}"'
        wanted = [t.strip().removeprefix("W/") for t in environ.get("HTTP_IF_NONE_MATCH", "").split(",")]
        if etag in wanted or "*" in wanted:
            return Reply(304, b"", None, [("ETag", etag)])
        return reply._replace(headers=[("ETag", etag), ("Cache-Control", "no-cache")])

    # -- POST /api/prove[/<circuit>]

    def prove(self, environ, request_id, name):
        """Admit, receive the body, wait for a slot, run bb; the steps of README's "How a request flows"."""
        with accounted(environ, observability.PROOFS, name):
            refuse_oversized(environ, self.limits.max_body_bytes)
            self.refuse_unless_ready(environ, name)
            files = uuid.uuid4().hex  # never the request id: clients choose that
            witness = os.path.join(self.work_dir, f"{files}.witness.gz")
            outdir = os.path.join(self.work_dir, f"{files}.out")
            watcher = None
            with self.queue.admit() as ticket:
                try:
                    self.receive(environ, request_id, name, witness, outdir, ticket)
                    ticket.uploaded()
                    watcher = connection.watch_hangup(environ.get("gunicorn.socket"), environ.get("SERVER_PROTOCOL"),
                                                      hangup(gevent.getcurrent()))
                    with self.queue.slot(ticket, self.circuits[name].key()) as grant:
                        result = self.run_bb(environ, request_id, name, witness, outdir, grant)
                finally:
                    remove(witness, outdir)  # first: a ClientGone may still land below
                    if watcher is not None:
                        watcher.kill()  # blocks until it has stopped watching the socket
                        gevent.sleep(0)  # a ClientGone it already sent lands here, not in gunicorn
        return self.proof_reply(environ, result)

    def proof_reply(self, environ, result):
        """The 200 for a bbrunner.Proof: JSON, or the raw proof when Accept prefers it.

        A raw proof carries its public inputs in X-Public-Inputs, comma-separated, up to
        PUBLIC_INPUTS_HEADER_BYTES; past that the reply is the JSON one when Accept
        allows JSON at all, else the raw proof with only X-Public-Inputs-Count.
        """
        accept = environ.get("HTTP_ACCEPT", "")
        if wants_binary(accept, self.response_format):
            header = ",".join(result.public_inputs)
            if len(header) <= PUBLIC_INPUTS_HEADER_BYTES:
                return Reply(200, result.proof, "application/octet-stream", [("X-Public-Inputs", header)])
            if accept_quality(accept, "application/json") == 0:
                return Reply(200, result.proof, "application/octet-stream",
                             [("X-Public-Inputs-Count", str(len(result.public_inputs)))])
        return json_reply(200, {"success": True, "proof": base64.b64encode(result.proof).decode(),
                                "publicInputs": result.public_inputs})

    def refuse_unless_ready(self, environ, name):
        """Raise ServiceUnavailable (503, Retry-After) when readiness says circuit `name` cannot be
        served now (Health.circuit_problems: bb, VK, CRS, temp dir, breaker), before bb runs; the
        outcome "not_ready".
        """
        problems = self.health.circuit_problems(name)
        if problems:
            environ["bb_worker.outcome"], environ["bb_worker.fault"] = "not_ready", "server"
            raise ServiceUnavailable(problems[0], retry_after=self.retry_after(problems))

    def bb_failed(self, environ, request_id, exc):
        """Classify a bbrunner.ProverError (PROVER_ERRORS): set the request's outcome and fault, feed
        the breaker, return the HTTPError to answer."""
        environ["bb_worker.bb_exit_code"] = exc.returncode
        error, outcome = prover_error(exc)
        fault = FAULTS.get(outcome, "server")
        environ["bb_worker.outcome"], environ["bb_worker.fault"] = outcome, fault
        if outcome == "rejected":
            self.health.breaker.success()  # bb and its resources worked: the witness was wrong
        elif fault == "server" and self.health.breaker.failure(
                str(exc), trip=isinstance(exc, bbrunner.CrsUnavailable)):
            log.error("request %s: server-side failures: /api/health answers 503 for a while", request_id)
        return error

    def retry_after(self, problems):
        """Retry-After seconds (int) for a 503 answered because of `problems` (list of str)."""
        if any(p.startswith("CRS") for p in problems):
            return CRS_RETRY_AFTER_SECONDS
        return self.health.breaker.retry_after() if self.health.breaker.open() else 5

    # -- POST /api/verify[/<circuit>]

    def verify(self, environ, request_id, name):
        """bb verify a proof with circuit `name`'s VK: {"valid": bool}. Never takes a proof slot."""
        with accounted(environ, observability.VERIFICATIONS, name):
            valid = self.run_verify(environ, request_id, name)
        return json_reply(200, {"valid": valid})

    def run_verify(self, environ, request_id, name):
        """Receive /api/verify's body and run bb verify on it: True or False (its outcome "valid" or
        "invalid"); bb's failures map as in run_bb, a timeout to VerifyTimeout (504)."""
        sink = MemorySink(MAX_VERIFY_BODY_BYTES)
        refuse_oversized(environ, MAX_VERIFY_BODY_BYTES)
        self.refuse_unless_ready(environ, name)
        read_body(environ, sink, self.limits.upload_timeout, self.limits.upload_deadline)
        environ["bb_worker.bytes_in"] = sink.received
        proof, public_inputs = parse_verify_request(sink.data(), environ.get("CONTENT_TYPE", ""),
                                                    environ.get("HTTP_X_PUBLIC_INPUTS"))
        circuit = self.circuits[name]
        workdir = os.path.join(self.work_dir, f"verify-{uuid.uuid4().hex}")
        try:
            with self.verify_limit.slot():
                if not circuit.vk_cached():  # only after the cache was cleaned: computed at start
                    self.compute_vk(circuit)
                with self.writing_work_dir(request_id):
                    os.mkdir(workdir, 0o700)
                    for file_name, data in (("proof", proof), ("public_inputs", public_inputs)):
                        with open(os.open(os.path.join(workdir, file_name),
                                          os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), "wb") as f:
                            f.write(data)
                valid = circuit.verify(os.path.join(workdir, "proof"), os.path.join(workdir, "public_inputs"))
        except bbrunner.ProverError as exc:
            error = self.bb_failed(environ, request_id, exc)
            log.warning("request %s: verify: %s: %s", request_id, type(exc).__name__, exc)
            if isinstance(error, ProofTimeout):
                error = VerifyTimeout(error.message)
            raise error from None
        finally:
            remove(workdir)
        environ["bb_worker.bb_exit_code"] = 0 if valid else 1
        environ["bb_worker.outcome"] = "valid" if valid else "invalid"
        return valid

    @contextlib.contextmanager
    def writing_work_dir(self, request_id):
        """For the `with` body's writes into the work directory, made again (mode 0700) when gone:
        an OSError is logged and answered 503 "temp dir is not writable" (outcome unavailable)."""
        try:
            ownership.private_dir(self.work_dir)
            yield
        except OSError as exc:
            log.error("request %s: cannot write to %s: %s", request_id, self.work_dir, exc)
            raise ServiceUnavailable(f"temp dir is not writable: {exc.strerror}") from None

    def receive(self, environ, request_id, name, witness_path, outdir, ticket=None):
        """Stream the body to `witness_path`, checked as gzip then as a witness of circuit `name`.

        Creates `outdir` for bb; `ticket` (admission.Ticket) learns the bytes received.
        Raises the 400/408/413/422/503 HTTPErrors; bb is not started.
        """
        circuit = self.circuits[name].acir
        with self.writing_work_dir(request_id):
            os.mkdir(outdir, 0o700)
            sink = WitnessSink(witness_path, self.limits.max_body_bytes, self.limits.max_witness_bytes, circuit)
        if ticket is not None:
            ticket.progress = lambda: sink.received
        try:
            read_body(environ, sink, self.limits.upload_timeout, self.limits.upload_deadline)
            sink.finish()
            if circuit is not None:  # None: the circuit could not be decoded (bbrunner.Circuit.acir_error)
                witness.check_witness(sink.witness, circuit)
        except witness.WitnessError as exc:
            raise WITNESS_ERRORS[exc.status](exc.message) from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ServiceUnavailable("no space left for the witness") from None
            raise
        finally:
            sink.close()
            environ["bb_worker.bytes_in"] = sink.received
            observability.RECEIVED.inc(sink.received)

    def run_bb(self, environ, request_id, name, witness, outdir, grant=None):
        """Prove `witness` with circuit `name`; map failures to their outcome, feed the breaker.

        The caller holds a proof slot; `grant` (a scheduler.Grant) gives bb its thread
        count and the slot's lock descriptors, which bb inherits.
        """
        started = time.monotonic()
        try:
            with observability.IN_FLIGHT.track_inprogress():
                result = self.circuits[name].prove(witness, outdir, keep_fds=grant.fds if grant else (),
                                                   threads=grant.threads if grant else None)
        except bbrunner.ProverError as exc:
            error = self.bb_failed(environ, request_id, exc)
            level = logging.ERROR if isinstance(exc, bbrunner.ProofRejected) else logging.WARNING
            log.log(level, "request %s: %s (%s fault): %s", request_id, type(exc).__name__,
                    environ["bb_worker.fault"], exc)
            raise error from None
        self.health.breaker.success()
        environ["bb_worker.outcome"] = "success"
        environ["bb_worker.bb_exit_code"] = 0
        observability.PROVE_SECONDS.labels(name).observe(time.monotonic() - started)
        return result


def hangup(greenlet):
    """The callback for connection.watch_hangup: raise ClientGone in `greenlet`."""
    return lambda: greenlet.kill(ClientGone, block=False)


def remove(*paths):
    """Remove files and directories, ignoring those already gone."""
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except (FileNotFoundError, NotADirectoryError):
                pass


def worker_dir():
    """This worker's private directory (str): `w<pid>` in the server's run directory.

    gunicorn.conf.py makes the run directory (ownership.ServerDir) and names it in
    the environment; a process started otherwise makes one of its own in TMPDIR,
    removed at exit.
    """
    run_dir = os.environ.get(ownership.RUN_DIR_ENV)
    if not run_dir:
        own = ownership.ServerDir.create(settings.TMPDIR)
        atexit.register(own.remove)
        run_dir = own.path
    return os.path.join(run_dir, f"w{os.getpid()}")


def create_app():
    """Build the App from settings.py: one BB, one Circuit per settings.CIRCUITS entry."""
    bb = bbrunner.BB(**settings.BB_OPTIONS)
    circuits = {name: bbrunner.Circuit(bb, path, settings.VK_CACHE_DIR, verify=settings.VERIFY_PROOFS,
                                       verify_timeout=settings.VERIFY_TIMEOUT_SECONDS)
                for name, path in settings.CIRCUITS.items()}
    slots = Scheduler(settings.SLOTS_DIR, settings.PROOF_CORES, settings.MAX_CONCURRENT_PROOFS,
                      settings.PROOF_MEMORY_BUDGET_BYTES)
    queue = ProofQueue(slots, settings.QUEUE_TIMEOUT_SECONDS, settings.MAX_QUEUED_REQUESTS,
                       settings.MAX_UPLOADING_REQUESTS)
    limits = Limits(settings.MAX_BODY_BYTES, settings.MAX_WITNESS_BYTES, settings.UPLOAD_TIMEOUT_SECONDS,
                    settings.UPLOAD_DEADLINE_SECONDS)
    with open(OPENAPI_PATH, "rb") as f:
        openapi = f.read()
    return App(circuits, queue, worker_dir(), limits, settings.PROOF_RESPONSE_FORMAT,
               verify_limit=VerifyLimit(settings.VERIFY_CONCURRENCY),
               auth=TokenAuth(settings.API_TOKENS, settings.API_TOKENS_FILE),
               cors=CorsPolicy(settings.CORS_ALLOW_ORIGINS), trusted_proxies=settings.FORWARDED_ALLOW_IPS,
               openapi=openapi)


application = create_app()
