"""The WSGI app: the route table, one renderer for replies and errors, and the access log.

Drop-in for the Rust/Axum proving worker: same endpoints, same JSON (docs/api.md).

    POST /api/prove[/<circuit>]   prove.ProveHandler    GET /api/health[/<circuit>]  pages.Pages.health
    POST /api/verify[/<circuit>]  verify.VerifyHandler  GET /api/live                pages.Pages.live
    GET  /api/vk[/<circuit>]      pages.Pages.vk        GET /api/metrics             pages.Pages.metrics
    GET  /api/openapi.json        pages.Pages.openapi_document

Handlers return a service.Reply or raise a bbworker.errors.Error, which App renders as
{"error": title, "message": detail} with the class's status and headers. A request gunicorn
refused (server.refusals.REFUSED in the environ) is rendered, logged and counted the same way.
create_app(settings) builds it all from a bbworker.settings.Settings; building it starts and
writes nothing.
"""
import json
import logging
import time
from http import HTTPStatus

from bbworker import bbrunner
from bbworker.errors import Error, MethodNotAllowed, NotFound, Unauthorized
from bbworker.server import connection, metrics, rundir, scheduler
from bbworker.settings import DEFAULT_CIRCUIT
from bbworker.web import callers
from bbworker.web.admission import ProofQueue, VerifyLimit
from bbworker.web.body import has_body
from bbworker.web.health import Health
from bbworker.web.pages import OPENAPI_PATH, Pages
from bbworker.web.prove import Limits, ProveHandler
from bbworker.web.selfcheck import SelfCheck
from bbworker.web.service import ProverService, Reply, json_reply
from bbworker.web.verify import VerifyHandler
from bbworker.server.refusals import REFUSED
from bbworker.server.worker import stopping

log = logging.getLogger("bb_worker")
access_log = logging.getLogger("bb_worker.access")
CIRCUIT_PREFIXES = ("/api/prove/", "/api/verify/", "/api/vk/", "/api/health/")


class App:
    """The WSGI callable: a thin wrapper (__call__) around dispatch(environ) -> Reply.

    service: service.ProverService. prove, verify: the POST handlers. pages: pages.Pages.
    auth: callers.TokenAuth. cors: callers.CorsPolicy. trusted_proxies: gunicorn's
    forwarded_allow_ips (str), whose X-Forwarded-For names the client in the access log.
    start() (gunicorn's post_worker_init, else the first request) computes the VKs in the
    background: until then /api/health answers 503 "starting".
    """

    def __init__(self, service, prove, verify, pages, auth=None, cors=None, trusted_proxies="127.0.0.1,::1"):
        self.service = service
        self.auth = auth or callers.TokenAuth()
        self.cors = cors or callers.CorsPolicy(None)
        self.trusted_proxies = callers.TrustedProxies(trusted_proxies)
        self.named = sorted(name for name in service.circuits if name != DEFAULT_CIRCUIT)
        # (method, path) -> (handler, args, public): one rule per served circuit, built once.
        # Public handlers need no token; every other one does when tokens are set.
        self.routes = {
            ("GET", "/api/health"): (pages.health, (), True),
            ("GET", "/api/live"): (pages.live, (), True),
            ("GET", "/api/openapi.json"): (pages.openapi_document, (), True),
            ("GET", "/api/metrics"): (pages.metrics, (), False),
        }
        for name in [DEFAULT_CIRCUIT] + self.named:
            suffix = "" if name == DEFAULT_CIRCUIT else f"/{name}"
            self.routes[("GET", f"/api/health{suffix}")] = (pages.health, (name,) if suffix else (), True)
            self.routes[("GET", f"/api/vk{suffix}")] = (pages.vk, (name,), False)
            self.routes[("POST", f"/api/prove{suffix}")] = (prove, (name,), False)
            self.routes[("POST", f"/api/verify{suffix}")] = (verify, (name,), False)
        self.counters = {prove: metrics.PROOFS, verify: metrics.VERIFICATIONS}  # a refused request counts here
        self.endpoints = sorted({p for _, p in self.routes if not p.startswith(CIRCUIT_PREFIXES)})
        if self.named:
            self.endpoints += [f"{prefix}<circuit>" for prefix in sorted(CIRCUIT_PREFIXES)]

    def start(self):
        """Compute missing VKs in the background (service.ProverService.start); idempotent."""
        self.service.start()

    # -- WSGI

    def __call__(self, environ, start_response):
        began = connection.began(environ)  # when the head began arriving: the accept, for a first request
        started = began if began is not None else time.monotonic()
        request_id = callers.request_id(environ)
        environ["bb_worker.request_id"] = request_id
        environ["bb_worker.client"] = callers.client_address(environ, self.trusted_proxies)  # admission's fair shares
        method = environ.get("REQUEST_METHOD", "GET")
        reply = self.dispatch(environ)
        if has_body(environ) and not environ.get("bb_worker.body_read"):
            connection.close_after_reply(environ)  # a refused body is not drained
        headers = [("X-Request-Id", request_id)] + reply.headers
        if reply.status not in (204, 304):  # RFC 9110 8.6: no Content-Length on these
            headers.insert(0, ("Content-Length", str(len(reply.body))))
        if not any(name in ("Access-Control-Allow-Origin", "Vary") for name, _ in reply.headers):
            headers += self.cors.reply_headers(environ)
        if reply.content_type:
            headers.insert(0, ("Content-Type", reply.content_type))
        start_response(status_line(reply.status), headers)
        self.log_access(environ, reply, started)
        return [b""] if method == "HEAD" else [reply.body]

    def dispatch(self, environ):
        """Route one request and run its handler; return its Reply (errors rendered as JSON)."""
        method, path = environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", "") or "/"
        self.start()
        try:
            if REFUSED in environ:
                raise self.refused(environ, method, path)
            if self.cors.is_preflight(method, environ):
                return self.preflight(environ, path)
            handler, args, public = self.match(method, path)
            if not public:
                self.authenticate(environ)
            return handler(environ, *args)
        except Error as exc:
            return self.render(exc)
        except Exception:
            log.exception("request %s: unhandled error", environ["bb_worker.request_id"])
            return self.render(Error("unexpected server error"))

    def refused(self, environ, method, path):
        """The Error of a request gunicorn refused (environ[REFUSED], server.refusals): its outcome and
        fault go to the access line, and when (method, path) routes to a prove or verify handler it
        is counted once in that handler's counter, as the handler would."""
        error = environ[REFUSED]
        environ["bb_worker.outcome"], environ["bb_worker.fault"] = error.outcome, error.fault
        handler, args, _ = self.routes.get((method, path), (None, (), True))
        counter = self.counters.get(handler)
        if counter is not None and error.outcome:
            counter.labels(*args, error.outcome).inc()
        return error

    def render(self, error):
        """The Reply for an Error: {"error": title, "message": detail, ...extra} with its status and headers."""
        payload = {"error": error.title, "message": error.detail, **error.extra}
        if isinstance(error, NotFound) and not error.extra:
            payload["available_endpoints"] = self.endpoints
        return json_reply(error.status, payload, error.headers)

    def match(self, method, path):
        """Return (handler, args, public) for (method, path): a lookup, a 405 scan, else 404."""
        route = self.routes.get(("GET" if method == "HEAD" else method, path))
        if route is not None:
            return route
        allowed = {m for m, p in self.routes if p == path}
        if allowed:
            raise MethodNotAllowed(path, allowed)
        if self.named and path.startswith(CIRCUIT_PREFIXES):
            name = path.split("/", 3)[3]
            raise NotFound(f"no circuit named {name!r}", extra={"available_circuits": self.named})
        raise NotFound(f"no endpoint at {path}")

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

    def log_access(self, environ, reply, started):
        """One access line per request, with the fields as `extra` for LOG_FORMAT=json.

        Never logs Authorization or other headers, only the user agent (at most 256 characters).
        """
        fields = {"request_id": environ["bb_worker.request_id"], "method": environ.get("REQUEST_METHOD", "GET"),
                  "path": environ.get("PATH_INFO", "") or "/", "status": reply.status,
                  "bytes_in": environ.get("bb_worker.bytes_in", 0), "bytes_out": len(reply.body),
                  "duration_ms": round((time.monotonic() - started) * 1000, 1),
                  "bb_exit_code": environ.get("bb_worker.bb_exit_code"),
                  "outcome": environ.get("bb_worker.outcome"), "fault": environ.get("bb_worker.fault"),
                  "client": environ["bb_worker.client"],
                  "user_agent": environ.get("HTTP_USER_AGENT", "")[:256]}
        access_log.info('%s %s %s %d in=%d out=%d ms=%.1f bb=%s outcome=%s fault=%s client=%s ua="%s"',
                        fields["request_id"], fields["method"], printable(fields["path"]), reply.status,
                        fields["bytes_in"], fields["bytes_out"], fields["duration_ms"],
                        "-" if fields["bb_exit_code"] is None else fields["bb_exit_code"],
                        fields["outcome"] or "-", fields["fault"] or "-",
                        printable(fields["client"]), printable(fields["user_agent"]), extra=fields)


def status_line(code):
    """"200 OK" etc.; 499 is nginx's "client closed request", which only the access log sees."""
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return f"{code} Client Closed Request"


def printable(text):
    """`text` with control characters escaped, for a text log line (no forged lines)."""
    return json.dumps(text)[1:-1]


def create_app(settings, work_dir=None):
    """Build the App for `settings` (bbworker.settings.Settings): one bbrunner.BB, one Circuit per
    served circuit, this worker's queue on the scheduler shared by the workers.

    work_dir: the directory for request files (default: rundir.WorkerDir's). Raises OSError when
    a circuit file cannot be read.
    """
    s = settings
    bb = bbrunner.BB(s.bb_binary, s.bb_crs_path, s.prove_timeout_seconds, s.verifier_target, s.bb_memory_limit_mb)
    circuits = {name: bbrunner.Circuit(bb, path, s.vk_cache_dir, verify=s.verify_proofs,
                                       verify_timeout=s.verify_timeout_seconds)
                for name, path in s.circuits.items()}
    # A slot is held for a VK, a proof, its verification and a self-check at most: longer is a leak.
    lease = 4 * s.prove_timeout_seconds + 2 * s.verify_timeout_seconds
    slots = scheduler.Scheduler(s.slots_dir, s.proof_cores, s.max_concurrent_proofs, s.proof_memory_budget_bytes,
                                lease=lease)
    queue = ProofQueue(slots, s.queue_timeout_seconds, s.max_queued_requests, s.max_uploading_requests)
    work_dir = rundir.WorkerDir(s.tmpdir, work_dir)
    selfcheck = SelfCheck(circuits, queue, work_dir)
    health = Health(bb, circuits, work_dir, selfcheck, slots.problems, stopping)
    service = ProverService(circuits, queue, VerifyLimit(s.verify_concurrency), health, selfcheck, work_dir)
    limits = Limits(s.max_body_bytes, s.max_witness_bytes, s.upload_timeout_seconds, s.upload_deadline_seconds)
    with open(OPENAPI_PATH, "rb") as f:
        pages = Pages(service, f.read())
    return App(service, ProveHandler(service, limits, s.proof_response_format), VerifyHandler(service, limits),
               pages, auth=callers.TokenAuth(s.api_tokens, s.api_tokens_file),
               cors=callers.CorsPolicy(s.cors_allow_origins), trusted_proxies=s.forwarded_allow_ips)
