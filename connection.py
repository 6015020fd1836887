"""The client connection under gunicorn's gevent worker: 100-continue, closing, hang-ups.

gunicorn 27.0.1 sends "100 Continue" before the app runs (gunicorn/http/wsgi.py
`create`), so a client is invited to upload a body the app is about to refuse;
after a reply it drains whatever body is left before reading the next request
on the connection; and the app has no way to ask for the connection to close.
gunicorn.conf.py installs `pre_request` and `post_request` below as gunicorn
hooks; the app then calls `send_continue` just before it reads a body and
`close_after_reply` when it answers without having read the body. Without the
hooks (the WSGI callable called directly) every function here does nothing.

`watch_hangup` tells a client that is gone from one that only closed its write
side (`shutdown(SHUT_WR)`, what `nc -N` does) and still waits for its reply.

`GeventWorker` (gunicorn.conf.py's worker_class) is gunicorn's gevent worker with
a deadline for request heads: gunicorn bounds the wait for a request line and
headers only by `keepalive`, which behind a load balancer is long (its idle
timeout and more), so a client trickling its headers would hold the connection
that long. It also tells `stopping()` once SIGTERM arrived: gunicorn's worker
closes its listener only at its next one-second tick and serves what it accepts
until then, so readiness says 503 from the signal on.
"""
import select
import socket
import ssl

import gevent
import gevent.ssl
from gevent import monkey
from gevent.socket import wait_read
from gunicorn.workers import ggevent

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LINGER_SECONDS = 2.0  # after a refused body: time the client gets to read the reply before the close
RECHECK_SECONDS = 0.25  # how often a readable socket (pipelined bytes, FIN) is looked at again
PROBE_ANSWER_SECONDS = 0.02  # a closed client's reset comes back within a round trip

_poll = monkey.get_original("select", "poll")  # the kernel's poll(2): it reports POLLRDHUP
_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL
_requests = {}  # greenlet serving a request -> its _Request (between the two hooks)


class _Request:
    __slots__ = ("req", "expects_continue")

    def __init__(self, req):
        self.req = req
        self.expects_continue = req._expected_100_continue


def _current():
    return _requests.get(gevent.getcurrent())


# ---------------------------------------------------------------- gunicorn hooks

def pre_request(worker, req):
    """gunicorn hook: hold back "100 Continue" until the app reads the body (send_continue)."""
    _requests[gevent.getcurrent()] = _Request(req)
    req._expected_100_continue = False  # read by gunicorn.http.wsgi.create, right after this hook


def post_request(worker, req, environ, resp):
    """gunicorn hook: forget the request; after a refused body, linger briefly before the close."""
    state = _requests.pop(gevent.getcurrent(), None)
    sock = environ.get("gunicorn.socket") if environ else None
    if state is None or sock is None or not req.must_close or environ.get("bb_worker.body_read"):
        return
    if isinstance(sock, (ssl.SSLSocket, gevent.ssl.SSLSocket)):
        return  # shutdown() would drop the TLS session; gunicorn just closes
    # The reply is out; the client may still be sending the body we refused. Closing
    # now with unread bytes makes the kernel send RST, which can destroy the reply
    # before the client reads it. Send FIN and discard for a bounded time instead
    # (nginx's lingering close), so the client stops sending and reads the reply.
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


# ---------------------------------------------------------------- the worker

class HeadDeadline:
    """gunicorn's timeout_ctx around reading one request head (request line and headers).

    The connection may stay idle `idle` seconds (gunicorn's keepalive); once the
    first byte of a request arrives, the rest of its head has `head` seconds.
    On expiry gunicorn reads no request (a silent gevent.Timeout, as gunicorn's
    own timeout_ctx) and closes the connection without a reply.
    """

    def __init__(self, sock, idle, head):
        self.sock, self.idle, self.head = sock, idle, head
        self.active = False

    def __enter__(self):
        self.handler = gevent.getcurrent()
        self.timeout = gevent.Timeout(self.idle, False)
        self.timeout.start()
        self.active = True
        self.watcher = gevent.spawn(self._watch)
        return self

    def _watch(self):
        wait_read(self.sock.fileno())  # the next request starts (or the client leaves)
        gevent.sleep(self.head)
        gevent.get_hub().loop.run_callback(self._expire)

    def _expire(self):  # in the hub: the handler may have finished the head meanwhile
        if self.active:
            self.handler.throw(self.timeout)

    def __exit__(self, typ, value, tb):
        self.active = False
        self.watcher.kill(block=False)
        self.timeout.close()
        return value is self.timeout


_stopping = False


def stopping():
    """True once this worker process got SIGTERM (GeventWorker.handle_exit): it finishes the
    requests it has and exits. False in a process that is not a gunicorn worker."""
    return _stopping


class GeventWorker(ggevent.GeventWorker):
    """gunicorn's gevent worker; request heads must arrive within `header_timeout` seconds.

    A new connection's first request must arrive whole within `header_timeout` of the
    accept (nginx's client_header_timeout); later ones may wait `keepalive` seconds to
    begin. Silent connections so cannot hold the worker's places for long.
    """

    header_timeout = 10.0  # gunicorn.conf.py sets HEADER_TIMEOUT_SECONDS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._clients = {}  # handler greenlet -> [its client socket, requests read so far]

    def handle(self, listener, client, addr):
        self._clients[gevent.getcurrent()] = [client, 0]
        try:
            super().handle(listener, client, addr)
        finally:
            self._clients.pop(gevent.getcurrent(), None)

    def handle_exit(self, sig, frame):
        """SIGTERM: graceful stop; stopping() is True from here on."""
        global _stopping
        _stopping = True
        super().handle_exit(sig, frame)

    def handle_quit(self, sig, frame):
        """SIGINT/SIGQUIT: a quick exit, once. Ctrl-C signals the worker and then the master
        signals it again; a second sys.exit() in a new greenlet during interpreter shutdown
        would print "failed with SystemExit" from gevent."""
        if getattr(self, "_quitting", False):
            return
        self._quitting = True
        super().handle_quit(sig, frame)

    def timeout_ctx(self):
        state = self._clients[gevent.getcurrent()]
        idle = self.header_timeout if state[1] == 0 else self.cfg.keepalive
        state[1] += 1
        return HeadDeadline(state[0], idle, self.header_timeout)
