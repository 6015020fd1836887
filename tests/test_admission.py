"""admission.py's slots (scheduler.Scheduler): shared by processes (flock), first come first served within one."""
import signal
import subprocess
import sys
import time

import gevent
import pytest

import admission
from support import ROOT

HOLDER = """\
import sys, time
sys.path.insert(0, {root!r})
import admission
lock_dir, count, timeout, hold, log = sys.argv[1:]
slots = admission.Scheduler(lock_dir, int(count), int(count), 1 << 30)
try:
    with slots.acquire(float(timeout)):
        start = time.time()
        print("held", flush=True)
        time.sleep(float(hold))
        end = time.time()
except admission.SlotTimeout:
    print("timeout", flush=True)
    sys.exit(3)
with open(log, "a") as f:
    f.write(f"{{start}} {{end}}\\n")
"""


@pytest.fixture
def holder(tmp_path):
    """holder(timeout, hold, count=1) -> a started process that holds a slot in tmp_path/slots."""
    script = tmp_path / "holder.py"
    script.write_text(HOLDER.format(root=ROOT))
    procs = []

    def start(timeout, hold, count=1):
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "slots"), str(count),
                                 str(timeout), str(hold), str(tmp_path / "held.log")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_one_slot_is_held_by_one_process_at_a_time(holder, tmp_path):
    procs = [holder(timeout=20, hold=0.3) for _ in range(3)]
    for proc in procs:
        proc.wait(timeout=30)
    assert [p.returncode for p in procs] == [0, 0, 0]
    spans = sorted(tuple(map(float, line.split())) for line in (tmp_path / "held.log").read_text().splitlines())
    assert len(spans) == 3
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end, f"overlapping holders: {spans}"


def test_a_held_slot_times_out_other_processes_and_is_freed_by_sigkill(holder, tmp_path):
    first = holder(timeout=5, hold=300)
    assert first.stdout.readline() == "held\n"
    slots = admission.Scheduler(str(tmp_path / "slots"), 1, 1, 1 << 30)
    with pytest.raises(admission.SlotTimeout):
        with slots.acquire(0.2):
            pass
    second = holder(timeout=0.2, hold=0)
    assert second.wait(timeout=30) == 3

    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    started = time.monotonic()
    with slots.acquire(1):
        assert time.monotonic() - started < 0.5


def test_acquire_times_out_after_the_timeout(tmp_path):
    slots = admission.Scheduler(str(tmp_path / "slots"), 1, 1, 1 << 30)
    with slots.acquire(1):
        started = time.monotonic()
        with pytest.raises(admission.SlotTimeout, match="0.3 s"):
            with slots.acquire(0.3):
                pytest.fail("got a held slot")
        assert 0.3 <= time.monotonic() - started < 1.5


def test_slots_are_shared_by_processes_and_released_on_error(tmp_path):
    slots = admission.Scheduler(str(tmp_path / "slots"), 2, 2, 1 << 30)
    other = admission.Scheduler(str(tmp_path / "slots"), 2, 2, 1 << 30)  # e.g. another worker process
    slots.record_peak("c", 1 << 20)
    with slots.acquire(1, "c") as first:
        assert first.threads == 2  # alone: every core
        with pytest.raises(admission.SlotTimeout):  # no core left for another process
            with other.acquire(0.1, "c"):
                pass
    with pytest.raises(ZeroDivisionError):
        with slots.acquire(1, "c"):
            1 / 0
    with other.acquire(0, "c") as again:
        assert again.threads == 2


def test_a_waiting_greenlet_gets_the_slot_when_it_is_released(tmp_path):
    slots = admission.Scheduler(str(tmp_path / "slots"), 1, 1, 1 << 30)
    order = []

    def job(name, hold):
        with slots.acquire(5):
            order.append(f"{name} in")
            gevent.sleep(hold)
            order.append(f"{name} out")

    first = gevent.spawn(job, "a", 0.2)
    gevent.sleep(0.05)
    second = gevent.spawn(job, "b", 0)
    gevent.joinall([first, second], timeout=10, raise_error=True)
    assert order == ["a in", "a out", "b in", "b out"]


def test_slot_waiters_in_one_process_are_served_first_come_first_served(tmp_path):
    slots = admission.Scheduler(str(tmp_path / "slots"), 1, 1, 1 << 30, poll=0.01)
    order = []

    def client(name, hold):
        token = slots.take(10)
        order.append(name)
        gevent.sleep(hold)
        slots.release(token)

    first = slots.take(1)
    waiters = []
    for name in "ABC":
        waiters.append(gevent.spawn(client, name, 0.05))
        gevent.sleep(0.02)  # A waits longest, then B, then C
    slots.release(first)
    waiters.append(gevent.spawn(client, "late", 0))  # arrives as the slot frees: must not overtake
    gevent.joinall(waiters, timeout=10, raise_error=True)
    assert order == ["A", "B", "C", "late"]


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
        except admission.UploadTooSlow as exc:
            ended[name] = exc

    slow, fast = gevent.spawn(upload, "slow", 1), gevent.spawn(upload, "fast", 1000)
    gevent.sleep(0.2)
    with pytest.raises(admission.Busy):  # both within the grace: a burst of fresh uploads
        with queue.admit():
            pass
    assert queue.uploading == 2
    gevent.sleep(admission.PREEMPT_GRACE_SECONDS)
    with queue.admit():
        gevent.sleep(0.1)
        assert isinstance(ended.get("slow"), admission.UploadTooSlow) and ended["slow"].code == 408
        assert "upload too slow" in ended["slow"].message
        assert "fast" not in ended and queue.uploading == 2
    fast.kill()
    slow.join()
    assert queue.uploading == 0
