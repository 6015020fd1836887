"""Who is calling: bearer tokens, CORS for browser clients, request ids and client addresses.

- TokenAuth: bearer tokens (RFC 6750) from API_TOKENS (fixed at start) and API_TOKENS_FILE
  (re-read when it changes, so tokens rotate without a restart), compared in constant time
  as SHA-256 digests and never logged.
- CorsPolicy: the Fetch standard's CORS protocol for CORS_ALLOW_ORIGINS (`*` or origins).
  Preflights are answered 204 with the path's methods and the headers a client may send;
  replies carry the origin and expose the headers a client reads.
- request_id(): the client's X-Request-Id when it is up to 128 safe characters, else the
  trace id of a valid W3C `traceparent`, else a fresh uuid4; echoed and logged, never a
  file name. client_address(): the peer, or, behind a trusted proxy (gunicorn's
  `forwarded_allow_ips`), the nearest untrusted address in X-Forwarded-For.
"""
import hashlib
import hmac
import ipaddress
import logging
import re
import uuid

from bbworker import files
from bbworker.settings import parse_tokens

log = logging.getLogger("bb_worker")

# ---------------------------------------------------------------- bearer tokens


def _digest(token):
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class TokenAuth:
    """Which bearer tokens are accepted: `tokens` (iterable of str) plus those in the file at `path`.

    Enabled when either is given (Settings refuses to start with a file that holds no
    token). The file is re-read when it changes (files.stamp); if it cannot be read or
    holds no token, the last tokens read from it stay in force (logged).
    """

    def __init__(self, tokens=(), path=None):
        self.path = path
        self.enabled = bool(path) or bool(list(tokens))
        self._fixed = [_digest(t) for t in tokens]
        self._from_file = []
        self._stamp = None

    def _file_digests(self):
        if not self.path:
            return []
        try:
            stamp = files.stamp(self.path)
            if stamp != self._stamp:
                with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
                    tokens = parse_tokens(f.read())
                self._stamp = stamp
                if tokens:
                    self._from_file = [_digest(t) for t in tokens]
                    log.info("API_TOKENS_FILE: %d tokens loaded", len(self._from_file))
                else:  # half-written, or emptied by mistake: refusing every client would be an outage
                    log.error("API_TOKENS_FILE %s holds no token: keeping the %d tokens read before",
                              self.path, len(self._from_file))
        except OSError as exc:
            if self._stamp != "error":
                log.error("API_TOKENS_FILE %s cannot be read (%s): keeping the %d tokens read before",
                          self.path, exc.strerror, len(self._from_file))
            self._stamp = "error"
        return self._from_file

    def allows(self, authorization):
        """True when the Authorization header value (str or None) carries an accepted bearer token.

        Always True when authentication is not enabled. Every accepted token is
        compared, whichever matches, so the time taken says nothing about which.
        """
        if not self.enabled:
            return True
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return False
        candidate = _digest(token)
        match = False
        for known in self._fixed + self._file_digests():
            match |= hmac.compare_digest(candidate, known)
        return match


# ---------------------------------------------------------------- CORS

ALLOW_HEADERS = ("Content-Type", "Authorization", "Accept", "If-None-Match", "X-Public-Inputs",
                 "X-Request-Id", "traceparent")
EXPOSE_HEADERS = ("X-Public-Inputs", "X-Request-Id", "Retry-After", "ETag", "WWW-Authenticate")
MAX_AGE_SECONDS = 86400  # browsers cap it lower (Chromium: 2 h)


class CorsPolicy:
    """The CORS headers for `origins` ("*" or a set of origins; None turns CORS off)."""

    def __init__(self, origins):
        self.origins = origins

    @property
    def enabled(self):
        return bool(self.origins)

    def _allow_origin(self, origin):
        """The Access-Control-Allow-Origin headers for a request from `origin` (str or None)."""
        if not self.origins or not origin:
            return []
        if self.origins == "*":
            return [("Access-Control-Allow-Origin", "*")]
        if origin.lower() in self.origins:
            return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        return [("Vary", "Origin")]

    def is_preflight(self, method, environ):
        """True for a CORS preflight this policy answers (OPTIONS with Origin and a requested method)."""
        return (self.enabled and method == "OPTIONS" and bool(environ.get("HTTP_ORIGIN"))
                and bool(environ.get("HTTP_ACCESS_CONTROL_REQUEST_METHOD")))

    def preflight(self, environ, allowed_methods):
        """Headers of the 204 answering a preflight for a path that allows `allowed_methods`.

        Without Access-Control-Allow-Origin (an origin not listed, a method the path
        does not allow) the browser refuses the actual request.
        """
        headers = self._allow_origin(environ.get("HTTP_ORIGIN"))
        wanted = environ.get("HTTP_ACCESS_CONTROL_REQUEST_METHOD", "")
        if not any(name == "Access-Control-Allow-Origin" for name, _ in headers) or wanted not in allowed_methods:
            return [h for h in headers if h[0] == "Vary"]
        return headers + [("Access-Control-Allow-Methods", ", ".join(sorted(allowed_methods))),
                          ("Access-Control-Allow-Headers", ", ".join(ALLOW_HEADERS)),
                          ("Access-Control-Max-Age", str(MAX_AGE_SECONDS))]

    def reply_headers(self, environ):
        """Headers added to an actual (non-preflight) reply."""
        headers = self._allow_origin(environ.get("HTTP_ORIGIN"))
        if any(name == "Access-Control-Allow-Origin" for name, _ in headers):
            headers.append(("Access-Control-Expose-Headers", ", ".join(EXPOSE_HEADERS)))
        return headers


# ---------------------------------------------------------------- request ids and client addresses

SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._~:/+=@-]{1,128}")
TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")


def trace_id(traceparent):
    """The trace id (32 lower-case hex digits) of a W3C traceparent header value, or None if invalid."""
    m = TRACEPARENT.fullmatch(traceparent.strip())
    if not m:
        return None
    version, trace, parent, _, rest = m.groups()
    if version == "ff" or (version == "00" and rest) or trace == "0" * 32 or parent == "0" * 16:
        return None
    return trace


def request_id(environ):
    """The id of the request in the WSGI `environ` (str, at most 128 characters)."""
    inbound = environ.get("HTTP_X_REQUEST_ID", "").strip()
    if SAFE_REQUEST_ID.fullmatch(inbound):
        return inbound
    trace = trace_id(environ.get("HTTP_TRACEPARENT", ""))
    return trace or str(uuid.uuid4())


class TrustedProxies:
    """gunicorn's `forwarded_allow_ips` (comma-separated addresses and networks, or `*`) as a predicate."""

    def __init__(self, spec):
        items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
        self.everyone = "*" in items
        self.networks = [ipaddress.ip_network(i, strict=False) for i in items if i != "*"]

    def __contains__(self, address):
        if self.everyone:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.networks)


def client_address(environ, trusted):
    """The client's address (str): REMOTE_ADDR, or from X-Forwarded-For when REMOTE_ADDR is in `trusted`.

    X-Forwarded-For is read right to left (each proxy appends the address it saw),
    skipping trusted proxies; an entry that is not an IP address ends the walk there
    (anything left of it is the client's own claim).
    """
    peer = environ.get("REMOTE_ADDR") or "-"
    forwarded = environ.get("HTTP_X_FORWARDED_FOR", "")
    if not forwarded or peer not in trusted:
        return peer
    address = peer
    for hop in reversed([h.strip() for h in forwarded.split(",")]):
        try:
            address = str(ipaddress.ip_address(hop))
        except ValueError:
            break
        if address not in trusted:
            break
    return address
