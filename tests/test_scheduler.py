"""The proof scheduler: threads per bb (plan) and the state it shares across processes (Scheduler)."""
import base64
import os
import random
import signal
import subprocess
import sys
import time

import gevent
import pytest

import settings
import support
from conftest import fixture_bytes
from scheduler import Running, Scheduler, SlotTimeout, plan
from support import ROOT, request, request_json

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

def test_a_lone_take_gets_every_core_and_the_peak_is_shared(tmp_path):
    sched = Scheduler(str(tmp_path / "s"), cores=4, cap=4, budget_bytes=1 << 30)
    grant = sched.take(1, "c")
    assert grant.threads == 4
    assert sched.snapshot() == ([Running(4, 0)], 0)
    sched.release(grant)
    assert sched.snapshot() == ([], 0)
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
    assert grants == [] and sched.snapshot() == ([Running(2, 20 * MiB)], 3)
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


# ---------------------------------------------------------------- across processes

TAKER = os.path.join(ROOT, "tests", "scheduler_taker.py")


def taker(state_dir, log, hold, cores=2, cap=2, budget=1 << 30, peak=20 * MiB, timeout=20):
    """A real process that takes a grant, logs "start end threads", holds it `hold` seconds."""
    return subprocess.Popen([sys.executable, TAKER, state_dir, str(log), str(hold), str(cores), str(cap),
                             str(budget), str(peak), str(timeout)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def spans(log):
    return [tuple(float(x) for x in line.split()) for line in log.read_text().splitlines()]


def max_overlap(rows, value=lambda row: 1):
    """Largest sum of value(row) over rows that overlap in time."""
    return max(sum(value(r) for r in rows if r[0] <= t < r[1]) for t in (r[0] for r in rows))


def test_processes_share_cores_slots_and_budget(tmp_path):
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


def test_a_killed_process_frees_its_slot_and_its_waiters(tmp_path):
    state, log = str(tmp_path / "s"), tmp_path / "log"
    holder = taker(state, log, hold=300)
    assert holder.stdout.readline().split()[0] == "held"
    waiter = taker(state, log, hold=0, timeout=300)
    sched = Scheduler(state, cores=2, cap=2, budget_bytes=1 << 30)
    deadline = time.monotonic() + 20
    while sched.snapshot() != ([Running(2, 20 * MiB)], 1):
        assert time.monotonic() < deadline, sched.snapshot()
        time.sleep(0.05)
    waiter.kill()
    waiter.communicate(timeout=10)
    assert sched.snapshot() == ([Running(2, 20 * MiB)], 0)
    holder.send_signal(signal.SIGKILL)
    holder.communicate(timeout=10)
    assert sched.snapshot() == ([], 0)
    grant = sched.take(1, None)
    assert grant.threads == 2
    sched.release(grant)


# ---------------------------------------------------------------- machine limits

def test_cores_default_to_hardware_concurrency_and_the_cap_to_the_cores(tmp_path):
    script = "import settings; print(settings.PROOF_CORES, settings.MAX_CONCURRENT_PROOFS)"
    env = {k: v for k, v in os.environ.items() if k not in ("PROOF_CORES", "MAX_CONCURRENT_PROOFS")}
    for extra, expected in (({"HARDWARE_CONCURRENCY": "6"}, "6 6"), ({"PROOF_CORES": "3"}, "3 3"),
                            ({"PROOF_CORES": "3", "MAX_CONCURRENT_PROOFS": "1"}, "3 1")):
        out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=dict(env, TMPDIR=str(tmp_path), **extra),
                             capture_output=True, text=True, timeout=60)
        assert out.stdout.split() == expected.split(), out.stderr


def test_available_cores_and_memory_are_plausible():
    assert 1 <= settings.available_cores() <= os.cpu_count()
    assert 64 * MiB < settings.available_memory() < 1 << 50


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
