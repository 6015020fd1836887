"""Admission of proof requests: a bounded per-process queue, then a proof slot.

VerifyLimit bounds verifications, which never take a proof slot.
ProofQueue is what the prove handler holds: admit() counts a proof request as uploading
while its body arrives (503 when MAX_UPLOADING_REQUESTS are), then as queued until
it gets a slot (503 when MAX_QUEUED_REQUESTS are): slow uploads never take the
places complete requests wait in; when the uploading places are full, a newcomer preempts
the slowest upload older than PREEMPT_GRACE_SECONDS (408 "upload too slow"), so a crowd of
trickling clients cannot lock complete requests out. slot() waits for the scheduler.Scheduler shared
by every worker process to start it, with a thread count for bb (503 after
QUEUE_TIMEOUT_SECONDS). Its slots are lock files, so a killed worker leaks none.
"""
import logging
import time
from contextlib import contextmanager, nullcontext

import gevent
from gevent.lock import BoundedSemaphore

from bbworker.errors import Busy, ServiceUnavailable, UploadTooSlow
from bbworker.server import metrics
from bbworker.server.scheduler import SlotTimeout, reaped_peak_bytes

log = logging.getLogger("bb_worker")

PREEMPT_GRACE_SECONDS = 1.0  # an upload younger than this is never preempted (a burst of fresh ones: 503)


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

    def __init__(self, queue, greenlet=None):
        self._queue = queue
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
    def admit(self, proof=True):
        """Count a request as uploading for the `with` body; yields its Ticket.

        proof: a proof request, which counts in metrics.PROOF_REQUESTS until the `with` body ends,
        and is refused when the queue is full (it could not wait once uploaded). A verification's
        body (proof=False) takes an uploading place too: slow bodies of either kind are bounded
        together. Raises Busy (503, Retry-After: 1) when the queue is full, or when max_uploading
        requests are uploading already and none of them can be preempted (slowest_upload).
        """
        if proof:
            self.check_queued()
        if self.uploading >= self.max_uploading:
            victim = slowest_upload(self.uploads, time.monotonic())
            if victim is None:
                raise Busy(f"{self.uploading} requests already uploading; retry later", retry_after=1)
            self.preempt(victim)
        ticket = Ticket(self, gevent.getcurrent())
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
    requests wait (default 8 per place); one more is Busy at once, holding nothing.
    """

    def __init__(self, count, wait=1.0, max_waiting=None):
        self.count = count
        self.wait = wait
        self.max_waiting = max_waiting or 8 * count
        self.waiting = 0
        self._running = BoundedSemaphore(count)

    @contextmanager
    def slot(self):
        """Hold one of the `count` places for the `with` body; raises Busy after `wait` seconds, or at
        once when max_waiting requests wait already."""
        if self.waiting >= self.max_waiting and self._running.locked():
            raise Busy(f"{self.waiting} verifications already waiting; retry later", retry_after=1)
        self.waiting += 1
        try:
            acquired = self._running.acquire(timeout=self.wait)
        finally:
            self.waiting -= 1
        if not acquired:
            raise Busy(f"all {self.count} verification slots busy; retry later", retry_after=1)
        try:
            yield
        finally:
            self._running.release()
