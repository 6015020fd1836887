"""Admission of proof requests: a bounded per-process queue, then a proof slot.

VerifyLimit bounds verifications, which never take a proof slot.
ProofQueue is what app.App holds: admit() counts a proof request as uploading
while its body arrives (503 when MAX_UPLOADING_REQUESTS are), then as queued until
it gets a slot (503 when MAX_QUEUED_REQUESTS are): slow uploads never take the
places complete requests wait in. slot() waits for the scheduler.Scheduler shared
by every worker process to start it, with a thread count for bb (503 after
QUEUE_TIMEOUT_SECONDS). Its slots are lock files, so a killed worker leaks none.
"""
import logging
import time
from contextlib import contextmanager

from gevent.lock import BoundedSemaphore

import observability
from httperrors import ServiceUnavailable
from scheduler import Scheduler, SlotTimeout, reaped_peak_bytes  # noqa: F401 (re-exported)

log = logging.getLogger("bb_worker")


class Busy(ServiceUnavailable):
    """503: the queue is full or no proof slot freed up in time (the metrics outcome "busy")."""


class Ticket:
    """One admitted proof request: uploading, then (uploaded()) queued, until leave()."""

    def __init__(self, queue):
        self._queue = queue
        self.uploading = True
        self.queued = False

    def uploaded(self):
        """The body is in: count as queued instead of uploading.

        Raises Busy (503, Retry-After: 1) when max_queued requests are queued already.
        """
        if self.uploading:
            self.uploading = False
            self._queue.uploading -= 1
            self._queue.check_queued()
            self.queued = True
            self._queue.queued += 1

    def leave(self):
        """Stop counting (got a slot, or the request is over); idempotent."""
        if self.uploading:
            self.uploading = False
            self._queue.uploading -= 1
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
        self.uploading = 0  # proof requests of this process whose body is still arriving

    def check_queued(self):
        """Raise Busy (503, Retry-After: 1) when max_queued requests are queued already."""
        if self.queued >= self.max_queued:
            raise Busy(f"{self.queued} proof requests already queued; retry later", retry_after=1)

    @contextmanager
    def admit(self):
        """Count a proof request as uploading for the `with` body; yields its Ticket.

        Raises Busy (503, Retry-After: 1) when the queue is full (the request could not
        wait once uploaded) or max_uploading requests are uploading already.
        """
        self.check_queued()
        if self.uploading >= self.max_uploading:
            raise Busy(f"{self.uploading} proof requests already uploading; retry later", retry_after=1)
        self.uploading += 1
        ticket = Ticket(self)
        try:
            yield ticket
        finally:
            ticket.leave()

    @contextmanager
    def slot(self, ticket=None, circuit=None):
        """Hold a proof slot for the `with` body, which runs one bb; yields a scheduler.Grant
        (bb's thread count, and the slot's lock descriptors for bb to inherit).

        circuit: a key for the circuit bb runs (its sha256), whose peak RSS the scheduler
        learns from this run (None: unknown, runs alone). With a `ticket` (a proof request)
        the wait is measured (queued gauge, queue seconds) and the ticket leaves the queue
        once the slot is held. Raises Busy after `timeout` seconds, ServiceUnavailable if
        the slot files cannot be made.
        """
        waited = time.monotonic()
        try:
            if ticket is None:
                token = self.slots.take(self.timeout, circuit)
            else:
                with observability.QUEUED.track_inprogress():
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
                observability.QUEUE_SECONDS.observe(time.monotonic() - waited)
            yield token
        finally:
            self.slots.release(token)
            try:
                self.slots.record_peak(circuit, reaped_peak_bytes())
            except OSError as exc:
                log.warning("cannot record bb's peak memory in %s: %s", self.slots.state_dir, exc)


class VerifyLimit:
    """At most `count` verifications at once in this process, apart from the proof slots.

    A request waits up to `wait` seconds for its turn, then gets Busy (503): bb
    verify takes milliseconds, so a longer line means the worker is flooded.
    """

    def __init__(self, count, wait=1.0):
        self.count = count
        self.wait = wait
        self._running = BoundedSemaphore(count)

    @contextmanager
    def slot(self):
        """Hold one of the `count` places for the `with` body; raises Busy after `wait` seconds."""
        if not self._running.acquire(timeout=self.wait):
            raise Busy(f"all {self.count} verification slots busy; retry later", retry_after=1)
        try:
            yield
        finally:
            self._running.release()
