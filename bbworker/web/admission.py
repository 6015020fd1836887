"""Admission of proof requests: a bounded per-process queue, then a proof slot.

VerifyLimit bounds verifications, which never take a proof slot; its waiting line is shared
fairly among clients the same way.
ProofQueue is what the prove handler holds: admit() counts a proof request as uploading
while its body arrives (503 when MAX_UPLOADING_REQUESTS are), then as queued until
it gets a slot (503 when MAX_QUEUED_REQUESTS are): slow uploads never take the
places complete requests wait in; when the uploading places are full, a newcomer preempts
the slowest upload older than PREEMPT_GRACE_SECONDS (408 "upload too slow"), so a crowd of
trickling clients cannot lock complete requests out; and a client (its address, as the access
log names it) holding two places more than the newcomer's gives up its slowest, however young
(fair_share), so one client's crowd cannot lock the others out. slot() waits for the scheduler.Scheduler shared
by every worker process to start it, with a thread count for bb (503 after
QUEUE_TIMEOUT_SECONDS). Its slots are lock files, so a killed worker leaks none.
"""
import logging
import time
from collections import Counter, namedtuple
from contextlib import contextmanager, nullcontext

import gevent
from gevent.event import AsyncResult

from bbworker.errors import Busy, ServiceUnavailable, UploadTooSlow
from bbworker.server import metrics
from bbworker.server.scheduler import SlotTimeout, reaped_peak_bytes

log = logging.getLogger("bb_worker")
Waiter = namedtuple("Waiter", "client turn")  # a verification waiting for a VerifyLimit place (AsyncResult)

PREEMPT_GRACE_SECONDS = 1.0  # an upload younger than this is never preempted (a burst of fresh ones: 503)


def fair_share(entries, client):
    """The client that must give a place up to `client` (a str, or None when unknown): the one
    holding the most of `entries` (objects with a .client), if that is at least two more than
    `client` holds (so it still holds as many afterwards); else None."""
    counts = Counter(entry.client for entry in entries)
    if not counts:
        return None
    top, most = counts.most_common(1)[0]
    return top if most >= counts[client] + 2 else None


def slowest_upload(tickets, now, grace=PREEMPT_GRACE_SECONDS):
    """The Ticket with the lowest bytes/s among `tickets` uploading for over `grace` seconds; None if none.

    now: time.monotonic() seconds. Of equal rates the oldest: progress counts whole reads of
    up to body.CHUNK_BYTES, so every upload still in its first read shows 0 B/s, and the one
    that has sent no read's worth for longest is the likeliest to be stuck.
    """
    eligible = [t for t in tickets if now - t.started > grace]
    return min(eligible, key=lambda t: (t.rate(now), t.started), default=None)


class Ticket:
    """One admitted proof request: uploading, then (uploaded()) queued, until leave()."""

    def __init__(self, queue, greenlet=None, client=None):
        self._queue = queue
        self.client = client  # its address (str), or None
        self.uploading = True
        self.queued = False
        self.started = time.monotonic()
        self.preempted = None  # the UploadTooSlow that ended it (ProofQueue.preempt)
        self.greenlet = greenlet  # the request's greenlet: a preempted upload is killed in it
        self.progress = lambda: 0  # bytes of body received so far (the prove handler points it at its sink)

    def rate(self, now):
        """Bytes per second received since admission (float; 0 in its first instant)."""
        return self.progress() / max(now - self.started, 1e-6)

    def uploaded(self):
        """The body is in: count as queued instead of uploading.

        Raises Busy (503, Retry-After: 1) when max_queued requests are queued already.
        """
        if self.preempted is not None:  # its body came in before the kill landed: still ended
            raise self.preempted
        if self.uploading:
            self._queue.stop_uploading(self)
            self._queue.check_queued()
            self.queued = True
            self._queue.queued += 1

    def leave(self):
        """Stop counting (got a slot, or the request is over); idempotent."""
        if self.uploading:
            self._queue.stop_uploading(self)
        if self.queued:
            self.queued = False
            self._queue.queued -= 1


class ProofQueue:
    """Admission for this process's proof requests.

    slots: the scheduler.Scheduler shared by every worker process. timeout: seconds a request
    may wait for a slot. max_queued: complete proof requests this process holds
    waiting for a slot; max_uploading: proof requests whose body is still arriving.
    Past either, a new request gets 503 at once, before its body is read.
    """

    def __init__(self, slots, timeout, max_queued=16, max_uploading=16):
        self.slots = slots
        self.timeout = timeout
        self.max_queued = max_queued
        self.queued = 0  # complete proof requests of this process waiting for a slot
        self.max_uploading = max_uploading
        self.uploads = set()  # Tickets of the proof requests of this process whose body is still arriving

    @property
    def uploading(self):
        """How many proof requests of this process are uploading (int)."""
        return len(self.uploads)

    def stop_uploading(self, ticket):
        ticket.uploading = False
        self.uploads.discard(ticket)

    def check_queued(self):
        """Raise Busy (503, Retry-After: 1) when max_queued requests are queued already."""
        if self.queued >= self.max_queued:
            raise Busy(f"{self.queued} proof requests already queued; retry later", retry_after=1)

    @contextmanager
    def admit(self, proof=True, client=None):
        """Count a request as uploading for the `with` body; yields its Ticket.

        client: the caller's address (str; None: unknown), for fair shares of the uploading places.
        proof: a proof request, which counts in metrics.PROOF_REQUESTS until the `with` body ends,
        and is refused when the queue is full (it could not wait once uploaded). A verification's
        body (proof=False) takes an uploading place too: slow bodies of either kind are bounded
        together. Raises Busy (503, Retry-After: 1) when the queue is full, or when max_uploading
        requests are uploading already and none of them can be preempted (fair_share, slowest_upload).
        """
        if proof:
            self.check_queued()
        if self.uploading >= self.max_uploading:
            now = time.monotonic()
            over = fair_share(self.uploads, client)
            victim = slowest_upload([t for t in self.uploads if t.client == over], now, grace=0) \
                if over is not None else slowest_upload(self.uploads, now)
            if victim is None:
                raise Busy(f"{self.uploading} requests already uploading; retry later", retry_after=1)
            self.preempt(victim)
        ticket = Ticket(self, gevent.getcurrent(), client)
        self.uploads.add(ticket)
        if proof:
            metrics.PROOF_REQUESTS.inc()
        try:
            yield ticket
        finally:
            ticket.leave()
            if proof:
                metrics.PROOF_REQUESTS.dec()

    def preempt(self, ticket):
        """Stop counting `ticket`'s upload and end it with 408 "upload too slow" in its greenlet."""
        elapsed = time.monotonic() - ticket.started
        received = ticket.progress()
        self.stop_uploading(ticket)
        log.warning("preempting a slow upload (%d bytes in %.1f s) for a new request", received, elapsed)
        ticket.preempted = UploadTooSlow(
            f"upload too slow: {received} bytes in {elapsed:.1f} s; another request took its place")
        if ticket.greenlet is not None:
            ticket.greenlet.kill(ticket.preempted, block=False)

    @contextmanager
    def slot(self, ticket=None, circuit=None):
        """Hold a proof slot for the `with` body, which runs one bb; yields a scheduler.Grant
        (bb's thread count, and the slot's lock descriptors for bb to inherit).

        circuit: a key for the circuit bb runs (bbrunner's VerificationKey.key()), whose peak RSS the scheduler
        learns from this run (None: unknown, runs alone). With a `ticket` (a proof request)
        the wait is measured (queued gauge, queue seconds) and the ticket leaves the queue
        once the slot is held. Raises Busy after `timeout` seconds, ServiceUnavailable if
        the slot files cannot be made.
        """
        waited = time.monotonic()
        try:
            with metrics.QUEUED.track_inprogress() if ticket is not None else nullcontext():
                token = self.slots.take(self.timeout, circuit)
        except SlotTimeout:
            raise Busy(f"all proof slots busy for {self.timeout:g} s; retry later",
                       retry_after=self.timeout) from None
        except OSError as exc:
            log.error("cannot take a proof slot in %s: %s", self.slots.state_dir, exc)
            raise ServiceUnavailable(f"cannot take a proof slot: {exc.strerror}") from None
        try:
            if ticket is not None:
                ticket.leave()
                metrics.QUEUE_SECONDS.observe(time.monotonic() - waited)
            yield token
        finally:
            self.slots.release(token)
            try:
                self.slots.record_peak(circuit, reaped_peak_bytes())
            except OSError as exc:
                log.warning("cannot record bb's peak memory in %s: %s", self.slots.state_dir, exc)


class VerifyLimit:
    """At most `count` verifications at once in this process, apart from the proof slots.

    A request waits up to `wait` seconds for its turn, then gets Busy (503): bb verify takes
    milliseconds, so a longer line means the worker is flooded. At most `max_waiting`
    requests wait (default 8 per place); one more is Busy at once, holding nothing, unless
    a client holds two places in the line more than its own does (fair_share): that client's
    newest waiter then gets Busy and gives its place up. A place that frees goes to the oldest
    waiter of the client with the fewest waiting, so one client's flood cannot make another's wait.
    """

    def __init__(self, count, wait=1.0, max_waiting=None):
        self.count = count
        self.wait = wait
        self.max_waiting = max_waiting or 8 * count
        self.running = 0
        self.line = []  # Waiters, oldest first

    @property
    def waiting(self):
        """How many verifications wait for a place (int)."""
        return len(self.line)

    @contextmanager
    def slot(self, client=None):
        """Hold one of the `count` places for the `with` body; raises Busy after `wait` seconds, or at
        once when max_waiting requests wait already and none must make way for `client` (the
        caller's address, str, or None)."""
        if self.running < self.count:
            self.running += 1
        else:
            self._wait_turn(client)
        try:
            yield
        finally:
            self._hand_on()

    def _wait_turn(self, client):
        if self.waiting >= self.max_waiting:
            over = fair_share(self.line, client)
            if over is None:
                raise Busy(f"{self.waiting} verifications already waiting; retry later", retry_after=1)
            victim = [waiter for waiter in self.line if waiter.client == over][-1]
            self.line.remove(victim)
            victim.turn.set_exception(Busy(f"{self.waiting + 1} verifications waiting, most from one client: "
                                           "the newest of them gave its place up; retry later", retry_after=1))
        me = Waiter(client, AsyncResult())
        self.line.append(me)
        try:
            me.turn.get(timeout=self.wait)  # set by _hand_on: a place is ours
        except BaseException as exc:
            timed_out = isinstance(exc, gevent.Timeout)
            if me in self.line:  # timed out, or killed (the client left), while waiting
                self.line.remove(me)
                if timed_out:
                    raise Busy(f"all {self.count} verification slots busy; retry later", retry_after=1) from None
                raise
            if me.turn.successful():  # handed a place as the wait ended: take it, or pass it on
                if timed_out:
                    return
                self._hand_on()
            raise

    def _hand_on(self):
        """A place is free: to the oldest waiter of the client with the fewest waiting, else counted free."""
        if not self.line:
            self.running -= 1
            return
        counts = Counter(waiter.client for waiter in self.line)
        nxt = min(self.line, key=lambda waiter: counts[waiter.client])  # the first of the fewest: the oldest
        self.line.remove(nxt)
        nxt.turn.set(True)
