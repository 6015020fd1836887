"""The client connection under gunicorn's gevent worker: 100-continue, closing, hang-ups, when a request began.

gunicorn 27.0.1 sends "100 Continue" before the app runs (gunicorn/http/wsgi.py
`create`), so a client is invited to upload a body the app is about to refuse;
after a reply it drains whatever body is left before reading the next request
on the connection; and the app has no way to ask for the connection to close.
The gunicorn hooks `pre_request` and `post_request` below change that; the app
then calls `send_continue` just before it reads a body and `close_after_reply`
when it answers without having read the body. Without the hooks (the WSGI
callable called directly) every function here does nothing.

`began` says when the request's head began arriving (the worker's stamp: the accept for a
connection's first request), from which the access log counts a request's duration.

`watch_hangup` tells a client that is gone from one that only closed its write
side (`shutdown(SHUT_WR)`, what `nc -N` does) and still waits for its reply.
"""
import contextlib
import select
import socket
import ssl

import gevent
import gevent.ssl
from gevent import monkey
from gevent.socket import wait_read

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LINGER_SECONDS = 2.0  # after a refused body: time the client gets to read the reply before the close
RECHECK_SECONDS = 0.25  # how often a readable socket (pipelined bytes, FIN) is looked at again
PROBE_ANSWER_SECONDS = 0.02  # a closed client's reset comes back within a round trip

_poll = monkey.get_original("select", "poll")  # the kernel's poll(2): it reports POLLRDHUP
_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL
_requests = {}  # greenlet serving a request -> its _Request (between the two hooks)
BEGAN = "bb_worker.began"  # environ key of a request the worker answers itself (refused by gunicorn)


class _Request:
    __slots__ = ("req", "expects_continue", "began")

    def __init__(self, req, began):
        self.req = req
        self.expects_continue = req._expected_100_continue
        self.began = began


def _current():
    return _requests.get(gevent.getcurrent())


# ---------------------------------------------------------------- gunicorn hooks

def pre_request(worker, req):
    """gunicorn hook: hold back "100 Continue" until the app reads the body (send_continue); note
    when the request began arriving (the worker's head_began(), when it has one)."""
    head_began = getattr(worker, "head_began", None)
    _requests[gevent.getcurrent()] = _Request(req, head_began() if head_began is not None else None)
    req._expected_100_continue = False  # read by gunicorn.http.wsgi.create, right after this hook


def post_request(worker, req, environ, resp):
    """gunicorn hook: forget the request; after a refused body, linger briefly before the close."""
    state = _requests.pop(gevent.getcurrent(), None)
    sock = environ.get("gunicorn.socket") if environ else None
    if state is None or sock is None or not req.must_close or environ.get("bb_worker.body_read"):
        return
    lingering = getattr(worker, "lingering", None)  # server.worker: a full worker may cut it short
    with lingering() if lingering is not None else contextlib.nullcontext():
        linger(sock)


def linger(sock):
    """Before a close with a reply sent: FIN, then discard what the client still sends, for at most
    LINGER_SECONDS (nginx's lingering close). Raises nothing.

    Closing with unread bytes makes the kernel send RST, which can destroy the reply before the
    client reads it; the client may still be sending a body (or a head) that was refused.
    """
    if isinstance(sock, (ssl.SSLSocket, gevent.ssl.SSLSocket)):
        return  # shutdown() would drop the TLS session; gunicorn just closes
    try:
        sock.shutdown(socket.SHUT_WR)
        with gevent.Timeout(LINGER_SECONDS, False):
            while sock.recv(64 * 1024):  # discarded, never stored
                pass
    except OSError:
        pass


# ---------------------------------------------------------------- for the app

def send_continue(environ):
    """Send the "100 Continue" gunicorn held back, if the client asked for it; at most once."""
    state = _current()
    if state is None or not state.expects_continue:
        return
    state.expects_continue = False
    environ["gunicorn.socket"].sendall(CONTINUE)


def close_after_reply(environ):
    """Close the connection after this reply (with "Connection: close") instead of draining the body.

    Call before start_response. Raises nothing; without the gunicorn hooks it does nothing.
    """
    state = _current()
    if state is not None:
        state.req.must_close = True  # gunicorn's Request.should_close(), read when the headers go out


def began(environ):
    """Monotonic time (s) the request of `environ` began arriving, as the worker saw it; None
    without the gunicorn hooks (the WSGI callable called directly)."""
    if BEGAN in environ:
        return environ[BEGAN]
    state = _current()
    return state.began if state is not None else None


def watch_hangup(sock, http_version, on_hangup):
    """Spawn a greenlet that calls on_hangup() once the client of `sock` is gone.

    sock: the connection (plain or TLS socket; nothing is read from it, so bytes
    a client pipelines stay for gunicorn). http_version: environ["SERVER_PROTOCOL"].
    Gone means an RST or an error on the socket (poll(2) POLLHUP/POLLERR). A FIN
    alone (POLLRDHUP) may be a half-close by a client still waiting: an HTTP/1.1
    client is then sent one more "100 Continue" (RFC 9110 section 15.2: clients
    accept any number of 1xx replies); a client that really closed answers that
    with RST. HTTP/1.0 has no interim replies, so there a FIN counts as gone.
    Returns the greenlet (kill it when the reply is ready), or None without a socket.
    """
    if sock is None:
        return None
    probe = http_version != "HTTP/1.0"

    def watch():
        fd = sock.fileno()
        poller = _poll()
        poller.register(fd, select.POLLIN | select.POLLRDHUP)
        probed = False
        delay = None  # None: wait until readable; then readable stays readable: look again later
        while True:
            if delay is None:
                wait_read(fd)
            else:
                gevent.sleep(delay)
            events = dict(poller.poll(0)).get(fd, 0)
            if events & _GONE:
                break
            if events & select.POLLRDHUP:
                if not probe:
                    break
                if not probed:
                    probed = True
                    try:
                        sock.sendall(CONTINUE)
                    except OSError:
                        break
                    delay = PROBE_ANSWER_SECONDS
                    continue
            delay = RECHECK_SECONDS if events & (select.POLLIN | select.POLLRDHUP) else None
        on_hangup()

    return gevent.spawn(watch)
