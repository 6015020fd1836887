"""The one error model: every error a request can end with, and what it means.

Each class carries the HTTP `status` it is answered with, its `title` (the "error" of the
JSON body), the metrics `outcome` it is counted as and whose `fault` it is: "client" (the
request's bytes), "server" (ours) or None (neither: busy, a deadline). The web layer
renders any of them as {"error": title, "message": detail} without looking anything up
(werkzeug's model); the prover raises the bb ones, the web layer the others.
"""


class Error(Exception):
    """An error answered with `status`: {"error": title, "message": detail}.

    message: str, the detail (`prefix` + message is what the client reads). retry_after:
    seconds for a Retry-After header (None: none). headers: more (name, value) pairs.
    extra: more fields for the JSON body. may_be_input: a bb failure of ours by its looks that
    bad input can cause too (bb crashed on it, failed without saying why, wrote no usable
    proof): the web layer's self-check tells which it was.
    """
    status = 500
    title = "Internal server error"
    outcome = "server_error"
    fault = "server"
    prefix = ""
    retry_after = None
    may_be_input = False

    def __init__(self, message, retry_after=None, headers=(), extra=None):
        super().__init__(message)
        self.message = message
        if retry_after is not None:
            self.retry_after = retry_after
        self.extra_headers = list(headers)
        self.extra = dict(extra or {})

    @property
    def detail(self):
        """What the client reads in "message" (str)."""
        return self.prefix + self.message

    @property
    def headers(self):
        """Response headers this error needs (list of (name, value))."""
        if self.retry_after is None:
            return list(self.extra_headers)
        return self.extra_headers + [("Retry-After", str(max(1, round(self.retry_after))))]


# ---------------------------------------------------------------- the request and its client

class BadRequest(Error):
    status, title, outcome, fault = 400, "Bad request", "bad_request", "client"


class Unauthorized(Error):
    """401 with the RFC 6750 challenge; `invalid`: a token was sent and refused."""
    status, title, outcome, fault = 401, "Unauthorized", None, "client"

    def __init__(self, message, invalid=False):
        challenge = 'Bearer realm="bb-worker"' + (', error="invalid_token"' if invalid else "")
        super().__init__(message, headers=[("WWW-Authenticate", challenge)])


class NotFound(Error):
    status, title, outcome, fault = 404, "Not found", None, "client"


class MethodNotAllowed(Error):
    """405 with an Allow header; HEAD is allowed wherever GET is."""
    status, title, outcome, fault = 405, "Method not allowed", None, "client"

    def __init__(self, path, allowed):
        allowed = sorted(allowed)
        if "GET" in allowed and "HEAD" not in allowed:
            allowed.append("HEAD")
        super().__init__(f"{path} accepts {', '.join(allowed)}", headers=[("Allow", ", ".join(allowed))])


class RequestTimeout(Error):
    status, title, outcome, fault = 408, "Request timeout", "upload_timeout", "client"


class UploadTooSlow(RequestTimeout):
    """408: this upload was the slowest when a new proof request needed its place."""


class PayloadTooLarge(Error):
    status, title, outcome, fault = 413, "Payload too large", "too_large", "client"


class ProofFailed(Error):
    """422: the witness's fault only (found before bb, bb named it: ProverFailed, or bb failed on it
    while the server's own witness proves: the self-check)."""
    status, title, outcome, fault = 422, "Proof generation failed", "rejected", "client"


class ProtocolError(BadRequest):
    """A request gunicorn's HTTP parser refused before any route saw it (server.worker), with
    gunicorn's `status` for it (int): 400 (syntax, framing), 403, 414 (request line too long),
    417, 431 (headers too large) or 501 (a transfer coding it does not know); the title is the
    status's, the outcome too_large for 414 and 431."""
    TITLES = {400: "Bad request", 403: "Forbidden", 414: "URI too long", 417: "Expectation failed",
              431: "Request header fields too large", 501: "Not implemented"}

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status
        self.title = self.TITLES.get(status, BadRequest.title)
        if status in (414, 431):
            self.outcome = PayloadTooLarge.outcome


class ClientGone(Error):
    """Raised into a request's greenlet when its client closes the connection (nginx's 499)."""
    status, title, outcome, fault = 499, "Client closed request", "client_gone", "client"

    def __init__(self, message="client disconnected"):
        super().__init__(message)


class ServiceUnavailable(Error):
    """503 with Retry-After: a resource of ours failed, passing (default: retry in 5 s)."""
    status, title, outcome, fault, retry_after = 503, "Service unavailable", "unavailable", "server", 5


class NotReady(ServiceUnavailable):
    """503 before bb runs: readiness says the proof cannot succeed now (/api/health's reasons)."""
    outcome = "not_ready"


class Busy(ServiceUnavailable):
    """503: the queue is full or no proof slot freed up in time; nobody's fault."""
    outcome, fault = "busy", None


# ---------------------------------------------------------------- bb (raised by bbrunner)

class ProverError(Error):
    """Base of what bbrunner raises. `returncode`: bb's exit status where bb ran to the end
    (negative: killed by that signal), else None."""
    outcome, prefix = "crashed", "bb crashed: "
    returncode = None


class ProverUnavailable(ProverError):
    """bb is missing, not executable or cannot start."""
    outcome, prefix = "unavailable", "bb is not available: "


class ProverTimeout(ProverError):
    """bb did not finish within its deadline; its process group was killed."""
    status, title, outcome, fault, prefix = 504, "Proof generation timed out", "timeout", None, ""


class VerifyTimeout(ProverTimeout):
    """504 of /api/verify: its `bb verify` ran past VERIFY_TIMEOUT_SECONDS."""
    title = "Proof verification timed out"


class BBExited(ProverError):
    """bb ran to the end and the outcome is an error. `reason`: one readable line of its output."""

    def __init__(self, returncode, reason):
        super().__init__(reason)
        self.returncode = returncode
        self.reason = reason


class ProverFailed(BBExited):
    """bb rejected the witness: unsatisfied constraints, another circuit's witness."""
    status, title, outcome, fault, prefix = 422, "Proof generation failed", "rejected", "client", "bb prove failed: "


class ProverCrashed(BBExited):
    """bb died from a signal or exited without usable output files (SIGKILL: never the input's)."""
    may_be_input = True


class ServerFault(BBExited):
    """bb failed for a reason of ours, or one we cannot place (a setting bb rejects, an unknown message)."""
    outcome, prefix, may_be_input = "server_error", "bb failed: ", True


class ResourceUnavailable(ServerFault):
    """A resource of ours that bb needs failed: disk space, one of our files. Passing: retry later."""
    status, title, outcome, prefix, retry_after, may_be_input = 503, "Service unavailable", "unavailable", \
        "a server resource failed: ", 5, False


class CrsUnavailable(ResourceUnavailable):
    """bb could not read enough CRS points and tried to download them."""
    outcome, prefix, retry_after = "crs_unavailable", "the CRS is unavailable: ", 30


class ProverOutOfMemory(BBExited):
    """An allocation in bb failed: over `limit_mb` (the memory limit, MiB; None: the host's)."""
    outcome, prefix = "out_of_memory", ""

    def __init__(self, returncode, limit_mb):
        super().__init__(returncode, "bb ran out of memory" + (f" (limit {limit_mb} MiB)" if limit_mb else ""))
        self.limit_mb = limit_mb


class ProofRejected(BBExited):
    """`bb verify` rejected the proof `bb prove` wrote, and bb reported no unsatisfied constraint."""
    title, outcome, prefix, may_be_input = "Proof failed verification", "unverified", "", True


def outcomes():
    """Every metrics outcome an error can give (set of str). Routing errors (401, 404, 405)
    have none: they end a request before it is a proof or a verification."""
    found, todo = set(), [Error]
    while todo:
        cls = todo.pop()
        found.add(cls.outcome)
        todo += cls.__subclasses__()
    return found - {None}
