"""bbworker.server.connection: 100-continue on demand, closing after a refused body, telling hang-ups from
half-closes. Real sockets under gevent; gunicorn's Request is a stand-in with the two attributes used."""
import select
import socket
import types

import gevent
import pytest
from gevent import socket as gsocket
from gevent.event import Event

from bbworker.server import connection
from bbworker.server.connection import CONTINUE


def fake_request(expects_continue):
    """What the hooks use of gunicorn's Request."""
    return types.SimpleNamespace(_expected_100_continue=expects_continue, must_close=False)


def pending(sock):
    """The bytes waiting on `sock` now (b"" when none, or at the end), without waiting."""
    if not select.select([sock], [], [], 0)[0]:
        return b""
    return sock.recv(65536)


# ---------------------------------------------------------------- without the gunicorn hooks

def test_without_the_hooks_send_continue_and_close_after_reply_do_nothing(pair):
    server, client = pair
    environ = {"gunicorn.socket": server}
    connection.send_continue(environ)
    connection.close_after_reply(environ)
    connection.send_continue({})  # no socket at all: still nothing to do
    assert pending(client) == b""


# ---------------------------------------------------------------- with the hooks (one request's life)

def test_continue_is_held_back_until_the_app_reads_the_body_and_sent_once(pair):
    server, client = pair
    req = fake_request(expects_continue=True)
    connection.pre_request(None, req)
    try:
        assert req._expected_100_continue is False, "gunicorn would send 100 Continue itself"
        assert pending(client) == b""
        environ = {"gunicorn.socket": server}
        connection.send_continue(environ)
        connection.send_continue(environ)
        assert pending(client) == CONTINUE
    finally:
        connection.post_request(None, req, {"gunicorn.socket": server, "bb_worker.body_read": True}, None)
    connection.send_continue({"gunicorn.socket": server})  # the request is over: forgotten
    assert pending(client) == b""


def test_no_continue_for_a_client_that_did_not_ask(pair):
    server, client = pair
    req = fake_request(expects_continue=False)
    connection.pre_request(None, req)
    connection.send_continue({"gunicorn.socket": server})
    connection.post_request(None, req, {"gunicorn.socket": server, "bb_worker.body_read": True}, None)
    assert pending(client) == b""


def test_requests_in_other_greenlets_are_apart(pair):
    server, client = pair
    req = fake_request(expects_continue=True)

    def other_request():
        connection.pre_request(None, req)
        gevent.sleep(0)  # still in its request while the main greenlet asks
        connection.post_request(None, req, {}, None)

    other = gevent.spawn(other_request)
    gevent.sleep(0)
    connection.send_continue({"gunicorn.socket": server})
    connection.close_after_reply({"gunicorn.socket": server})
    other.join()
    assert pending(client) == b"" and req.must_close is False


def test_close_after_reply_makes_gunicorn_close_and_the_refused_body_is_drained_after_a_fin(pair):
    server, client = pair
    req = fake_request(expects_continue=False)
    connection.pre_request(None, req)
    connection.close_after_reply({"gunicorn.socket": server})
    assert req.must_close is True  # gunicorn's Request.should_close()
    client.sendall(b"x" * 30_000)  # the body the app refused, still coming
    client.shutdown(socket.SHUT_WR)
    connection.post_request(None, req, {"gunicorn.socket": server}, None)
    client.settimeout(10)
    assert client.recv(10) == b"", "the server's side was not shut for writing (FIN)"
    assert pending(server) == b"", "the refused body was not read off (an unread byte makes close send RST)"


def test_nothing_lingers_after_a_body_that_was_read_or_a_reply_that_keeps_the_connection(pair):
    server, client = pair
    for must_close, body_read in ((True, True), (False, False)):
        req = fake_request(expects_continue=False)
        connection.pre_request(None, req)
        req.must_close = must_close
        client.sendall(b"next request")
        connection.post_request(None, req, {"gunicorn.socket": server, "bb_worker.body_read": body_read}, None)
        assert pending(server) == b"next request", "bytes gunicorn reads next were consumed"
        client.sendall(b"ping")
        assert server.recv(10) == b"ping"
        server.sendall(b"pong")  # not shut for writing
        assert client.recv(10) == b"pong"
    connection.post_request(None, fake_request(False), {"gunicorn.socket": server}, None)  # no pre_request
    server.sendall(b"still open")
    assert client.recv(20) == b"still open"


# ---------------------------------------------------------------- when a request began; lingering

def test_began_is_the_worker_s_stamp_for_a_request_and_none_without_the_hooks():
    assert connection.began({}) is None  # the WSGI callable called directly
    worker = types.SimpleNamespace(head_began=lambda: 1234.5)
    req = fake_request(expects_continue=False)
    connection.pre_request(worker, req)
    try:
        assert connection.began({}) == 1234.5
        assert connection.began({connection.BEGAN: 99.0}) == 99.0, "a refused request's own stamp comes first"
    finally:
        connection.post_request(worker, req, {}, None)
    assert connection.began({}) is None
    connection.pre_request(None, req)  # a worker without stamps (gunicorn's own)
    try:
        assert connection.began({}) is None
    finally:
        connection.post_request(None, req, {}, None)


def test_linger_sends_fin_and_reads_off_what_the_client_still_sends(pair):
    server, client = pair
    client.sendall(b"y" * 30_000)  # the rest of a refused head or body
    client.shutdown(socket.SHUT_WR)
    connection.linger(server)
    client.settimeout(10)
    assert client.recv(10) == b"", "no FIN"
    assert pending(server) == b"", "unread bytes left: close would send RST"
    connection.linger(server)  # shut already: raises nothing


# ---------------------------------------------------------------- watch_hangup over TCP

@pytest.fixture
def tcp(monkeypatch):
    """connect() -> (server side, client side) of a fresh TCP connection on 127.0.0.1 (gevent sockets).

    The watcher's recheck interval is cut to keep the tests fast; polls counts its looks at the socket.
    """
    monkeypatch.setattr(connection, "RECHECK_SECONDS", 0.01)
    polls = [0]
    real_poll = connection._poll

    class CountingPoll:
        def __init__(self):
            self.poller = real_poll()

        def register(self, fd, events):
            self.poller.register(fd, events)

        def poll(self, timeout):
            polls[0] += 1
            return self.poller.poll(timeout)

    monkeypatch.setattr(connection, "_poll", CountingPoll)
    listener = gsocket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    opened = []

    def connect():
        client = gsocket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        opened.extend((server, client))
        return server, client

    connect.polls = polls
    yield connect
    for sock in opened:
        sock.close()
    listener.close()


def watch(server, version):
    """Start watch_hangup; return (greenlet, Event set on hang-up)."""
    gone = Event()
    return connection.watch_hangup(server, version, gone.set), gone


def looks_later(tcp, count):
    """Wait until the watcher has looked at its socket `count` more times (bounded)."""
    target = tcp.polls[0] + count
    with gevent.Timeout(10):
        while tcp.polls[0] < target:
            gevent.sleep(0.005)


def reset(sock):
    """Close `sock` with an RST (SO_LINGER 0), as a client that crashed or gave up."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def test_watch_hangup_without_a_socket_watches_nothing():
    assert connection.watch_hangup(None, "HTTP/1.1", lambda: pytest.fail("called")) is None


def test_a_reset_is_a_hang_up(tcp):
    server, client = tcp()
    watcher, gone = watch(server, "HTTP/1.1")
    reset(client)
    assert gone.wait(10)
    watcher.join(10)
    assert watcher.dead


def test_a_client_that_closed_is_found_gone_by_the_probe(tcp):
    server, client = tcp()
    watcher, gone = watch(server, "HTTP/1.1")
    client.close()  # FIN; the probe's "100 Continue" then meets a closed socket, which answers RST
    assert gone.wait(10)


def test_a_half_close_over_http_1_1_is_not_a_hang_up(tcp):
    server, client = tcp()
    watcher, gone = watch(server, "HTTP/1.1")
    try:
        client.shutdown(socket.SHUT_WR)  # what `nc -N` does: still waiting for the reply
        with gevent.Timeout(10):
            assert client.recv(len(CONTINUE)) == CONTINUE, "the probe"
        looks_later(tcp, 5)
        assert not gone.is_set() and not watcher.dead
        server.sendall(b"the reply")  # the reply can still be sent and read
        assert client.recv(20) == b"the reply"
        reset(client)  # ...and the watcher still tells when the client goes
        assert gone.wait(10)
    finally:
        watcher.kill()


def test_a_half_close_over_http_1_0_is_a_hang_up_and_gets_no_probe(tcp):
    server, client = tcp()
    watcher, gone = watch(server, "HTTP/1.0")
    client.shutdown(socket.SHUT_WR)
    assert gone.wait(10)
    assert pending(client) == b"", "HTTP/1.0 has no interim replies"


def test_pipelined_bytes_are_not_a_hang_up_and_stay_for_gunicorn(tcp):
    server, client = tcp()
    watcher, gone = watch(server, "HTTP/1.1")
    try:
        client.sendall(b"GET /next HTTP/1.1\r\n\r\n")
        looks_later(tcp, 5)
        assert not gone.is_set() and not watcher.dead
        assert pending(server) == b"GET /next HTTP/1.1\r\n\r\n"
        assert pending(client) == b"", "no probe without a FIN"
    finally:
        watcher.kill()
    assert not gone.is_set(), "a killed watcher (the reply is ready) does not call back"
