"""bb-worker: a WSGI app that turns a Noir witness into an UltraHonk proof with bb.

Drop-in for the Rust/Axum proving worker: same endpoints, same JSON.

    POST /api/prove[/<circuit>]  gzipped witness -> {"success": true, "proof": <base64>, "publicInputs": [...]}
                                 (or the raw proof when Accept prefers application/octet-stream)
    GET  /api/health             -> {"status", "architecture", "bb": {...}, "verifier_target", "timestamp"}
    GET  /api/vk[/<circuit>]     -> {"vk": <base64>, "vk_hash", "bb_version", "verifier_target", "circuit"}
    GET  /api/metrics            -> Prometheus text format

Errors answer {"error": <title>, "message": <detail>}. Serve it with gunicorn and
the gevent worker (gunicorn.conf.py); bbrunner.py runs bb, settings.py holds the config.
"""
import base64
import errno
import hashlib
import json
import logging
import os
import platform
import shutil
import socket
import time
import uuid
import zlib
from collections import namedtuple
from datetime import datetime, timezone
from http import HTTPStatus

import gevent

import bbrunner
import observability
import settings

log = logging.getLogger("bb_worker")
access_log = logging.getLogger("bb_worker.access")

CHUNK_BYTES = 64 * 1024


# ---------------------------------------------------------------- HTTP errors

class HTTPError(Exception):
    """An error answered as {"error": title, "message": detail} with status `code`."""
    code = 500
    title = "Internal server error"

    def __init__(self, message, headers=(), extra=None):
        super().__init__(message)
        self.message = message
        self.headers = list(headers)
        self.extra = dict(extra or {})  # more fields for the JSON body


class BadRequest(HTTPError):
    code, title = 400, "Bad request"


class NotFound(HTTPError):
    code, title = 404, "Not found"


class MethodNotAllowed(HTTPError):
    code, title = 405, "Method not allowed"


class RequestTimeout(HTTPError):
    code, title = 408, "Request timeout"


class PayloadTooLarge(HTTPError):
    code, title = 413, "Payload too large"


class ProofFailed(HTTPError):
    code, title = 422, "Proof generation failed"


class ServiceUnavailable(HTTPError):
    code, title = 503, "Service unavailable"


class ProofTimeout(HTTPError):
    code, title = 504, "Proof generation timed out"


class ClientGone(Exception):
    """Raised into a request's greenlet when its client closes the connection."""


def prover_error(exc):
    """Map a bbrunner.ProverError to (the HTTPError answered for it, its metrics outcome)."""
    if isinstance(exc, bbrunner.ProverFailed):
        return ProofFailed(f"bb prove failed: {exc.reason}"), "rejected"
    if isinstance(exc, bbrunner.ProverTimeout):
        return ProofTimeout(str(exc)), "timeout"
    if isinstance(exc, bbrunner.ProverUnavailable):
        return HTTPError(f"bb is not available: {exc}"), "unavailable"
    return HTTPError(f"bb crashed: {exc}"), "crashed"


def status_line(code):
    """"200 OK" etc.; 499 is nginx's "client closed request", which only the access log sees."""
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return f"{code} Client Closed Request"


# ---------------------------------------------------------------- request body

class WitnessSink:
    """Write a gzip stream to `path` while checking it, in bounded memory.

    Decompresses as it goes (nothing decompressed is kept) to count the witness
    size: raises PayloadTooLarge past `max_body` compressed or `max_witness`
    decompressed bytes, BadRequest for data that is not gzip or is corrupt.
    Call finish() at the end of the body: it raises BadRequest if the stream is
    empty or truncated.
    """

    def __init__(self, path, max_body, max_witness):
        self.file = open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), "wb")
        self.max_body = max_body
        self.max_witness = max_witness
        self.received = 0
        self.inflated = 0
        self._head = b""
        self._gzip = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def write(self, chunk):
        self.received += len(chunk)
        if self.received > self.max_body:
            raise PayloadTooLarge(f"request body exceeds {self.max_body} bytes")
        if len(self._head) < 2:
            self._head += chunk[:2 - len(self._head)]
            if self._head != b"\x1f\x8b"[:len(self._head)]:
                raise BadRequest("body is not a gzipped witness (no gzip header)")
        self._inflate(chunk)
        self.file.write(chunk)

    def _inflate(self, data):
        try:
            while data:
                out = self._gzip.decompress(data, CHUNK_BYTES * 4)
                self.inflated += len(out)
                if self.inflated > self.max_witness:
                    raise PayloadTooLarge(f"witness exceeds {self.max_witness} bytes decompressed")
                if self._gzip.eof:  # end of a gzip member: whatever follows starts another
                    data = self._gzip.unused_data
                    if data:
                        self._gzip = zlib.decompressobj(16 + zlib.MAX_WBITS)
                else:
                    data = self._gzip.unconsumed_tail
                if out:
                    gevent.sleep(0)  # a gzip bomb must not starve other requests
        except zlib.error as exc:
            raise BadRequest(f"body is not valid gzip: {exc}") from None

    def finish(self):
        self.file.close()
        if self.received == 0:
            raise BadRequest("empty body: send the gzipped witness")
        if not self._gzip.eof:
            raise BadRequest("gzip stream is truncated")

    def close(self):
        self.file.close()


def read_body(environ, sink, idle_timeout):
    """Copy the request body into `sink` in chunks; each read may wait `idle_timeout` seconds."""
    length = environ.get("CONTENT_LENGTH") or ""
    if length and not length.isdigit():
        raise BadRequest("Content-Length is not a number")
    stream = environ["wsgi.input"]
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    remaining = int(length) if length else (None if chunked or environ.get("wsgi.input_terminated") else 0)
    while remaining is None or remaining > 0:
        size = CHUNK_BYTES if remaining is None else min(CHUNK_BYTES, remaining)
        try:
            with gevent.Timeout(idle_timeout, RequestTimeout(f"no body data for {idle_timeout:g} s")):
                chunk = stream.read(size)
        except OSError as exc:  # gunicorn's NoMoreData, bad chunk framing, reset connection
            raise BadRequest(f"request body could not be read: {exc or type(exc).__name__}") from None
        if not chunk:
            break
        if remaining is not None:
            remaining -= len(chunk)
        sink.write(chunk)


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


class Worker:
    """The WSGI callable: routes requests, proves witnesses with `prover`.

    prover: bbrunner.Prover for /api/prove. circuits: optional dict name -> Prover
    served at /api/prove/<name> and /api/vk/<name>. slots: bbrunner.ProofSlots
    shared by all worker processes. work_dir: where per-request witness files and
    bb output live. Limits in bytes and seconds as in settings.py; max_queued: proof
    requests this process holds beyond its proof slots (uploading or waiting).
    response_format: "json" or "binary", the proof format when Accept does not choose.
    """

    def __init__(self, prover, slots, work_dir, max_body_bytes, max_witness_bytes,
                 queue_timeout, upload_timeout, circuits=None, response_format="json", max_queued=16):
        self.prover = prover
        self.circuits = dict(circuits or {})
        self.slots = slots
        self.work_dir = work_dir
        self.max_body_bytes = max_body_bytes
        self.max_witness_bytes = max_witness_bytes
        self.queue_timeout = queue_timeout
        self.upload_timeout = upload_timeout
        self.response_format = response_format
        self.max_queued = max_queued
        self.queued = 0  # proof requests of this process uploading or waiting for a slot
        self.routes = {
            ("GET", "/api/health"): self.health,
            ("GET", "/api/metrics"): self.metrics,
            ("GET", "/api/vk"): self.vk,
            ("POST", "/api/prove"): self.prove,
        }
        self.endpoints = sorted({p for _, p in self.routes})
        if self.circuits:
            self.endpoints += ["/api/prove/<circuit>", "/api/vk/<circuit>"]

    # -- dispatch

    def __call__(self, environ, start_response):
        started = time.monotonic()
        request_id = str(uuid.uuid4())
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "") or "/"
        try:
            handler, args = self.match(method, path)
            reply = handler(environ, request_id, *args)
        except HTTPError as exc:
            payload = {"error": exc.title, "message": exc.message}
            payload.update(exc.extra)
            if isinstance(exc, NotFound) and not exc.extra:
                payload["available_endpoints"] = self.endpoints
            reply = json_reply(exc.code, payload, exc.headers)
        except ClientGone:
            reply = json_reply(499, {"error": "Client closed request", "message": "client disconnected"})
        except Exception:
            log.exception("request %s: unhandled error", request_id)
            reply = json_reply(500, {"error": HTTPError.title, "message": "unexpected server error"})
        headers = [("Content-Length", str(len(reply.body))), ("X-Request-Id", request_id)] + reply.headers
        if reply.content_type:
            headers.insert(0, ("Content-Type", reply.content_type))
        start_response(status_line(reply.status), headers)
        fields = {"request_id": request_id, "method": method, "path": path, "status": reply.status,
                  "bytes_in": environ.get("bb_worker.bytes_in", 0), "bytes_out": len(reply.body),
                  "duration_ms": round((time.monotonic() - started) * 1000, 1),
                  "bb_exit_code": environ.get("bb_worker.bb_exit_code")}
        access_log.info("%s %s %s %d in=%d out=%d ms=%.1f bb=%s", request_id, method, printable(path),
                        reply.status,
                        fields["bytes_in"], fields["bytes_out"], fields["duration_ms"],
                        "-" if fields["bb_exit_code"] is None else fields["bb_exit_code"], extra=fields)
        return [b""] if method == "HEAD" else [reply.body]

    def match(self, method, path):
        """Return (handler, args) for (method, path); raise NotFound or MethodNotAllowed."""
        lookup = "GET" if method == "HEAD" else method
        handler, args = self.routes.get((lookup, path)), ()
        if handler is None and self.circuits:
            for prefix, verb, target in (("/api/prove/", "POST", self.prove), ("/api/vk/", "GET", self.vk)):
                if path.startswith(prefix):
                    name = path[len(prefix):]
                    if name not in self.circuits:  # only names settings.circuit_files() accepted
                        raise NotFound(f"no circuit named {name!r}",
                                       extra={"available_circuits": sorted(self.circuits)})
                    if lookup != verb:
                        self._not_allowed(path, [verb])
                    handler, args = target, (name,)
        if handler is not None:
            return handler, args
        allowed = sorted({m for m, p in self.routes if p == path})
        if not allowed:
            raise NotFound(f"no endpoint at {path}")
        self._not_allowed(path, allowed)

    @staticmethod
    def _not_allowed(path, allowed):
        allowed = allowed + ["HEAD"] if "GET" in allowed else allowed
        raise MethodNotAllowed(f"{path} accepts {', '.join(allowed)}", [("Allow", ", ".join(allowed))])

    def prover_for(self, name):
        return self.prover if name is None else self.circuits[name]

    # -- GET /api/health

    def health(self, environ, request_id):
        """Cheap: a stat() of bb, no subprocess (bbrunner.Prover.status caches the version)."""
        available, version, detail = self.prover.status()  # detail: the ELF description, or why not
        payload = {
            "status": "ok" if available else "unavailable",
            "architecture": platform.machine(),
            "bb": {"available": available, "version": version, "binary_arch": detail},
            "verifier_target": self.prover.verifier_target,
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }
        return json_reply(200 if available else 503, payload)

    # -- GET /api/metrics

    def metrics(self, environ, request_id):
        available, version, _ = self.prover.status()
        if available:
            observability.BB_INFO.labels(version, self.prover.verifier_target or "default").set(1)
        body, content_type = observability.render()
        return Reply(200, body, content_type, [])

    # -- GET /api/vk[/<circuit>]

    def vk(self, environ, request_id, name=None):
        prover = self.prover_for(name)
        try:
            if not prover.vk_cached():  # computing it runs bb: take a proof slot like a proof
                with self.slots.acquire(self.queue_timeout):
                    prover.ensure_vk()
            vk, vk_hash = prover.vk_bytes()
            version = prover.version()
        except bbrunner.SlotTimeout:
            raise self.busy() from None
        except bbrunner.ProverError as exc:
            raise prover_error(exc)[0] from None
        reply = json_reply(200, {"vk": base64.b64encode(vk).decode(), "vk_hash": "0x" + vk_hash.hex(),
                                 "bb_version": version, "verifier_target": prover.verifier_target,
                                 "circuit": name})
        etag = f'"{hashlib.sha256(reply.body).hexdigest()[:32]}"'
        wanted = [t.strip().removeprefix("W/") for t in environ.get("HTTP_IF_NONE_MATCH", "").split(",")]
        if etag in wanted or "*" in wanted:
            return Reply(304, b"", None, [("ETag", etag)])
        return reply._replace(headers=[("ETag", etag), ("Cache-Control", "no-cache")])

    def dequeue(self, environ):
        """This request no longer counts as queued (it got a slot, or it is over)."""
        if environ.pop("bb_worker.queued", False):
            self.queued -= 1

    def busy(self):
        """The 503 for a request that found no proof slot in time."""
        return ServiceUnavailable(f"all proof slots busy for {self.queue_timeout:g} s; retry later",
                                  [("Retry-After", str(max(1, round(self.queue_timeout))))])

    # -- POST /api/prove[/<circuit>]

    def prove(self, environ, request_id, name=None):
        prover = self.prover_for(name)
        circuit = name or "default"
        length = environ.get("CONTENT_LENGTH") or ""
        if length.isdigit() and int(length) > self.max_body_bytes:
            raise PayloadTooLarge(f"request body is {length} bytes; the limit is {self.max_body_bytes}")
        if self.queued >= self.max_queued:
            observability.PROOFS.labels(circuit, "busy").inc()
            raise ServiceUnavailable(f"{self.queued} proof requests already queued; retry later",
                                     [("Retry-After", "1")])
        witness = os.path.join(self.work_dir, f"{request_id}.witness.gz")
        outdir = os.path.join(self.work_dir, f"{request_id}.out")
        watcher = None
        self.queued += 1
        environ["bb_worker.queued"] = True  # until run_prover gets a slot
        try:
            self.receive(environ, request_id, witness, outdir)
            watcher = watch_disconnect(environ.get("gunicorn.socket"), gevent.getcurrent())
            result = self.run_prover(environ, request_id, prover, circuit, witness, outdir)
        except ClientGone:
            observability.PROOFS.labels(circuit, "client_gone").inc()
            raise
        finally:
            self.dequeue(environ)
            remove(witness, outdir)  # first: a ClientGone may still land below
            if watcher is not None:
                watcher.kill()  # blocks until it has stopped reading the socket
                gevent.sleep(0)  # a ClientGone it already sent lands here, not in gunicorn
        if wants_binary(environ.get("HTTP_ACCEPT", ""), self.response_format):
            return Reply(200, result.proof, "application/octet-stream",
                         [("X-Public-Inputs", ",".join(result.public_inputs))])
        return json_reply(200, {"success": True, "proof": base64.b64encode(result.proof).decode(),
                                "publicInputs": result.public_inputs})

    def receive(self, environ, request_id, witness, outdir):
        """Stream the body to `witness`, checked as gzip; create `outdir` for bb."""
        try:
            os.makedirs(self.work_dir, mode=0o700, exist_ok=True)
            os.mkdir(outdir, 0o700)
            sink = WitnessSink(witness, self.max_body_bytes, self.max_witness_bytes)
        except OSError as exc:
            log.error("request %s: cannot write to %s: %s", request_id, self.work_dir, exc)
            raise ServiceUnavailable(f"temp dir is not writable: {exc.strerror}",
                                     [("Retry-After", "5")]) from None
        try:
            read_body(environ, sink, self.upload_timeout)
            sink.finish()
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ServiceUnavailable("no space left for the witness", [("Retry-After", "5")]) from None
            raise
        finally:
            sink.close()
            environ["bb_worker.bytes_in"] = sink.received
            observability.RECEIVED.inc(sink.received)

    def run_prover(self, environ, request_id, prover, circuit, witness, outdir):
        """Wait for a proof slot, run bb; map failures to HTTP errors and count them."""
        queued = time.monotonic()
        try:
            with observability.QUEUED.track_inprogress():
                slot = self.slots.take(self.queue_timeout)
        except bbrunner.SlotTimeout:
            observability.PROOFS.labels(circuit, "busy").inc()
            raise self.busy() from None
        except OSError as exc:
            log.error("request %s: cannot take a proof slot in %s: %s", request_id, self.slots.lock_dir, exc)
            raise ServiceUnavailable(f"cannot take a proof slot: {exc.strerror}", [("Retry-After", "5")]) from None
        self.dequeue(environ)
        observability.QUEUE_SECONDS.observe(time.monotonic() - queued)
        started = time.monotonic()
        try:
            with observability.IN_FLIGHT.track_inprogress():
                result = prover.prove(witness, outdir)
        except bbrunner.ProverError as exc:
            environ["bb_worker.bb_exit_code"] = exc.returncode
            error, outcome = prover_error(exc)
            observability.PROOFS.labels(circuit, outcome).inc()
            log.warning("request %s: %s: %s", request_id, type(exc).__name__, exc)
            raise error from None
        finally:
            self.slots.release(slot)
        environ["bb_worker.bb_exit_code"] = 0
        observability.PROVE_SECONDS.labels(circuit).observe(time.monotonic() - started)
        observability.PROOFS.labels(circuit, "success").inc()
        return result


def watch_disconnect(sock, target):
    """Spawn a greenlet that raises ClientGone in `target` when the peer of `sock` hangs up.

    Peeks (never consumes) so a pipelined next request is left for gunicorn.
    Returns the greenlet, or None when there is no socket (direct WSGI calls).
    """
    if sock is None:
        return None

    def watch():
        try:
            if sock.recv(1, socket.MSG_PEEK):
                return  # more data, not a hang-up
        except OSError:
            pass
        target.kill(ClientGone, block=False)
    return gevent.spawn(watch)


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


def create_app():
    """Build the Worker from settings.py."""
    def make_prover(circuit):
        return bbrunner.Prover(circuit=circuit, **settings.PROVER_OPTIONS)
    circuits = {name: make_prover(path) for name, path in settings.circuit_files().items()}
    return Worker(make_prover(settings.CIRCUIT_PATH), bbrunner.ProofSlots(settings.SLOTS_DIR,
                  settings.MAX_CONCURRENT_PROOFS), settings.WORK_DIR, settings.MAX_BODY_BYTES,
                  settings.MAX_WITNESS_BYTES, settings.QUEUE_TIMEOUT_SECONDS,
                  settings.UPLOAD_TIMEOUT_SECONDS, circuits=circuits,
                  response_format=settings.PROOF_RESPONSE_FORMAT, max_queued=settings.MAX_QUEUED_REQUESTS)


application = create_app()
