"""bbworker.web.admission: the per-process proof queue (uploading and queued places, preemption of
the slowest upload) and its helpers. The scheduler's slots themselves: tests/server/test_scheduler.py."""
import time

import gevent
import gevent.event
import pytest

from bbworker import errors
from bbworker.server.scheduler import SlotTimeout
from bbworker.web import admission


# ---------------------------------------------------------------- uploading places (issue 12)

def _ticket(queue, age, received, now):
    ticket = admission.Ticket(queue)
    ticket.started = now - age
    ticket.progress = lambda: received
    return ticket


def test_slowest_upload_is_the_lowest_rate_past_the_grace():
    queue = admission.ProofQueue(None, 1)
    now = 1000.0
    fresh = _ticket(queue, 0.5, 0, now)  # slowest of all, but within the grace: never chosen
    slow = _ticket(queue, 4.0, 40, now)  # 10 B/s
    slower = _ticket(queue, 2.0, 10, now)  # 5 B/s
    fast = _ticket(queue, 2.0, 60000, now)
    assert admission.slowest_upload([fresh, slow, slower, fast], now) is slower
    assert admission.slowest_upload([fresh, slow, fast], now) is slow
    assert admission.slowest_upload([fresh], now) is None
    assert admission.slowest_upload([], now) is None
    young, old = _ticket(queue, 1.5, 0, now), _ticket(queue, 9.0, 0, now)  # both still in their first read
    for order in ([young, old], [old, young]):
        assert admission.slowest_upload(order, now) is old


def test_a_newcomer_preempts_the_slowest_upload_else_gets_503():
    queue = admission.ProofQueue(None, 1, max_queued=4, max_uploading=2)
    ended = {}

    def upload(name, rate_bytes):
        try:
            with queue.admit() as ticket:
                received = [0]
                ticket.progress = lambda: received[0]
                for _ in range(100):
                    received[0] += rate_bytes
                    gevent.sleep(0.05)
                ended[name] = "done"
        except errors.UploadTooSlow as exc:
            ended[name] = exc

    slow, fast = gevent.spawn(upload, "slow", 1), gevent.spawn(upload, "fast", 1000)
    gevent.sleep(0.2)
    with pytest.raises(errors.Busy):  # both within the grace: a burst of fresh uploads
        with queue.admit():
            pass
    assert queue.uploading == 2
    gevent.sleep(admission.PREEMPT_GRACE_SECONDS)
    with queue.admit():
        gevent.sleep(0.1)
        assert isinstance(ended.get("slow"), errors.UploadTooSlow) and ended["slow"].status == 408
        assert "upload too slow" in ended["slow"].message
        assert "fast" not in ended and queue.uploading == 2
    fast.kill()
    slow.join()
    assert queue.uploading == 0


# ---------------------------------------------------------------- queued places and the slot

class FakeSlots:
    """A scheduler.Scheduler stand-in: take() grants at once (or raises `error`); records every call."""

    state_dir = "/nonexistent/slots"

    def __init__(self, error=None):
        self.error = error
        self.calls = []

    def take(self, timeout, peak_key=None):
        self.calls.append(("take", timeout, peak_key))
        if self.error is not None:
            raise self.error
        return "grant"

    def release(self, grant):
        self.calls.append(("release", grant))

    def record_peak(self, key, nbytes):
        self.calls.append(("record_peak", key))


def test_a_full_queue_refuses_newcomers_and_uploads_that_complete():
    queue = admission.ProofQueue(None, 1, max_queued=1, max_uploading=4)
    with queue.admit() as first, queue.admit() as second:
        assert (queue.uploading, queue.queued) == (2, 0)
        first.uploaded()
        assert (queue.uploading, queue.queued) == (1, 1)
        with pytest.raises(errors.Busy, match="1 proof requests already queued") as raised:
            second.uploaded()  # its body is in, but no place is left to wait in
        assert raised.value.headers == [("Retry-After", "1")]
        with pytest.raises(errors.Busy):
            with queue.admit():
                pytest.fail("admitted into a full queue")
    assert (queue.uploading, queue.queued) == (0, 0)


def test_the_slot_is_held_for_the_with_body_and_the_ticket_leaves_the_queue():
    slots = FakeSlots()
    queue = admission.ProofQueue(slots, 7)
    with queue.admit() as ticket:
        ticket.uploaded()
        with pytest.raises(ZeroDivisionError):
            with queue.slot(ticket, "circuit-key") as grant:
                assert grant == "grant" and queue.queued == 0
                1 / 0
    assert slots.calls == [("take", 7, "circuit-key"), ("release", "grant"), ("record_peak", "circuit-key")]


@pytest.mark.parametrize("error, cls, status, retry_after, words", [
    (SlotTimeout("no slot"), errors.Busy, 503, "7", "all proof slots busy for 7 s"),
    (PermissionError(13, "Permission denied"), errors.ServiceUnavailable, 503, "5",
     "cannot take a proof slot: Permission denied"),
])
def test_a_slot_that_cannot_be_had_is_503(error, cls, status, retry_after, words):
    queue = admission.ProofQueue(FakeSlots(error), 7)
    with pytest.raises(cls, match=words) as raised:
        with queue.slot():
            pytest.fail("got a slot")
    assert raised.value.status == status and raised.value.headers == [("Retry-After", retry_after)]


def test_verify_limit_bounds_verifications_apart_from_proof_slots():
    limit = admission.VerifyLimit(2, wait=0)
    with limit.slot(), limit.slot():
        with pytest.raises(errors.Busy, match="all 2 verification slots busy") as raised:
            with limit.slot():
                pytest.fail("a third verification ran")
        assert raised.value.outcome == "busy" and raised.value.fault is None
    with limit.slot():  # released, also after the refusal
        pass


def test_verify_places_bound_their_waiters_too():
    """At most max_waiting requests wait for a verification place: one more is Busy at once, holding
    nothing (a flood of complete verify bodies cannot hold connections for the whole wait)."""
    limit = admission.VerifyLimit(1, wait=5.0, max_waiting=2)
    entered, release = gevent.event.Event(), gevent.event.Event()

    def hold():
        with limit.slot():
            entered.set()
            release.wait()

    holder = gevent.spawn(hold)
    entered.wait()
    waiters = [gevent.spawn(lambda: limit.slot().__enter__()) for _ in range(2)]
    gevent.sleep(0.05)
    assert limit.waiting == 2
    started = time.monotonic()
    with pytest.raises(errors.Busy, match="2 verifications already waiting"):
        with limit.slot():
            pass
    assert time.monotonic() - started < 1.0  # at once, not after the 5 s wait
    release.set()
    gevent.joinall([holder] + waiters, timeout=5)
