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


def test_fair_share_names_a_client_holding_two_places_more_than_the_newcomer():
    held = [admission.Waiter(client, None) for client in ["a", "a", "a", "b"]]
    assert admission.fair_share(held, "c") == "a"  # 3 against 0
    assert admission.fair_share(held, "b") == "a"  # 3 against 1
    assert admission.fair_share(held, "a") is None  # its own
    assert admission.fair_share(held[:2], "b") == "a" and admission.fair_share(held[1:], "b") is None  # 2 against 1
    assert admission.fair_share([held[0], held[3]], "b") is None  # 1 against 1: no ping-pong
    assert admission.fair_share([], "c") is None


def test_one_client_s_crowd_of_young_uploads_makes_way_for_another_client():
    """20 stalled uploads from one address reconnecting as they were preempted kept every place
    younger than the grace: another client's proofs got 503 (QA round 3). The client holding the
    most places now gives up its slowest, however young; its own newcomers still wait their turn."""
    queue = admission.ProofQueue(None, 1, max_queued=4, max_uploading=3)
    ended = {}

    def upload(name, client):
        try:
            with queue.admit(client=client):
                gevent.sleep(30)
        except errors.UploadTooSlow as exc:
            ended[name] = exc

    crowd = [gevent.spawn(upload, f"crowd-{i}", "10.0.0.1") for i in range(3)]
    gevent.sleep(0.05)
    with pytest.raises(errors.Busy):  # the same client again: all within the grace
        with queue.admit(client="10.0.0.1"):
            pass
    with queue.admit(client="10.0.0.2") as ticket:  # another client: one of the crowd's goes, young as it is
        gevent.sleep(0.05)
        assert ticket.client == "10.0.0.2" and queue.uploading == 3
        assert len(ended) == 1 and ended.popitem()[1].status == 408
        with queue.admit(client="10.0.0.3"):  # the crowd's 2 against none: once more
            gevent.sleep(0.05)
            assert len(ended) == 1
            with pytest.raises(errors.Busy):  # one place each now: nobody makes way within the grace
                with queue.admit(client="10.0.0.4"):
                    pass
    gevent.killall(crowd)
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


def test_one_client_s_verify_flood_makes_way_for_another_client_in_the_line():
    """48 verifications at once from one address filled the waiting line and another client's got
    503 (QA round 3): the flooding client's newest waiter now gives its place up."""
    limit = admission.VerifyLimit(1, wait=5.0, max_waiting=2)
    entered, release = gevent.event.Event(), gevent.event.Event()
    outcomes = {}

    def verify(name, client, hold=False):
        try:
            with limit.slot(client):
                if hold:
                    entered.set()
                    release.wait()
                outcomes[name] = "ran"
        except errors.Busy as exc:
            outcomes[name] = exc

    holder = gevent.spawn(verify, "holder", "10.0.0.1", hold=True)
    entered.wait()
    flood = [gevent.spawn(verify, f"flood-{i}", "10.0.0.1") for i in range(2)]
    gevent.sleep(0.05)
    with pytest.raises(errors.Busy, match="2 verifications already waiting"):  # the flood's own: no place
        with limit.slot("10.0.0.1"):
            pass
    other = gevent.spawn(verify, "other", "10.0.0.2")
    gevent.sleep(0.05)
    assert isinstance(outcomes.get("flood-1"), errors.Busy) and outcomes["flood-1"].status == 503
    assert "flood-0" not in outcomes and limit.waiting == 2
    release.set()
    gevent.joinall([holder, other] + flood, timeout=5)
    assert outcomes["other"] == "ran" and outcomes["flood-0"] == "ran" and limit.waiting == 0


def test_a_freed_verify_place_goes_to_the_client_with_the_fewest_waiting_and_none_leaks():
    limit = admission.VerifyLimit(1, wait=5.0, max_waiting=8)
    order, release = [], gevent.event.Event()

    def verify(name, client, hold=False):
        with limit.slot(client):
            order.append(name)
            if hold:
                release.wait()

    holder = gevent.spawn(verify, "holder", "a", hold=True)
    gevent.sleep(0.01)
    waiters = [gevent.spawn(verify, name, client) for name, client in (("a1", "a"), ("a2", "a"), ("b1", "b"))]
    gone = gevent.spawn(verify, "gone", "c")  # its client leaves while it waits
    gevent.sleep(0.05)
    gone.kill()
    assert limit.waiting == 3
    release.set()
    gevent.joinall([holder] + waiters, timeout=5)
    assert order == ["holder", "b1", "a1", "a2"]
    assert (limit.running, limit.waiting) == (0, 0)


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
