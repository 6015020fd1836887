"""The proof scheduler: threads per bb (plan), the state it shares across processes (Scheduler), the slot locks."""
import base64
import errno
import fcntl
import os
import random
import signal
import subprocess
import sys
import time
import warnings

import gevent
import pytest

import support
from bbworker import files
from bbworker.server import scheduler
from bbworker.server.scheduler import (HeldSlot, Running, Scheduler, SlotTimeout, _FreeSlots, forget_process,
                                       lock_path, lock_slot, plan, waiting_prefix)
from bbworker.settings import Settings, available_cores, available_memory
from support import PROGRAMS, fixture_bytes, request, request_json

MiB = 1 << 20


# ---------------------------------------------------------------- plan(): the decision

def test_a_lone_request_gets_every_core():
    assert plan(cores=2, cap=2, budget_bytes=1 << 30, running=[], waiting=1, peak_bytes=20 * MiB) == 2
    assert plan(cores=16, cap=16, budget_bytes=1 << 30, running=[], waiting=1, peak_bytes=20 * MiB) == 16


def test_a_count_of_waiting_requests_that_misses_this_one_still_counts_it():
    # e.g. the state directory was removed, this process's waiting file with it
    assert plan(2, 2, 1 << 30, [], 0, 20 * MiB) == 2


def test_a_request_joining_a_lone_proof_that_holds_every_core_waits():
    assert plan(2, 2, 1 << 30, [Running(2, 20 * MiB)], 1, 20 * MiB) == 0
    assert plan(16, 16, 1 << 30, [Running(16, 20 * MiB)], 5, 20 * MiB) == 0


def test_queued_requests_split_the_free_cores():
    # three waiting when the cores free up: two start with one core each (2 cores)
    assert plan(2, 2, 1 << 30, [], 3, 20 * MiB) == 1
    assert plan(2, 2, 1 << 30, [Running(1, 20 * MiB)], 2, 20 * MiB) == 1
    # 16 cores, 4 waiting: 4 threads each; the rest of the queue gets what remains
    assert plan(16, 16, 1 << 30, [], 4, 20 * MiB) == 4
    assert plan(16, 16, 1 << 30, [Running(4, 20 * MiB)] * 3, 1, 20 * MiB) == 4
    # one core left over when a proof ends under load: nobody else waiting takes it
    assert plan(16, 16, 1 << 30, [Running(5, 20 * MiB)] * 3, 1, 20 * MiB) == 1


def test_the_cap_limits_proofs_at_once_and_cap_1_is_one_proof_with_every_core():
    assert plan(16, 2, 1 << 30, [], 8, 20 * MiB) == 8  # two at once at most: half the cores each
    assert plan(16, 2, 1 << 30, [Running(8, 20 * MiB)] * 2, 8, 20 * MiB) == 0
    assert plan(2, 1, 1 << 30, [], 8, 20 * MiB) == 2  # today's behaviour
    assert plan(2, 1, 1 << 30, [Running(2, 20 * MiB)], 8, 20 * MiB) == 0


def test_the_memory_budget_limits_proofs_at_once():
    # 300 MiB a proof, 700 MiB budget: two at once at most, whatever the cores
    assert plan(16, 16, 700 * MiB, [], 8, 300 * MiB) == 8
    assert plan(16, 16, 700 * MiB, [Running(8, 300 * MiB)], 8, 300 * MiB) == 8
    assert plan(16, 16, 700 * MiB, [Running(8, 300 * MiB)] * 2, 8, 300 * MiB) == 0
    # a proof above the budget alone still runs (alone)
    assert plan(2, 2, 100 * MiB, [], 3, 300 * MiB) == 2
    assert plan(2, 2, 100 * MiB, [Running(2, 300 * MiB)], 3, 300 * MiB) == 0


def test_an_unmeasured_circuit_runs_alone_until_its_peak_is_known():
    assert plan(2, 2, 1 << 30, [], 4, None) == 2
    assert plan(2, 2, 1 << 30, [Running(1, 20 * MiB)], 4, 0) == 0
    assert plan(2, 2, 1 << 30, [Running(1, 0)], 4, 20 * MiB) == 0


@pytest.mark.parametrize("cores", [1, 2, 3, 8, 16])
def test_random_arrivals_never_exceed_cores_cap_or_budget(cores):
    rng = random.Random(cores)
    for _ in range(2000):
        cap = rng.randint(1, cores + 2)
        budget = rng.choice([50, 300, 1000, 10000]) * MiB
        running = []
        waiting = rng.randint(1, 20)
        for _ in range(waiting):
            peak = rng.choice([None, 20 * MiB, 300 * MiB])
            threads = plan(cores, min(cap, cores), budget, running, waiting, peak)
            assert threads >= 0
            if threads:
                running.append(Running(threads, peak or 0))
                waiting -= 1
            assert sum(r.threads for r in running) <= cores
            assert len(running) <= min(cap, cores)
            if len(running) > 1:
                assert sum(r.peak_bytes for r in running) <= budget
                assert all(r.peak_bytes for r in running)
            if waiting == 0:
                break


# ---------------------------------------------------------------- Scheduler in one process

def snapshot(sched):
    """(running, waiting) as the other processes sharing `sched`'s directory see it: a list of
    Running(threads, peak_bytes) and the count of waiting requests in every process (what
    Scheduler.snapshot() returned before it was removed: _try_start's look at the state,
    without starting anything)."""
    with sched._state_lock(), _FreeSlots() as free:
        running = sched._scan(free)
        return [Running(r.threads, r.peak_bytes) for r in running], sched._waiting()


def test_a_lone_take_gets_every_core_and_the_peak_is_shared(tmp_path):
    sched = Scheduler(str(tmp_path / "s"), cores=4, cap=4, budget_bytes=1 << 30)
    grant = sched.take(1, "c")
    assert grant.threads == 4
    assert snapshot(sched) == ([Running(4, 0)], 0)
    sched.release(grant)
    assert snapshot(sched) == ([], 0)
    other = Scheduler(str(tmp_path / "s"), cores=4, cap=4, budget_bytes=1 << 30)  # another process's
    sched.record_peak("c", 30 * MiB)
    sched.record_peak("c", 10 * MiB)  # a smaller run does not lower the record
    assert other.peak_bytes("c") == 30 * MiB and other.peak_bytes("d") == 0


def test_requests_queued_behind_a_lone_proof_start_together_with_the_cores_split(tmp_path):
    sched = Scheduler(str(tmp_path / "s"), cores=2, cap=2, budget_bytes=1 << 30, poll=0.01)
    sched.record_peak("c", 20 * MiB)
    lone = sched.take(1, "c")
    assert lone.threads == 2
    grants = []

    def client(hold):
        grant = sched.take(5, "c")
        grants.append(grant.threads)
        gevent.sleep(hold)
        sched.release(grant)

    waiters = [gevent.spawn(client, hold) for hold in (0.2, 0.8, 0)]  # served in this order
    gevent.sleep(0.1)
    assert grants == [] and snapshot(sched) == ([Running(2, 20 * MiB)], 3)
    sched.release(lone)
    gevent.sleep(0.1)
    assert grants == [1, 1], "two start at once with one core each"
    gevent.joinall(waiters, timeout=10, raise_error=True)
    assert grants == [1, 1, 1], "the third starts beside the second, on the core the first freed"


def test_a_take_times_out_while_the_cores_are_busy(tmp_path):
    sched = Scheduler(str(tmp_path / "s"), cores=2, cap=2, budget_bytes=1 << 30)
    grant = sched.take(1, None)
    started = time.monotonic()
    with pytest.raises(SlotTimeout, match="0.3 s"):
        sched.take(0.3, None)
    assert 0.3 <= time.monotonic() - started < 1.5
    sched.release(grant)
    sched.release(sched.take(0.1, None))


def test_take_times_out_after_the_timeout(tmp_path):
    slots = Scheduler(str(tmp_path / "slots"), 1, 1, 1 << 30)
    grant = slots.take(1)
    try:
        started = time.monotonic()
        with pytest.raises(SlotTimeout, match="0.3 s"):
            slots.release(slots.take(0.3))
            pytest.fail("got a held slot")
        assert 0.3 <= time.monotonic() - started < 1.5
    finally:
        slots.release(grant)


def test_slots_are_shared_by_processes_and_released_on_error(tmp_path):
    slots = Scheduler(str(tmp_path / "slots"), 2, 2, 1 << 30)
    other = Scheduler(str(tmp_path / "slots"), 2, 2, 1 << 30)  # e.g. another worker process
    slots.record_peak("c", 1 << 20)
    first = slots.take(1, "c")
    try:
        assert first.threads == 2  # alone: every core
        with pytest.raises(SlotTimeout):  # no core left for another process
            other.release(other.take(0.1, "c"))
    finally:
        slots.release(first)
    with pytest.raises(ZeroDivisionError):
        grant = slots.take(1, "c")
        try:
            1 / 0
        finally:
            slots.release(grant)
    again = other.take(0, "c")
    try:
        assert again.threads == 2
    finally:
        other.release(again)


def test_a_waiting_greenlet_gets_the_slot_when_it_is_released(tmp_path):
    slots = Scheduler(str(tmp_path / "slots"), 1, 1, 1 << 30)
    order = []

    def job(name, hold):
        grant = slots.take(5)
        try:
            order.append(f"{name} in")
            gevent.sleep(hold)
            order.append(f"{name} out")
        finally:
            slots.release(grant)

    first = gevent.spawn(job, "a", 0.2)
    gevent.sleep(0.05)
    second = gevent.spawn(job, "b", 0)
    gevent.joinall([first, second], timeout=10, raise_error=True)
    assert order == ["a in", "a out", "b in", "b out"]


def test_slot_waiters_in_one_process_are_served_first_come_first_served(tmp_path):
    slots = Scheduler(str(tmp_path / "slots"), 1, 1, 1 << 30, poll=0.01)
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


def test_an_unsafe_slot_file_fails_the_take_without_leaking_the_slots_the_scan_took(tmp_path):
    """Issue "One error while taking a proof slot wedges proving for good": the scan takes each
    free slot in turn; an error on slot 1 (UnsafePath: its file is writable by others) used to
    leave slot 0, taken just before, held by this process for good, so every later take saw it
    running and waited. The take fails, and afterwards both slots are free."""
    state = tmp_path / "s"
    sched = Scheduler(str(state), cores=2, cap=2, budget_bytes=1 << 30)
    sched.release(sched.take(0))  # makes the directory and both slot files (the scan locks each)
    slot0, slot1 = str(state / "slot-0.lock"), str(state / "slot-1.lock")
    os.chmod(slot1, 0o666)
    with pytest.raises(files.UnsafePath, match="writable by other users") as failed:
        sched.take(1)
    assert failed.value.filename == slot1
    held = lock_slot(slot0)
    assert isinstance(held, HeldSlot), "the failed scan kept slot 0"
    held.close()
    os.chmod(slot1, 0o600)
    grant = sched.take(0)  # at once: nothing is left held, and the failed take left the line
    try:
        assert grant.threads == 2
        assert lock_slot(slot0) is None, "the grant holds the first free slot"
        other = lock_slot(slot1)
        assert isinstance(other, HeldSlot), "slot 1 is free beside the grant"
        other.close()
    finally:
        sched.release(grant)
    for path in (slot0, slot1):
        free = lock_slot(path)
        assert isinstance(free, HeldSlot), f"{path} stayed held"
        free.close()


def test_a_failed_write_of_the_slot_file_does_not_leak_the_slot(tmp_path, monkeypatch):
    """A full file system: writing the grant's threads into its slot file fails (ENOSPC). The take
    fails with that OSError, and the slot it had taken is free again."""
    state = tmp_path / "s"
    sched = Scheduler(str(state), cores=1, cap=1, budget_bytes=1 << 30)
    real_pwrite = os.pwrite

    def full_disk_pwrite(fd, data, offset):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith("slot-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_disk_pwrite)
    with warnings.catch_warnings():  # a leaked slot's socket, freed with the traceback, warns
        warnings.simplefilter("ignore", ResourceWarning)
        with pytest.raises(OSError, match="No space left"):
            sched.take(0)
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    held = lock_slot(str(state / "slot-0.lock"))
    assert isinstance(held, HeldSlot), "the failed take kept the slot"
    held.close()


def test_problems_name_unusable_slot_files(tmp_path):
    state = tmp_path / "s"
    sched = Scheduler(str(state), cores=2, cap=2, budget_bytes=1 << 30, lease=60)
    assert sched.problems() == []  # makes the directory and the slot files
    slot1 = str(state / "slot-1.lock")
    os.chmod(slot1, 0o666)
    problems = sched.problems()
    assert len(problems) == 1 and problems[0].startswith("proof slots unusable: ") and slot1 in problems[0]
    os.chmod(slot1, 0o600)
    assert sched.problems() == []


def test_problems_name_a_slot_held_past_the_lease_in_another_process(tmp_path):
    state = tmp_path / "s"
    sched = Scheduler(str(state), cores=2, cap=2, budget_bytes=1 << 30, lease=60)
    files.private_dir(str(state))
    other = lock_slot(str(state / "slot-0.lock"))  # another process's proof, started an hour ago
    try:
        os.pwrite(other.fd, f"1 0 {time.time() - 3600:.3f} 4242\n".encode(), 0)
        problems = sched.problems()
        assert len(problems) == 1 and "by process 4242" in problems[0] and "wedged" in problems[0], problems
        assert lock_slot(str(state / "slot-0.lock")) is None, "another process's slot is not this one's to free"
        assert Scheduler(str(state), cores=2, cap=2, budget_bytes=1 << 30).problems() == [], "no lease: no limit"
    finally:
        other.close()


def test_problems_free_this_process_s_own_slot_held_past_the_lease(tmp_path, caplog):
    state = tmp_path / "s"
    sched = Scheduler(str(state), cores=1, cap=1, budget_bytes=1 << 30, lease=60)
    grant = sched.take(0)
    assert sched.problems() == []  # within the lease
    assert lock_slot(str(state / "slot-0.lock")) is None
    sched._granted[grant.slot] -= 3600  # as if taken an hour ago and never released (a leak)
    with caplog.at_level("ERROR", logger="bb_worker"):
        assert sched.problems() == []
    assert "freed" in caplog.text
    free = lock_slot(str(state / "slot-0.lock"))
    assert isinstance(free, HeldSlot), "the leaked slot stayed held"
    free.close()
    sched.release(grant)  # the late release of a freed grant is harmless
    sched.release(sched.take(0))


def test_forget_process_removes_only_that_process_s_waiting_files(tmp_path):
    state = tmp_path / "s"
    state.mkdir()
    names = [f"{waiting_prefix(1234)}a", f"{waiting_prefix(1234)}b", f"{waiting_prefix(12345)}a", "peak-c"]
    for name in names:
        (state / name).write_text("1\n")
    forget_process(str(state), 1234)
    assert sorted(os.listdir(state)) == sorted(names[2:])
    forget_process(str(tmp_path / "missing"), 1234)  # no directory: nothing to do, no error


def test_the_waiting_files_of_dead_processes_are_not_counted_and_are_removed(tmp_path):
    state = tmp_path / "s"
    sched = Scheduler(str(state), cores=1, cap=1, budget_bytes=1 << 30)
    sched.release(sched.take(0))  # makes the directory and this process's waiting file
    dead = state / f"{waiting_prefix(2 ** 22 + 1)}0"  # nobody holds its flock: its process is gone
    dead.write_text("         5\n")
    assert snapshot(sched) == ([], 0)
    assert not dead.exists()


# ---------------------------------------------------------------- slot locks: lock_path, lock_slot

def test_lock_path_is_exclusive_and_survives_the_directory_being_replaced(tmp_path):
    d = tmp_path / "slots"
    d.mkdir(0o700)
    path = str(d / "slot-0.lock")
    first = lock_path(path)
    assert first is not None
    assert lock_path(path) is None  # held
    # Someone removes the directory while the slot is held and makes it again:
    os.unlink(path)
    os.rmdir(d)
    d.mkdir(0o700)
    second = lock_path(path)  # a new file: a new lock, and the only one on it
    assert second is not None and lock_path(path) is None
    os.close(first)
    os.close(second)


def test_lock_path_rechecks_the_inode_after_locking(tmp_path, monkeypatch):
    """The file is replaced between open() and flock(): the lock taken on the old inode is dropped."""
    path = str(tmp_path / "slot.lock")
    real_flock = fcntl.flock
    calls = []

    def racing_flock(fd, op):
        real_flock(fd, op)
        if not calls:  # first lock: replace the file under it
            os.unlink(path)
            holder = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            calls.append(holder)
    monkeypatch.setattr(scheduler.fcntl, "flock", racing_flock)
    fd = lock_path(path)
    assert fd is not None
    assert os.fstat(fd).st_ino == os.stat(path).st_ino
    os.close(fd)
    os.close(calls[0])


def test_lock_path_refuses_a_file_that_is_not_ours(tmp_path):
    os.symlink(tmp_path / "elsewhere", tmp_path / "slot-0.lock")
    with pytest.raises(OSError):
        lock_path(str(tmp_path / "slot-0.lock"))
    assert not (tmp_path / "elsewhere").exists()
    (tmp_path / "slot-1.lock").write_text("")
    os.chmod(tmp_path / "slot-1.lock", 0o622)
    with pytest.raises(files.UnsafePath, match="writable by other users"):
        lock_slot(str(tmp_path / "slot-1.lock"))
    os.chmod(tmp_path / "slot-1.lock", 0o600)
    held = lock_slot(str(tmp_path / "slot-1.lock"))
    assert isinstance(held, HeldSlot), "the failed lock_slot kept its socket bound"
    held.close()


def test_a_slot_stays_held_when_its_directory_is_removed_and_made_again(tmp_path):
    d = tmp_path / "slots"
    d.mkdir(0o700)
    path = str(d / "slot-0.lock")
    held = lock_slot(path)
    assert held is not None and lock_slot(path) is None
    os.unlink(path)
    os.rmdir(d)
    d.mkdir(0o700)
    assert lock_slot(path) is None  # the file is new, the slot is not free
    held.close()
    again = lock_slot(path)
    assert again is not None
    again.close()
    again.close()  # idempotent


def test_a_child_that_inherits_a_slot_keeps_it_taken(tmp_path):
    path = str(tmp_path / "slot-0.lock")
    held = lock_slot(path)
    child = subprocess.Popen(["sleep", "30"], pass_fds=held.fds)
    try:
        held.close()  # the parent lets go, e.g. a worker killed while bb runs
        assert lock_slot(path) is None
    finally:
        child.kill()
        child.wait()
    free = lock_slot(path)
    assert free is not None
    free.close()


# ---------------------------------------------------------------- across processes

TAKER = os.path.join(PROGRAMS, "scheduler_taker.py")


@pytest.fixture
def taker():
    """taker(state_dir, log, hold, ...) -> a started process that takes a grant, logs "start end
    threads" and holds it `hold` seconds (tests/programs/scheduler_taker.py); killed at the end."""
    procs = []

    def start(state_dir, log, hold, cores=2, cap=2, budget=1 << 30, peak=20 * MiB, timeout=20):
        proc = subprocess.Popen([sys.executable, TAKER, state_dir, str(log), str(hold), str(cores), str(cap),
                                 str(budget), str(peak), str(timeout)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def spans(log):
    return [tuple(float(x) for x in line.split()) for line in log.read_text().splitlines()]


def max_overlap(rows, value=lambda row: 1):
    """Largest sum of value(row) over rows that overlap in time."""
    return max(sum(value(r) for r in rows if r[0] <= t < r[1]) for t in (r[0] for r in rows))


def test_processes_share_cores_slots_and_budget(tmp_path, taker):
    state, log = str(tmp_path / "s"), tmp_path / "log"
    first = taker(state, log, hold=3.0)
    assert first.stdout.readline().split()[0] == "held"
    procs = [taker(state, log, hold=0.3) for _ in range(5)]
    for proc in [first] + procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    rows = spans(log)
    assert len(rows) == 6
    lone = min(rows)
    assert lone[2] == 2, "the first, alone, gets both cores"
    assert max_overlap(rows, lambda r: r[2]) <= 2, f"threads above the cores: {rows}"
    assert any(r[2] == 1 for r in rows), f"queued requests never split the cores: {rows}"
    # with a budget for one 20 MiB proof at a time, they run one by one
    log2 = tmp_path / "log2"
    procs = [taker(str(tmp_path / "s2"), log2, hold=0.2, budget=30 * MiB) for _ in range(4)]
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    assert max_overlap(spans(log2)) == 1


def test_a_killed_process_frees_its_slot_and_its_waiters(tmp_path, taker):
    state, log = str(tmp_path / "s"), tmp_path / "log"
    holder = taker(state, log, hold=300)
    assert holder.stdout.readline().split()[0] == "held"
    waiter = taker(state, log, hold=0, timeout=300)
    sched = Scheduler(state, cores=2, cap=2, budget_bytes=1 << 30)
    deadline = time.monotonic() + 20
    while snapshot(sched) != ([Running(2, 20 * MiB)], 1):
        assert time.monotonic() < deadline, snapshot(sched)
        time.sleep(0.05)
    waiter.kill()
    waiter.communicate(timeout=10)
    assert snapshot(sched) == ([Running(2, 20 * MiB)], 0)
    holder.send_signal(signal.SIGKILL)
    holder.communicate(timeout=10)
    assert snapshot(sched) == ([], 0)
    grant = sched.take(1, None)
    assert grant.threads == 2
    sched.release(grant)


def test_one_slot_is_held_by_one_process_at_a_time(tmp_path, taker):
    state, log = str(tmp_path / "slots"), tmp_path / "held.log"
    procs = [taker(state, log, hold=0.3, cores=1, cap=1, timeout=20) for _ in range(3)]
    for proc in procs:
        proc.wait(timeout=30)
    assert [p.returncode for p in procs] == [0, 0, 0]
    rows = sorted(spans(log))
    assert len(rows) == 3
    for (_, end, _), (start, _, _) in zip(rows, rows[1:]):
        assert start >= end, f"overlapping holders: {rows}"


def test_a_held_slot_times_out_other_processes_and_is_freed_by_sigkill(tmp_path, taker):
    state, log = str(tmp_path / "slots"), tmp_path / "held.log"
    first = taker(state, log, hold=300, cores=1, cap=1, timeout=5)
    assert first.stdout.readline() == "held 1\n"
    slots = Scheduler(state, 1, 1, 1 << 30)
    with pytest.raises(SlotTimeout):
        slots.release(slots.take(0.2))
    second = taker(state, log, hold=0, cores=1, cap=1, timeout=0.2)
    assert second.wait(timeout=30) == 3

    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    started = time.monotonic()
    grant = slots.take(1)
    try:
        assert time.monotonic() - started < 0.5
    finally:
        slots.release(grant)


# ---------------------------------------------------------------- machine limits

def test_cores_default_to_hardware_concurrency_and_the_cap_to_the_cores(tmp_path):
    for extra, expected in (({"HARDWARE_CONCURRENCY": "6"}, (6, 6)), ({"PROOF_CORES": "3"}, (3, 3)),
                            ({"PROOF_CORES": "3", "MAX_CONCURRENT_PROOFS": "1"}, (3, 1))):
        s = Settings.from_environ(dict(TMPDIR=str(tmp_path), **extra))
        assert (s.proof_cores, s.max_concurrent_proofs) == expected, extra


def test_available_cores_and_memory_are_plausible():
    assert 1 <= available_cores() <= os.cpu_count()
    assert 64 * MiB < available_memory() < 1 << 50


# ---------------------------------------------------------------- live: bb's HARDWARE_CONCURRENCY

def send_concurrently(port, body, count):
    """`count` proof requests at once (threads); returns their statuses."""
    import threading
    statuses = []

    def one():
        statuses.append(request(port, "POST", "/api/prove", body)[0])

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return statuses


def test_live_a_lone_proof_gets_every_core_and_queued_ones_split_them(start_server, fake_bb, tmp_path):
    log = tmp_path / "threads.log"
    srv = start_server(BB_BINARY=fake_bb, FAKE_BB_DELAY=1.0, FAKE_BB_THREADS_LOG=log, PROOF_CORES=4)
    witness = fixture_bytes("valid_1.gz")
    assert request(srv.port, "POST", "/api/prove", witness)[0] == 200  # alone; its peak RSS is learnt
    assert spans(log)[-1][2] == 4
    # one alone again (every core), four more arrive while it runs: they wait, then start together
    import threading
    first = threading.Thread(target=lambda: request(srv.port, "POST", "/api/prove", witness))
    first.start()
    deadline = time.monotonic() + 20
    while not support.bb_processes(fake_bb, under=srv.proc.pid):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert send_concurrently(srv.port, witness, 4) == [200] * 4
    first.join(60)
    rows = spans(log)[1:]
    assert sorted(r[2] for r in rows) == [1, 1, 1, 1, 4], rows
    lone = [r for r in rows if r[2] == 4][0]
    assert all(r[0] >= lone[1] for r in rows if r[2] == 1), "the queued ones waited for the lone proof"
    assert max_overlap(rows) == 4 and max_overlap(rows, lambda r: r[2]) == 4


def test_live_max_concurrent_proofs_1_pins_one_proof_at_a_time_with_every_core(start_server, fake_bb, tmp_path):
    log = tmp_path / "threads.log"
    srv = start_server(BB_BINARY=fake_bb, FAKE_BB_DELAY=0.3, FAKE_BB_THREADS_LOG=log, PROOF_CORES=4,
                       MAX_CONCURRENT_PROOFS=1)
    assert send_concurrently(srv.port, fixture_bytes("valid_1.gz"), 4) == [200] * 4
    rows = spans(log)
    assert [r[2] for r in rows] == [4] * 4 and max_overlap(rows) == 1


def test_live_real_bb_reads_the_thread_count_the_scheduler_chose(start_server, bb, verify):
    """Real bb: HARDWARE_CONCURRENCY in /proc/<pid>/environ of each running bb, summed over those alive."""
    srv = start_server(PROOF_CORES=2)
    witness = fixture_bytes("valid_1.gz")
    seen = {}  # pid -> threads
    peak_sum = [0]
    stop = [False]

    def sample():
        while not stop[0]:
            alive = {}
            for pid in support.bb_processes(bb, under=srv.proc.pid):
                try:
                    with open(f"/proc/{pid}/environ", "rb") as f:
                        env = dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)
                except OSError:
                    continue
                if b"HARDWARE_CONCURRENCY" in env:
                    alive[pid] = int(env[b"HARDWARE_CONCURRENCY"])
            seen.update(alive)
            peak_sum[0] = max(peak_sum[0], sum(alive.values()))
            time.sleep(0.005)

    import threading
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        status, _, body = request_json(srv.port, "POST", "/api/prove", witness)
        assert status == 200 and verify(base64.b64decode(body["proof"]), body["publicInputs"])
        assert set(seen.values()) == {2}, seen  # alone: both cores
        seen.clear()
        assert send_concurrently(srv.port, witness, 6) == [200] * 6
    finally:
        stop[0] = True
        sampler.join(10)
    assert 1 in seen.values(), f"queued proofs never split the cores: {seen}"
    assert peak_sum[0] <= 2, "bb threads alive at once above PROOF_CORES"
