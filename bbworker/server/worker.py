"""bb-worker's gunicorn worker: gunicorn's gevent worker with deadlines for request heads, a place
for every new connection, and gunicorn's own refusals answered by the app.

- Heads: gunicorn bounds the wait for a request line and headers only by `keepalive`, which
  behind a load balancer is long (its idle timeout and more), so a client trickling its headers
  would hold the connection that long (HeadDeadline).
- Places: gunicorn's gevent worker serves at most `worker_connections` connections and stops
  accepting while they are all taken, so a crowd of silent connections left /api/health waiting
  in the listen backlog. When the last place is taken the worker drops a connection that is
  only waiting on its client: one closing after its reply, else the one that has waited
  longest for a request head, else one whose reply its client does not read (gunicorn sets no
  deadline on writes); never one whose request is being served. The next connection is
  accepted at once; the drops are logged at warning level, summed (Summed).
- Refusals: a request gunicorn's parser refuses (431, 414, 501, 400, ...) is answered by the app
  as any other error (JSON, CORS, an access line, counted): the worker calls it with a small
  environ whose REFUSED key (server.refusals) holds a bbworker.errors.Error.
- stopping() tells readiness that SIGTERM arrived: gunicorn's worker closes its listener only at
  its next one-second tick and serves what it accepts until then.
"""
import collections
import errno
import select
import ssl
import time

import gevent
from gevent import monkey
from gevent.socket import wait_read
from gunicorn import SERVER, util
from gunicorn.workers import ggevent

from bbworker.server import connection, rundir
from bbworker.server.refusals import parsed_part, refusal, refused_environ

ROOM_RECHECK_SECONDS = 0.5  # a full worker with no connection to drop looks again this often


class HeadDeadline:
    """gunicorn's timeout_ctx around reading one request head (request line and headers).

    The connection may stay idle `idle` seconds (gunicorn's keepalive); once the first byte of
    a request arrives, the rest of its head has `head` seconds. `begun`: bytes of the head are
    already buffered by gunicorn's parser (pipelined), so `head` counts from __enter__; bytes
    waiting on the socket at __enter__ count the same. `waiting`: an ordered dict that holds
    this deadline (keyed by the handler greenlet) while the handler waits for the head, oldest
    first. `began`: monotonic time (s) the head began arriving, set by the time it was read.
    On expiry, or expire(), gunicorn reads no request (a silent gevent.Timeout, as gunicorn's
    own timeout_ctx) and closes the connection without a reply.
    """

    def __init__(self, sock, idle, head, begun=False, waiting=None):
        self.sock, self.idle, self.head, self.begun = sock, idle, head, begun
        self.waiting = waiting if waiting is not None else {}
        self.active = False
        self.entered = self.began = None

    def __enter__(self):
        self.handler = gevent.getcurrent()
        self.entered = time.monotonic()
        self.timeout = gevent.Timeout(self.idle, False)
        self.timeout.start()
        self.active = True
        self.waiting[self.handler] = self
        # Checked now, before the handler reads: bytes it takes from the socket never make it readable again.
        started = self.begun or _readable(self.sock)
        if started:
            self.began = self.entered
        self.watcher = gevent.spawn(self._watch, started)
        return self

    def _watch(self, started):
        if not started:
            wait_read(self.sock.fileno())  # the next request starts (or the client leaves)
            self.began = time.monotonic()
        gevent.sleep(self.head)
        self.expire()

    def expire(self):
        """End the wait now: the handler reads no request and closes the connection (no-op once the head is read)."""
        gevent.get_hub().loop.run_callback(self._expire)

    def _expire(self):  # in the hub: the handler may have finished the head meanwhile
        if self.active:
            self.handler.throw(self.timeout)

    def __exit__(self, typ, value, tb):
        self.active = False
        self.waiting.pop(self.handler, None)
        if self.began is None:
            self.began = time.monotonic()  # the head came in one piece while the handler waited for it
        self.watcher.kill(block=False)
        self.timeout.close()
        return value is self.timeout


class Lingering:
    """A connection closing after its reply (connection.linger) while the `with` body runs: the first
    one dropped when the worker is full (`waiting`: the worker's ordered dict; it goes to its front).
    expire() ends the linger at once; the `with` swallows that."""

    def __init__(self, waiting):
        self.waiting = waiting
        self.active = False

    def __enter__(self):
        self.handler = gevent.getcurrent()
        self.entered = time.monotonic()
        self.timeout = gevent.Timeout()  # never started: only thrown by expire()
        self.active = True
        self.waiting[self.handler] = self
        self.waiting.move_to_end(self.handler, last=False)
        return self

    def expire(self):
        gevent.get_hub().loop.run_callback(self._expire)

    def _expire(self):
        if self.active:
            self.handler.throw(self.timeout)

    def __exit__(self, typ, value, tb):
        self.active = False
        self.waiting.pop(self.handler, None)
        return value is self.timeout


_poll = monkey.get_original("select", "poll")  # the kernel's poll(2), never gevent's


def _readable(sock):
    """True when `sock` has bytes (or an end) to read now, without waiting."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    poller = _poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def _sending(sock):
    """True while a greenlet waits for `sock` to take more bytes: its peer reads none now
    (the watcher gevent starts for that wait, gevent._socket3.socket.send)."""
    event = getattr(sock, "_write_event", None)
    return bool(event is not None and event.active)


def _unread(handler, sock):
    """In the hub: fail `handler`'s write to `sock` as if its client hung up (gunicorn then closes
    the connection), if it still waits to write."""
    if _sending(sock):
        handler.throw(BrokenPipeError(errno.EPIPE, "the client reads no more of its reply: dropped"))


class Client:
    """One connection of the worker: `sock`, `accepted` (monotonic s), `requests` (heads awaited so far),
    `deadline` (the HeadDeadline of the latest head), `unreader` (gunicorn's buffer of its bytes, once known)."""

    __slots__ = ("sock", "accepted", "requests", "deadline", "unreader")

    def __init__(self, sock, accepted):
        self.sock, self.accepted = sock, accepted
        self.requests = 0
        self.deadline = self.unreader = None

    def buffered(self):
        """True when gunicorn's parser holds bytes of this connection it has not parsed yet."""
        buf = getattr(self.unreader, "buf", None)
        if buf is None:
            return False
        with buf.getbuffer() as view:
            return view.nbytes > 0

    def head_began(self):
        """Monotonic time (s) the current request's head began arriving: the accept for the first."""
        if self.requests <= 1 or self.deadline is None or self.deadline.began is None:
            return self.accepted
        return self.deadline.began


class Summed:
    """Warnings of one kind, at most one per `interval` seconds while they go on: the first at once,
    then every `interval` s how many more there were (`more` % (count, interval)), if any."""

    def __init__(self, log, more, interval=10.0):
        self.log, self.more, self.interval = log, more, interval
        self.count = 0
        self.timer = None

    def event(self, message, *args):
        """Log `message` % args now if no warning of this kind went out in the last interval, else count it."""
        if self.timer is None:
            self.log.warning(message, *args)
            self.timer = gevent.spawn_later(self.interval, self._flush)
        else:
            self.count += 1

    def _flush(self):
        if not self.count:
            self.timer = None
            return
        self.log.warning(self.more, self.count, self.interval)
        self.count = 0
        self.timer = gevent.spawn_later(self.interval, self._flush)


_stopping = False


def stopping():
    """True once this worker process got SIGTERM (GeventWorker.handle_exit): it finishes the
    requests it has and exits. False in a process that is not a gunicorn worker."""
    return _stopping


class GeventWorker(ggevent.GeventWorker):
    """gunicorn's gevent worker; request heads must arrive within `header_timeout` seconds, a
    full worker drops its connection idle longest, the app answers gunicorn's refusals.

    A new connection's first request must arrive whole within `header_timeout` of the accept
    (nginx's client_header_timeout); later ones may wait `keepalive` seconds to begin.
    """

    header_timeout = 10.0  # HEADER_TIMEOUT_SECONDS, set on each worker by hooks.Hooks.post_fork

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # wall clock, compared with the master's reload mark (rundir); gunicorn's own `booted` is a bool
        self.started_at = time.time()
        self._clients = {}  # handler greenlet -> its Client
        self._waiting = collections.OrderedDict()  # handler greenlet -> HeadDeadline, waiting longest first
        places = f"all {self.worker_connections} connections (worker_connections)"
        self._drops = Summed(self.log, f"{places} taken: dropped %d more waiting on their clients in the last %g s")
        self._full = Summed(self.log, f"{places} were in requests %d more times in the last %g s")
        self._recheck = None  # the greenlet that looks again for a connection to drop while the worker is full

    def handle(self, listener, client, addr):
        me = gevent.getcurrent()
        self._clients[me] = Client(client, time.monotonic())
        try:
            if len(self._clients) >= self.worker_connections:
                self._make_room()
            super().handle(listener, client, addr)
        finally:
            self._clients.pop(me, None)

    def lingering(self):
        """A context manager for a connection's lingering close: droppable first when the worker is full."""
        return Lingering(self._waiting)

    def _make_room(self):
        """Every place is taken (gevent accepts no more): drop a connection lingering after its reply,
        else the one waiting longest for a head, else the oldest whose client reads no more of its reply."""
        while self._waiting:
            _, deadline = self._waiting.popitem(last=False)  # never chosen twice
            if deadline.active:
                deadline.expire()
                self._drops.event("all %d connections (worker_connections) taken: dropped the one waiting longest "
                                  "for a request (%.1f s) to accept the next", self.worker_connections,
                                  time.monotonic() - deadline.entered)
                return
        stuck = [(client.accepted, handler) for handler, client in self._clients.items() if _sending(client.sock)]
        if stuck:
            accepted, handler = min(stuck, key=lambda pair: pair[0])
            gevent.get_hub().loop.run_callback(_unread, handler, self._clients[handler].sock)
            self._drops.event("all %d connections (worker_connections) taken: dropped the oldest whose client "
                              "reads no more of its reply (open %.1f s) to accept the next", self.worker_connections,
                              time.monotonic() - accepted)
            return
        self._full.event("all %d connections (worker_connections) are in requests: none is accepted until one ends",
                         self.worker_connections)
        if self._recheck is None:  # gevent accepts again only when one ends: look again while none does
            self._recheck = gevent.spawn_later(ROOM_RECHECK_SECONDS, self._look_again)

    def _look_again(self):
        self._recheck = None
        if len(self._clients) >= self.worker_connections:
            self._make_room()

    def handle_request(self, listener_name, req, sock, addr):
        client = self._clients.get(gevent.getcurrent())
        if client is not None:
            client.unreader = req.unreader  # the connection's one buffer: pipelined bytes wait there
            if client.requests > 1:
                # Requests pipelined in that buffer are served without any socket wait, so without a
                # turn for other connections or the accept: one request each, round the ready ones.
                gevent.sleep(0)
        return super().handle_request(listener_name, req, sock, addr)

    def head_began(self):
        """Monotonic time (s) the request this greenlet serves began arriving (None outside a connection)."""
        client = self._clients.get(gevent.getcurrent())
        return client.head_began() if client is not None else None

    def handle_error(self, req, client, addr, exc):
        """Answer a request gunicorn refused (or failed on) through the app, with "Connection: close".

        The app gets an environ with what gunicorn parsed of the request (method, path, headers;
        see refused_environ) and REFUSED: a ProtocolError for the client's mistakes, a 500
        Error for ours. GreenletExit and other BaseExceptions go to gunicorn's own handling.
        """
        if not isinstance(exc, Exception):
            return super().handle_error(req, client, addr, exc)
        error = refusal(exc)
        if error.fault == "server":
            self.log.exception("Error handling request %s", getattr(req, "uri", None) or "(no URI read)")
        req = req if req is not None else parsed_part(exc)
        state = self._clients.get(gevent.getcurrent())
        environ = refused_environ(self.cfg, req, client, addr, error,
                                  state.head_began() if state is not None else time.monotonic())
        try:
            reply = self.render(environ)
        except Exception:
            self.log.exception("the app could not answer a request gunicorn refused (%s)", error.detail)
            return
        try:
            util.write(client, reply)
            with self.lingering():
                connection.linger(client)
        except OSError:  # the client is gone
            self.log.debug("Failed to send error message.")

    def render(self, environ):
        """The bytes of the app's reply to `environ`, a whole HTTP/1.1 message with "Connection: close"."""
        reply = []

        def start_response(status, headers, exc_info=None):
            reply[:] = [status, headers]
        body = b"".join(self.wsgi(environ, start_response))
        status, headers = reply
        lines = [f"HTTP/1.1 {status}", f"Server: {SERVER}", f"Date: {util.http_date()}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def handle_exit(self, sig, frame):
        """SIGTERM (a stop, or a HUP's replacement): graceful stop, and idle keep-alive connections
        are closed (close_idle). stopping() is True from here on unless the master is reloading
        (rundir.reloaded_since: its new workers serve, and so does this one until it exits)."""
        global _stopping
        _stopping = not rundir.reloaded_since(self.started_at)
        self.log.info("SIGTERM: %s", "the server is stopping, /api/health answers 503" if _stopping
                      else "replaced after a reload, ready until it exits")
        super().handle_exit(sig, frame)
        gevent.get_hub().loop.run_callback(self.close_idle)

    def close_idle(self):
        """Close the keep-alive connections waiting for their next request, none of it arrived (nginx
        does so on a graceful stop): each would hold the stopping worker up to `keepalive` seconds.
        A new connection keeps its `header_timeout`; a request begun is served."""
        for client in list(self._clients.values()):
            deadline = client.deadline
            if deadline is not None and deadline.active and client.requests > 1 and deadline.began is None \
                    and not client.buffered() and not _readable(client.sock):
                deadline.expire()

    def handle_quit(self, sig, frame):
        """SIGINT/SIGQUIT: a quick exit, once. Ctrl-C signals the worker and then the master
        signals it again; a second sys.exit() in a new greenlet during interpreter shutdown
        would print "failed with SystemExit" from gevent."""
        if getattr(self, "_quitting", False):
            return
        self._quitting = True
        super().handle_quit(sig, frame)

    def timeout_ctx(self):
        client = self._clients[gevent.getcurrent()]
        first = client.requests == 0  # counted from the accept: the whole head within header_timeout
        idle = self.header_timeout if first else self.cfg.keepalive
        client.requests += 1
        client.deadline = HeadDeadline(client.sock, idle, self.header_timeout, begun=first or client.buffered(),
                                       waiting=self._waiting)
        return client.deadline
