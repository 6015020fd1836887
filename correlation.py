"""Who sent a request, and under which id: request ids and client addresses for logs and replies.

The id is the client's X-Request-Id when it is up to 128 safe characters, else the
trace id of a valid W3C `traceparent` (Trace Context level 1), else a fresh uuid4.
It is echoed in X-Request-Id and logged; it never names a file (clients choose it).
The client address is the peer's, or, when the peer is a trusted proxy (gunicorn's
`forwarded_allow_ips`), the nearest untrusted address in X-Forwarded-For.
"""
import ipaddress
import re
import uuid

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
