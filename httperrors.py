"""HTTP errors answered as {"error": <title>, "message": <detail>}: one class per status.

Each error carries the headers its status needs (Allow, Retry-After, WWW-Authenticate), as
werkzeug's exceptions do, so callers never assemble header lists.
"""
from http import HTTPStatus


class HTTPError(Exception):
    """An error answered as {"error": title, "message": detail} with status `code`.

    headers: extra response headers, a list of (name, value). extra: more fields
    for the JSON body.
    """
    code = 500
    title = "Internal server error"

    def __init__(self, message, headers=(), extra=None):
        super().__init__(message)
        self.message = message
        self.headers = list(headers)
        self.extra = dict(extra or {})


class BadRequest(HTTPError):
    code, title = 400, "Bad request"


class Unauthorized(HTTPError):
    """401 with the RFC 6750 challenge; `invalid`: a token was sent and refused."""
    code, title = 401, "Unauthorized"

    def __init__(self, message, invalid=False):
        challenge = 'Bearer realm="bb-worker"' + (', error="invalid_token"' if invalid else "")
        super().__init__(message, [("WWW-Authenticate", challenge)])


class NotFound(HTTPError):
    code, title = 404, "Not found"


class MethodNotAllowed(HTTPError):
    """405 with an Allow header; HEAD is allowed wherever GET is."""
    code, title = 405, "Method not allowed"

    def __init__(self, path, allowed):
        allowed = sorted(allowed)
        if "GET" in allowed and "HEAD" not in allowed:
            allowed.append("HEAD")
        super().__init__(f"{path} accepts {', '.join(allowed)}", [("Allow", ", ".join(allowed))])


class RequestTimeout(HTTPError):
    code, title = 408, "Request timeout"


class PayloadTooLarge(HTTPError):
    code, title = 413, "Payload too large"


class ProofFailed(HTTPError):
    code, title = 422, "Proof generation failed"


class ProofUnverified(HTTPError):
    """bb wrote a proof that `bb verify` rejects, without reporting unsatisfied constraints: our fault."""
    code, title = 500, "Proof failed verification"


class ServiceUnavailable(HTTPError):
    """503 with Retry-After: `retry_after` seconds (a whole number, at least 1)."""
    code, title = 503, "Service unavailable"

    def __init__(self, message, retry_after=5):
        super().__init__(message, [("Retry-After", str(max(1, round(retry_after))))])


class ProofTimeout(HTTPError):
    code, title = 504, "Proof generation timed out"


class VerifyTimeout(ProofTimeout):
    """504 of /api/verify: its `bb verify` ran past VERIFY_TIMEOUT_SECONDS."""
    title = "Proof verification timed out"


def status_line(code):
    """"200 OK" etc.; 499 is nginx's "client closed request", which only the access log sees."""
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return f"{code} Client Closed Request"
