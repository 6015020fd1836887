"""bbworker.server.worker: the deadline for request heads (HeadDeadline), a full worker's drops, gunicorn's refusals
answered by the app, the worker class, stopping(). Real sockets under gevent, gunicorn's own connection loop."""
import logging
import time
import types

import gevent
import gevent.event
import pytest
from gevent import socket as gsocket
from gunicorn.config import Config
from gunicorn.workers import ggevent

from bbworker.errors import ProtocolError
from bbworker.server import connection, refusals, worker
from bbworker.server.worker import GeventWorker, HeadDeadline


def read_head(sock, got):
    """Read until the end of a request head, appending what arrives to `got` (list of bytes)."""
    while b"\r\n\r\n" not in b"".join(got):
        data = sock.recv(100)
        if not data:
            return
        got.append(data)


def test_a_silent_connection_is_dropped_after_the_idle_allowance(pair):
    server, _ = pair
    done = []
    with HeadDeadline(server, idle=0.05, head=60):
        server.recv(100)  # nothing ever comes
        done.append(True)
    assert done == [], "the read was not cut short"


def test_once_a_head_starts_the_rest_has_head_seconds_however_long_the_idle_allowance(pair):
    server, client = pair
    got = []
    with HeadDeadline(server, idle=3600, head=0.05):
        gevent.spawn(client.sendall, b"GE")  # arrives while the handler waits: a trickle, the head never ends
        read_head(server, got)
        got.append(b"finished")
    assert got == [b"GE"]


def test_a_head_begun_before_the_deadline_starts_also_has_head_seconds(pair):
    server, client = pair
    client.sendall(b"GE")  # already there (pipelined after the previous request): the head never ends
    got = []
    with gevent.Timeout(2, False):  # a guard: the head deadline is 0.05 s
        with HeadDeadline(server, idle=3600, head=0.05):
            read_head(server, got)
            got.append(b"finished")
        got.append(b"cut short")
    assert got == [b"GE", b"cut short"]


def test_a_head_read_in_time_is_kept_and_nothing_fires_afterwards(pair):
    server, client = pair
    client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    got = []
    with HeadDeadline(server, idle=0.1, head=0.05) as deadline:
        read_head(server, got)
    assert b"".join(got) == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    gevent.sleep(0.2)  # past both allowances: were they still armed, the Timeout would land here
    assert deadline.watcher.dead and not deadline.active


def test_other_errors_and_other_timeouts_pass_through(pair):
    server, _ = pair
    with pytest.raises(ValueError):
        with HeadDeadline(server, idle=3600, head=3600):
            raise ValueError("the handler's own error")
    other = gevent.Timeout(0.01)
    with pytest.raises(gevent.Timeout) as raised:
        with other:
            with HeadDeadline(server, idle=3600, head=3600):
                gevent.sleep(10)
    assert raised.value is other


@pytest.fixture
def gevent_worker():
    cfg = Config()
    cfg.set("keepalive", 75)
    made = GeventWorker(0, 1, [], None, 30, cfg, logging.getLogger("test.worker"))
    yield made
    made.tmp.close()


def test_the_first_request_of_a_connection_gets_header_timeout_later_ones_keepalive(gevent_worker, pair,
                                                                                    monkeypatch):
    gevent_worker.header_timeout = 2.5  # what post_fork sets (HEADER_TIMEOUT_SECONDS)
    seen = []

    def gunicorn_handle(self, listener, client, addr):  # gunicorn's loop: one timeout_ctx per request head
        seen.extend(self.timeout_ctx() for _ in range(3))
    monkeypatch.setattr(ggevent.GeventWorker, "handle", gunicorn_handle)
    server, _ = pair
    gevent_worker.handle(None, server, ("127.0.0.1", 1))
    assert [(ctx.sock, ctx.idle, ctx.head, ctx.begun) for ctx in seen] == [
        (server, 2.5, 2.5, True), (server, 75, 2.5, False), (server, 75, 2.5, False)]  # the first: from the accept
    assert gevent_worker._clients == {}, "the connection's state outlived it"


def test_stopping_is_true_from_sigterm_on(gevent_worker, monkeypatch):
    monkeypatch.setattr(worker, "_stopping", False)  # restored afterwards: other tests run in this process
    assert worker.stopping() is False
    gevent_worker.handle_exit(15, None)
    assert worker.stopping() is True and gevent_worker.alive is False


def test_a_second_quit_signal_is_ignored(gevent_worker, monkeypatch):
    quits = []
    monkeypatch.setattr(ggevent.GeventWorker, "handle_quit", lambda self, sig, frame: quits.append(sig))
    gevent_worker.handle_quit(2, None)
    gevent_worker.handle_quit(3, None)
    assert quits == [2]


# ---------------------------------------------------------------- socket pairs served by gunicorn's own loop

class RecordingLog:
    """What gunicorn's workers use of their log, recording (level, message) pairs."""

    def __init__(self):
        self.records = []

    def _record(self, level):
        def log(msg, *args, **kwargs):
            self.records.append((level, msg % args if args else msg))
        return log

    def __getattr__(self, level):
        if level in ("debug", "info", "warning", "error", "exception", "critical"):
            return self._record(level)
        raise AttributeError(level)

    def access(self, resp, req, environ, request_time):
        self.records.append(("access", environ.get("PATH_INFO")))

    def messages(self, level):
        return [message for lvl, message in self.records if lvl == level]


LISTENER = types.SimpleNamespace(getsockname=lambda: ("127.0.0.1", 8080))


@pytest.fixture
def serving_worker():
    """serving_worker(app, connections=1000, keepalive=75, header_timeout=10.0) -> a GeventWorker (not
    started) whose wsgi is `app`, with a RecordingLog; its heartbeat file is closed afterwards."""
    made = []

    def make(app, connections=1000, keepalive=75, header_timeout=10.0):
        cfg = Config()
        cfg.set("keepalive", keepalive)
        cfg.set("worker_connections", connections)
        made.append(GeventWorker(0, 1, [], None, 30, cfg, RecordingLog()))
        made[-1].wsgi = app
        made[-1].header_timeout = header_timeout
        return made[-1]
    yield make
    for one in made:
        one.tmp.close()


@pytest.fixture
def connections():
    """open() -> (server side, client side) of a new connected pair of gevent sockets; all closed afterwards."""
    made = []

    def open_pair():
        a, b = gsocket.socketpair()
        made.extend((a, b))
        return a, b
    yield open_pair
    for sock in made:
        sock.close()


def serve(worker_, server_side):
    """Serve one connection as gunicorn's gevent server does (a greenlet per connection)."""
    return gevent.spawn(worker_.handle, LISTENER, server_side, ("127.0.0.1", 5555))


def closed(sock, within=2.0):
    """True when the peer closes `sock` within `within` seconds (EOF, whatever came before it).

    Reads in 50 ms slices: gevent closes a socket's descriptor in a later turn of its loop, which
    a loop with nothing else to wait for may not take (a server's has its one-second tick)."""
    sock.settimeout(0.05)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]


GET = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"


def test_a_full_worker_drops_the_connection_waiting_longest_for_a_head_never_one_in_a_request(connections,
                                                                                               serving_worker):
    release = gevent.event.Event()

    def slow(environ, start_response):
        release.wait()
        return hello(environ, start_response)
    made = serving_worker(slow, connections=3)
    in_request, in_request_client = connections()
    oldest, oldest_client = connections()
    newer, newer_client = connections()
    in_request_client.sendall(GET)
    serve(made, in_request)  # the oldest connection, in a request from now on
    gevent.sleep(0.05)
    serve(made, oldest)
    gevent.sleep(0.05)
    serve(made, newer)  # the third of 3 places: one connection waiting for a head must go
    assert closed(oldest_client), "the connection waiting longest was not dropped"
    assert not closed(newer_client, within=0.2)
    release.set()
    in_request_client.settimeout(2)
    assert in_request_client.recv(65536).startswith(b"HTTP/1.1 200 OK")
    [warning] = made.log.messages("warning")
    assert "all 3 connections (worker_connections) taken: dropped the one waiting longest" in warning


def test_drops_are_logged_once_then_summed(connections, serving_worker):
    made = serving_worker(hello, connections=2)
    made._drops.interval = 0.2
    sides = [connections() for _ in range(4)]
    for server_side, _ in sides:  # each new one drops the one before it
        serve(made, server_side)
        gevent.sleep(0.02)
    assert [closed(client, within=1) for _, client in sides[:3]] == [True, True, True]
    gevent.sleep(0.3)
    warnings = made.log.messages("warning")
    assert len(warnings) == 2 and "dropped the one waiting longest" in warnings[0], warnings
    assert "dropped 2 more waiting on their clients in the last 0.2 s" in warnings[1], warnings
    gevent.sleep(0.3)  # quiet: nothing more to say, and the next drop is logged at once again
    assert len(made.log.messages("warning")) == 2


def test_a_full_worker_with_every_connection_in_a_request_says_so_and_looks_again(connections, serving_worker,
                                                                                  monkeypatch):
    """gevent accepts again only when a connection ends: a worker that found every connection in a
    request when it filled up must look again, or a connection idle later holds its place for its
    whole keep-alive (and one that stops reading its replies, for good)."""
    monkeypatch.setattr(worker, "ROOM_RECHECK_SECONDS", 0.1)
    release = gevent.event.Event()

    def slow(environ, start_response):
        release.wait()
        return hello(environ, start_response)
    made = serving_worker(slow, connections=2)
    pairs = [connections() for _ in range(2)]
    for server_side, client in pairs:
        client.sendall(GET)
        serve(made, server_side)
        gevent.sleep(0.05)
    assert made.log.messages("warning") == [
        "all 2 connections (worker_connections) are in requests: none is accepted until one ends"]
    release.set()  # both answered: each now waits for its next request, idle
    assert any(closed(client, within=1) for _, client in pairs), "the full worker never looked again"


def test_a_full_worker_drops_a_connection_whose_client_reads_no_more_of_its_reply(connections, serving_worker):
    """gunicorn sets no deadline on writes: a client that stops reading would hold its place for ever."""
    def big(environ, start_response):
        start_response("200 OK", [("Content-Length", str(1 << 20))])
        return [b"x" * (1 << 20)]
    made = serving_worker(big, connections=2)
    stuck, stuck_client = connections()
    stuck_client.sendall(GET)  # never read: the 1 MiB reply fills both socket buffers
    serve(made, stuck)
    gevent.sleep(0.1)
    newer, newer_client = connections()
    newer_client.sendall(GET)
    serve(made, newer)  # the second of 2 places: the stuck writer must go
    got = b""
    stuck_client.settimeout(2)
    while True:  # what the buffers held, then the end (a timeout here: the connection was kept)
        part = stuck_client.recv(1 << 20)
        if not part:
            break
        got += part
    assert len(got) < (1 << 20) + 200, "the stuck reply was written whole: nothing was dropped"
    newer_client.settimeout(2)
    assert newer_client.recv(65536).startswith(b"HTTP/1.1 200 OK")
    [warning] = made.log.messages("warning")
    assert "dropped the oldest whose client reads no more of its reply" in warning, warning


def test_a_pipelined_head_left_in_gunicorn_s_buffer_has_head_seconds_not_keepalive(connections, serving_worker):
    made = serving_worker(hello, keepalive=3600, header_timeout=0.1)
    server_side, client = connections()
    client.sendall(GET + b"GE")  # one read brings the request and the start of the next: it never ends
    serve(made, server_side)
    assert closed(client, within=2), "the pipelined head was given the keep-alive allowance"


def test_head_began_is_the_accept_for_a_first_request_then_the_first_byte_of_each(connections, serving_worker):
    seen = []
    made = serving_worker(None)

    def record(environ, start_response):
        seen.append(made.head_began())
        return hello(environ, start_response)
    made.wsgi = record
    server_side, client = connections()
    before_accept = time.monotonic()
    serve(made, server_side)
    gevent.sleep(0.1)
    client.sendall(GET)
    gevent.sleep(0.1)
    before_second = time.monotonic()
    client.sendall(GET[:5])
    gevent.sleep(0.1)
    client.sendall(GET[5:])
    gevent.sleep(0.1)
    assert len(seen) == 2
    assert before_accept <= seen[0] < before_accept + 0.05, "the first request counts from the accept"
    assert before_second <= seen[1] < before_second + 0.05, "the second counts from its first byte"
    assert made.head_began() is None  # outside a connection


# ---------------------------------------------------------------- gunicorn's refusals, answered by the app

def refusing_app(seen):
    """A WSGI app that answers what the app would for a refused request, recording the environ."""
    def app(environ, start_response):
        seen.append(environ)
        error = environ[refusals.REFUSED]
        body = b'{"error":"%s"}' % error.title.encode()
        start_response(f"{error.status} Whatever", [("Content-Type", "application/json"),
                                                    ("Content-Length", str(len(body)))])
        return [body]
    return app


def exchange(made, data, connections):
    """Serve `data` on a new connection; return every byte the worker sent back before closing."""
    server_side, client = connections()
    client.sendall(data)
    served = serve(made, server_side)
    client.settimeout(2)
    got = b""
    while True:
        chunk = client.recv(65536)
        if not chunk:
            break
        got += chunk
    client.close()  # the worker lingers until the client is gone
    served.join(timeout=5)
    assert served.dead
    return got


@pytest.mark.parametrize("data, status, method, path, headers", [
    (b"POST /api/prove HTTP/1.1\r\nOrigin: o\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431, "POST", "/api/prove", {}),
    (b"GET /" + b"p" * 5000 + b" HTTP/1.1\r\n\r\n", 414, "-", "-", {}),
    (b"POST /api/verify HTTP/1.1\r\nOrigin: o\r\nTransfer-Encoding: ,chunked\r\n\r\n", 501, "POST", "/api/verify",
     {"HTTP_ORIGIN": "o", "HTTP_TRANSFER_ENCODING": ",chunked"}),
    (b"POST /api/prove HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\nContent-Type: a/b\r\n\r\n", 400, "POST",
     "/api/prove", {"CONTENT_TYPE": "a/b"}),
    (b"GET /api/health\r\n\r\n", 400, "-", "-", {}),
], ids=["431", "414", "501", "400-two-lengths", "400-request-line"])
def test_a_refused_request_is_answered_by_the_app_with_what_gunicorn_parsed(connections, serving_worker, data, status,
                                                                              method, path, headers):
    seen = []
    made = serving_worker(refusing_app(seen))
    reply = exchange(made, data, connections)
    [environ] = seen
    error = environ[refusals.REFUSED]
    assert isinstance(error, ProtocolError) and (error.status, error.fault) == (status, "client")
    assert (environ["REQUEST_METHOD"], environ["PATH_INFO"]) == (method, path)
    assert {k: v for k, v in environ.items() if k.startswith("HTTP_") or k == "CONTENT_TYPE"} == headers
    assert "CONTENT_LENGTH" not in environ and environ["wsgi.input"].read() == b""
    assert environ["REMOTE_ADDR"] == "127.0.0.1" and environ[connection.BEGAN] <= time.monotonic()
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 %d Whatever" % status and b"Connection: close" in lines
    assert body == b'{"error":"%s"}' % error.title.encode()
    assert made.log.messages("warning") == [] and made.log.messages("exception") == []


def test_an_error_of_ours_is_a_500_and_logged(connections, serving_worker, monkeypatch):
    from gunicorn.http import wsgi

    def broken_create(*args, **kwargs):
        raise wsgi.ConfigurationProblem("the server is set up wrong")
    monkeypatch.setattr(wsgi, "create", broken_create)
    seen = []
    made = serving_worker(refusing_app(seen))
    reply = exchange(made, GET, connections)
    [environ] = seen
    error = environ[refusals.REFUSED]
    assert not isinstance(error, ProtocolError) and (error.status, error.fault) == (500, "server")
    assert (environ["REQUEST_METHOD"], environ["PATH_INFO"]) == ("GET", "/x")
    assert reply.startswith(b"HTTP/1.1 500 Whatever\r\n")
    assert made.log.messages("exception") == ["Error handling request /x"]


def test_greenlet_exit_is_left_to_gunicorn(gevent_worker, monkeypatch):
    handled = []
    monkeypatch.setattr(ggevent.GeventWorker, "handle_error", lambda self, *args: handled.append(args[-1]))
    gevent_worker.wsgi = lambda environ, start_response: pytest.fail("the app was called")
    exit_ = gevent.GreenletExit()
    gevent_worker.handle_error(None, None, ("127.0.0.1", 1), exit_)
    assert handled == [exit_]


def test_a_graceful_stop_closes_idle_keep_alive_connections_only(connections, serving_worker, monkeypatch):
    """SIGTERM: a keep-alive connection waiting for its next request would hold the stopping worker
    up to `keepalive` seconds; it is closed. A new connection keeps its header_timeout, a request
    whose head began arriving is served."""
    monkeypatch.setattr(worker, "_stopping", False)  # restored afterwards: other tests run in this process
    made = serving_worker(hello, keepalive=3600, header_timeout=3600)
    idle, idle_client = connections()
    fresh, fresh_client = connections()
    begun, begun_client = connections()
    for server_side, client in ((idle, idle_client), (begun, begun_client)):
        client.sendall(GET)
        serve(made, server_side)
    serve(made, fresh)
    for client in (idle_client, begun_client):
        client.settimeout(2)
        assert client.recv(65536).startswith(b"HTTP/1.1 200 OK")
    begun_client.sendall(GET[:5])  # the next request has begun
    gevent.sleep(0.05)
    made.handle_exit(15, None)
    assert closed(idle_client, within=1), "the idle keep-alive connection kept the stopping worker"
    assert not closed(fresh_client, within=0.2) and not closed(begun_client, within=0.2)
    begun_client.sendall(GET[5:])
    assert begun_client.recv(65536).startswith(b"HTTP/1.1 200 OK")
