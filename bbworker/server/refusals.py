"""gunicorn's refusals, for the app: what a request gunicorn's parser refused (431, 414, 501,
400, ...) or failed on ends with, as a bbworker.errors.Error, and the WSGI environ the app
answers it from (server.worker.GeventWorker.handle_error).
"""
import io
import ssl

from gunicorn import util
from gunicorn.http import errors as http_errors
from gunicorn.http.message import Request
from gunicorn.http.wsgi import base_environ

from bbworker.errors import Error, ProtocolError
from bbworker.server import connection

REFUSED = "bb_worker.refused"  # environ key: the Error a request gunicorn refused ends with
MESSAGE_CHARS = 256  # of gunicorn's message, which may quote the client's bytes

# gunicorn's statuses for what its parser refuses (Worker.handle_error); any other of these is 400.
_CLIENT_ERRORS = (
    http_errors.InvalidRequestLine, http_errors.InvalidRequestMethod, http_errors.InvalidHTTPVersion,
    http_errors.InvalidHeader, http_errors.InvalidHeaderName, http_errors.LimitRequestLine,
    http_errors.LimitRequestHeaders, http_errors.InvalidProxyLine, http_errors.InvalidProxyHeader,
    http_errors.ForbiddenProxyRequest, http_errors.InvalidSchemeHeaders, http_errors.UnsupportedTransferCoding,
    http_errors.ObsoleteFolding, http_errors.ExpectationFailed, http_errors.InvalidH2CPreface, ssl.SSLError,
    http_errors.InvalidChunkSize, http_errors.ChunkMissingTerminator, http_errors.InvalidChunkExtension,
)
_STATUS = (
    (http_errors.LimitRequestLine, 414), (http_errors.LimitRequestHeaders, 431),
    (http_errors.UnsupportedTransferCoding, 501), (http_errors.ExpectationFailed, 417),
    (http_errors.ForbiddenProxyRequest, 403), (ssl.SSLError, 403),
)
_SERVERS = (http_errors.InvalidResponseHeader, http_errors.InvalidResponseHeaderName)  # the app's headers


def refusal(exc):
    """The bbworker.errors.Error a request ends with when gunicorn raised `exc` for it: a
    ProtocolError (gunicorn's status for it) for a client's mistake, else a 500 Error."""
    if isinstance(exc, _CLIENT_ERRORS) and not isinstance(exc, _SERVERS):
        status = next((code for cls, code in _STATUS if isinstance(exc, cls)), 400)
        if isinstance(exc, http_errors.ForbiddenProxyRequest):
            return ProtocolError("request forbidden", status)  # gunicorn does not name the proxy either
        return ProtocolError(str(exc)[:MESSAGE_CHARS], status)
    return Error("unexpected server error")


def parsed_part(exc):
    """The gunicorn Request that raising `exc` interrupted, as far as it was parsed (its method and
    path once the request line was read, its headers once they all were), or None.

    gunicorn hands handle_error no request when parsing failed; the one being built is `self` of
    the frames its parser raised from (or `exc.req`, which some of its errors carry).
    """
    req = getattr(exc, "req", None)
    if isinstance(req, Request):
        return req
    tb = exc.__traceback__
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("self")
        if isinstance(candidate, Request):
            return candidate
        tb = tb.tb_next
    return None


def refused_environ(cfg, req, sock, addr, error, began):
    """A WSGI environ for a request gunicorn refused: what it parsed of `req` (a gunicorn Request or
    None), the client `sock` and `addr`, REFUSED: `error`, and connection.BEGAN: `began` (monotonic s).

    An unknown method or path is "-" (never routed, shown so in the access log); the body is empty.
    """
    environ = base_environ(cfg)
    method = getattr(req, "method", None)
    path = getattr(req, "path", None)
    version = getattr(req, "version", None) or (1, 1)
    environ.update({
        "wsgi.input": io.BytesIO(b""), "wsgi.url_scheme": getattr(req, "scheme", None) or "http",
        "gunicorn.socket": sock, "REQUEST_METHOD": method or "-",
        "PATH_INFO": util.unquote_to_wsgi_str(path) if path is not None else "-",
        "QUERY_STRING": getattr(req, "query", None) or "", "RAW_URI": getattr(req, "uri", None) or "",
        "SCRIPT_NAME": "", "SERVER_PROTOCOL": "HTTP/%d.%d" % tuple(version[:2]),
        REFUSED: error, connection.BEGAN: began,
    })
    try:
        environ["SERVER_NAME"], environ["SERVER_PORT"] = (str(part) for part in sock.getsockname()[:2])
    except (OSError, TypeError, ValueError):  # gone, or a unix socket
        environ["SERVER_NAME"], environ["SERVER_PORT"] = "", ""
    if isinstance(addr, tuple) and len(addr) >= 2:
        environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = str(addr[0]), str(addr[1])
    else:
        environ["REMOTE_ADDR"] = str(addr or "")
    for name, value in getattr(req, "headers", None) or ():
        if name == "CONTENT-TYPE":
            environ["CONTENT_TYPE"] = value
        elif name != "CONTENT-LENGTH":  # the body is not read: the app sees none
            key = "HTTP_" + name.replace("-", "_")
            environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ
