"""bb-worker: a WSGI app that turns a Noir witness into an UltraHonk proof with bb.

Drop-in for the Rust/Axum proving worker: same endpoints, same JSON.

    POST /api/prove    body: gzipped witness -> {"success": true, "proof": <base64>, "publicInputs": [...]}
    GET  /api/health   -> {"status", "architecture", "bb": {...}, "timestamp"}

Errors answer {"error": <title>, "message": <detail>}. Serve it with gunicorn and
the gevent worker (gunicorn.conf.py); bbrunner.py runs bb, settings.py holds the config.
"""
import base64
import json
import logging
import os
import platform
import shutil
import socket
import time
import uuid
import zlib
from datetime import datetime, timezone

import gevent

import bbrunner
import settings

log = logging.getLogger("bb_worker")
access_log = logging.getLogger("bb_worker.access")

CHUNK_BYTES = 64 * 1024


# ---------------------------------------------------------------- HTTP errors

class HTTPError(Exception):
    """An error answered as {"error": title, "message": detail} with status `code`."""
    code = 500
    title = "Internal server error"

    def __init__(self, message, headers=()):
        super().__init__(message)
        self.message = message
        self.headers = list(headers)


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
    """Map a bbrunner.ProverError to the HTTPError answered for it."""
    if isinstance(exc, bbrunner.ProverFailed):
        return ProofFailed(f"bb prove failed: {exc.reason}")
    if isinstance(exc, bbrunner.ProverTimeout):
        return ProofTimeout(str(exc))
    if isinstance(exc, bbrunner.ProverUnavailable):
        return HTTPError(f"bb is not available: {exc}")
    return HTTPError(f"bb crashed: {exc}")


STATUS_TEXT = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
               408: "Request Timeout", 413: "Payload Too Large", 422: "Unprocessable Entity",
               499: "Client Closed Request", 500: "Internal Server Error",
               503: "Service Unavailable", 504: "Gateway Timeout"}


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
        self.file = open(path, "xb")
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
                if self._gzip.eof:  # a further gzip member follows
                    data = self._gzip.unused_data + data
                    self._gzip = zlib.decompressobj(16 + zlib.MAX_WBITS)
                out = self._gzip.decompress(data, CHUNK_BYTES * 4)
                self.inflated += len(out)
                if self.inflated > self.max_witness:
                    raise PayloadTooLarge(f"witness exceeds {self.max_witness} bytes decompressed")
                data = self._gzip.unconsumed_tail
                if self._gzip.eof:
                    data = self._gzip.unused_data + data
                    if data:
                        self._gzip = zlib.decompressobj(16 + zlib.MAX_WBITS)
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


# ---------------------------------------------------------------- the app

class Worker:
    """The WSGI callable: routes requests, proves witnesses with `prover`.

    prover: bbrunner.Prover. slots: bbrunner.ProofSlots shared by all worker
    processes. work_dir: where per-request witness files and bb output live.
    Limits in bytes and seconds as in settings.py.
    """

    def __init__(self, prover, slots, work_dir, max_body_bytes, max_witness_bytes,
                 queue_timeout, upload_timeout):
        self.prover = prover
        self.slots = slots
        self.work_dir = work_dir
        self.max_body_bytes = max_body_bytes
        self.max_witness_bytes = max_witness_bytes
        self.queue_timeout = queue_timeout
        self.upload_timeout = upload_timeout
        self.routes = {
            ("GET", "/api/health"): self.health,
            ("POST", "/api/prove"): self.prove,
        }

    # -- dispatch

    def __call__(self, environ, start_response):
        started = time.monotonic()
        request_id = str(uuid.uuid4())
        environ["bb_worker.request_id"] = request_id
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "") or "/"
        extra = []
        try:
            handler = self.match(method, path)
            status, payload = handler(environ, request_id)
        except HTTPError as exc:
            status, extra = exc.code, exc.headers
            payload = {"error": exc.title, "message": exc.message}
            if isinstance(exc, NotFound):
                payload["available_endpoints"] = sorted({p for _, p in self.routes})
        except ClientGone:
            status, payload = 499, {"error": "Client closed request", "message": "client disconnected"}
        except Exception:
            log.exception("request %s: unhandled error", request_id)
            status, payload = 500, {"error": HTTPError.title, "message": "unexpected server error"}
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                   ("X-Request-Id", request_id)] + extra
        start_response(f"{status} {STATUS_TEXT.get(status, 'Unknown')}", headers)
        access_log.info("%s %s %s %d in=%d ms=%.1f", request_id, method, path, status,
                        environ.get("bb_worker.bytes_in", 0), (time.monotonic() - started) * 1000)
        return [b""] if method == "HEAD" else [body]

    def match(self, method, path):
        """Return the handler for (method, path); raise NotFound or MethodNotAllowed."""
        if method == "HEAD":
            method = "GET"
        handler = self.routes.get((method, path))
        if handler is not None:
            return handler
        allowed = sorted({m for m, p in self.routes if p == path})
        if not allowed:
            raise NotFound(f"no endpoint at {path}")
        if "GET" in allowed:
            allowed.append("HEAD")
        raise MethodNotAllowed(f"{path} accepts {', '.join(allowed)}", [("Allow", ", ".join(allowed))])

    # -- GET /api/health

    def health(self, environ, request_id):
        """Cheap: a stat() of bb, no subprocess (bbrunner.Prover.status caches the version)."""
        available, version, detail = self.prover.status()
        payload = {
            "status": "ok" if available else "unavailable",
            "architecture": platform.machine(),
            "bb": {"available": available, "version": version,
                   "binary_arch": self.prover.binary_arch() if available else detail},
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }
        return (200 if available else 503), payload

    # -- POST /api/prove

    def prove(self, environ, request_id):
        length = environ.get("CONTENT_LENGTH") or ""
        if length.isdigit() and int(length) > self.max_body_bytes:
            raise PayloadTooLarge(f"request body is {length} bytes; the limit is {self.max_body_bytes}")
        witness = os.path.join(self.work_dir, f"{request_id}.witness.gz")
        outdir = os.path.join(self.work_dir, f"{request_id}.out")
        watcher = None
        try:
            try:
                os.makedirs(outdir)
                sink = WitnessSink(witness, self.max_body_bytes, self.max_witness_bytes)
            except OSError as exc:
                log.error("request %s: cannot write to %s: %s", request_id, self.work_dir, exc)
                raise ServiceUnavailable(f"temp dir is not writable: {exc.strerror}",
                                         [("Retry-After", "5")]) from None
            try:
                read_body(environ, sink, self.upload_timeout)
                sink.finish()
            except OSError as exc:
                if exc.errno in (28, 122):  # ENOSPC, EDQUOT
                    raise ServiceUnavailable("no space left for the witness", [("Retry-After", "5")]) from None
                raise
            finally:
                sink.close()
                environ["bb_worker.bytes_in"] = sink.received
            watcher = watch_disconnect(environ.get("gunicorn.socket"), gevent.getcurrent())
            try:
                with self.slots.acquire(self.queue_timeout):
                    result = self.prover.prove(witness, outdir)
            except bbrunner.SlotTimeout:
                raise ServiceUnavailable(
                    f"all proof slots busy for {self.queue_timeout:g} s; retry later",
                    [("Retry-After", str(max(1, round(self.queue_timeout))))]) from None
            except bbrunner.ProverError as exc:
                log.warning("request %s: %s: %s", request_id, type(exc).__name__, exc)
                raise prover_error(exc) from None
        finally:
            remove(witness, outdir)  # first: a ClientGone may still land in the kill below
            if watcher is not None:
                watcher.kill()  # blocks until it has stopped reading the socket
        return 200, {"success": True, "proof": base64.b64encode(result.proof).decode(),
                     "publicInputs": result.public_inputs}


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


def clean_work_dir(work_dir):
    """Empty the per-request temp area (left over after a SIGKILL); create it if missing."""
    os.makedirs(work_dir, exist_ok=True)
    for name in os.listdir(work_dir):
        remove(os.path.join(work_dir, name))


def create_app():
    """Build the Worker from settings.py."""
    prover = bbrunner.Prover(settings.BB_BINARY, settings.CIRCUIT_PATH, settings.VK_CACHE_DIR,
                             crs_dir=settings.BB_CRS_PATH, timeout=settings.PROVE_TIMEOUT_SECONDS,
                             verifier_target=settings.VERIFIER_TARGET)
    slots = bbrunner.ProofSlots(os.path.join(settings.TMPDIR, "bb-worker-slots"),
                                settings.MAX_CONCURRENT_PROOFS)
    os.makedirs(settings.WORK_DIR, exist_ok=True)
    return Worker(prover, slots, settings.WORK_DIR, settings.MAX_BODY_BYTES,
                  settings.MAX_WITNESS_BYTES, settings.QUEUE_TIMEOUT_SECONDS,
                  settings.UPLOAD_TIMEOUT_SECONDS)


application = create_app()
