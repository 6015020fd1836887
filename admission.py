"""Admission of proof requests: a bounded per-process queue, then a proof slot.

VerifyLimit bounds verifications, which never take a proof slot.
ProofQueue is what app.App holds: admit() counts a proof request as uploading
while its body arrives (503 when MAX_UPLOADING_REQUESTS are), then as queued until
it gets a slot (503 when MAX_QUEUED_REQUESTS are): slow uploads never take the
places complete requests wait in. slot() waits for one of the ProofSlots shared
by every worker process (503 after QUEUE_TIMEOUT_SECONDS). ProofSlots are lock
files, so a killed worker leaks none.
"""
import os
import logging
import time
from collections import deque
from contextlib import contextmanager

from gevent.event import Event
from gevent.lock import BoundedSemaphore

import observability
import ownership
from httperrors import ServiceUnavailable

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

    slots: the ProofSlots shared by every worker process. timeout: seconds a request
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
    def slot(self, ticket=None):
        """Hold a proof slot for the `with` body; yields its locks' descriptors (a tuple, for bb to inherit).

        With a `ticket` (a proof request) the wait is measured (queued gauge, queue
        seconds) and the ticket leaves the queue once the slot is held. Raises Busy
        after `timeout` seconds, ServiceUnavailable if the slot files cannot be made.
        """
        waited = time.monotonic()
        try:
            if ticket is None:
                token = self.slots.take(self.timeout)
            else:
                with observability.QUEUED.track_inprogress():
                    token = self.slots.take(self.timeout)
        except SlotTimeout:
            raise Busy(f"all proof slots busy for {self.timeout:g} s; retry later",
                       retry_after=self.timeout) from None
        except OSError as exc:
            log.error("cannot take a proof slot in %s: %s", self.slots.lock_dir, exc)
            raise ServiceUnavailable(f"cannot take a proof slot: {exc.strerror}") from None
        try:
            if ticket is not None:
                ticket.leave()
                observability.QUEUE_SECONDS.observe(time.monotonic() - waited)
            yield token.fds
        finally:
            self.slots.release(token)


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


class SlotTimeout(Exception):
    """No proof slot became free in time."""


class ProofSlots:
    """At most `count` proofs at once across every process sharing `lock_dir`.

    Each slot is a lock file held with flock(); the kernel releases it when its
    holder exits, so a killed worker cannot leak a slot, and bb inherits it, so a
    slot stays taken while its bb lives. The directory and files must be ours
    (ownership.private_dir, ownership.lock_path: no symlinks, no other owner), and a
    lock counts only while its path still names the locked file, and each slot also
    holds a name no file operation frees (ownership.lock_slot): removing the
    directory while a proof runs cannot free that slot for a second bb. Within a process waiters
    line up first come, first served (only the oldest waiter polls the lock files,
    every `poll` seconds), so a newcomer cannot overtake a request that has waited
    longer; across worker processes the heads of the lines compete.
    """

    def __init__(self, lock_dir, count, poll=0.02):
        self.lock_dir = lock_dir  # created on first use
        self._line = deque()  # gevent Events of this process's waiters, oldest first
        self._freed = Event()  # set by release(): the head of the line looks again at once
        self.paths = [os.path.join(lock_dir, f"slot-{i}.lock") for i in range(count)]
        self.poll = poll

    def take(self, timeout):
        """Wait up to `timeout` seconds for a free slot; return its token for release().

        Raises SlotTimeout when none frees up in time.
        """
        deadline = time.monotonic() + timeout
        turn = Event()
        self._line.append(turn)
        if self._line[0] is turn:
            turn.set()
        try:
            if not turn.wait(timeout):
                raise SlotTimeout(f"no proof slot free within {timeout:g} s")
            return self._take(deadline, timeout)
        finally:  # leave the line (served, timed out or killed); the next in line goes on
            was_head = self._line[0] is turn
            self._line.remove(turn)
            if was_head and self._line:
                self._line[0].set()

    def _take(self, deadline, timeout):
        while True:
            ownership.private_dir(self.lock_dir)
            for path in self.paths:
                held = ownership.lock_slot(path)
                if held is not None:
                    return held
            if time.monotonic() >= deadline:
                raise SlotTimeout(f"no proof slot free within {timeout:g} s")
            self._freed.clear()
            self._freed.wait(self.poll)  # a slot freed in this process wakes it; others are polled

    def release(self, token):
        """Free the slot that take() returned (an ownership.HeldSlot)."""
        token.close()
        self._freed.set()

    @contextmanager
    def acquire(self, timeout):
        """Hold a slot for the `with` body; raises SlotTimeout after `timeout` seconds."""
        token = self.take(timeout)
        try:
            yield
        finally:
            self.release(token)
