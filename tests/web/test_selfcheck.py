"""bbworker.web.selfcheck: a failure that could be the client's is confirmed by a run no client controls."""
import os
import time

import gevent
import pytest

from bbworker import errors
from bbworker.server import rundir
from bbworker.server.scheduler import Scheduler
from bbworker.web.admission import ProofQueue
from bbworker.web.selfcheck import SelfCheck

CRASH = errors.ProverCrashed(-11, "bb was killed by signal SIGSEGV")


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def check_of(tmp_path):
    """check_of(circuit, **options) -> a SelfCheck of {"default": circuit} with a real queue, a fake clock."""
    def build(circuit, **options):
        queue = ProofQueue(Scheduler(str(tmp_path / "slots"), 1, 1, 1 << 30), 1.0)
        work = rundir.WorkerDir(str(tmp_path), path=str(tmp_path / "w"))
        return SelfCheck({"default": circuit}, queue, work, clock=options.pop("clock", Clock()), **options)
    return build


def test_a_passing_check_says_the_server_works_and_leaves_readiness_alone(check_of, stub_circuit, tmp_path):
    circuit = stub_circuit(check_error=None)
    check = check_of(circuit)
    assert check.confirm("default") is True
    assert len(circuit.checks) == 1 and circuit.checks[0]["workdir_entries"] == []  # a fresh directory
    assert check.problems("default") == [] and os.listdir(tmp_path / "w") == []  # its files are gone


def test_only_a_check_started_after_the_failure_counts(check_of, stub_circuit):
    """A proof that went through before says nothing of now (the CRS may have changed since): every
    failure is checked again, by a run that starts after it."""
    clock = Clock()
    circuit = stub_circuit(check_error=None)
    check = check_of(circuit, clock=clock)
    check.verified("default", b"proof", b"inputs")  # a request went through
    assert check.confirm("default") and len(circuit.checks) == 1
    clock.now += 1
    assert check.confirm("default") and len(circuit.checks) == 2


def test_a_failing_check_takes_the_circuit_out_until_a_background_check_passes(check_of, stub_circuit):
    circuit = stub_circuit(check_error=CRASH)
    check = check_of(circuit, cooldown=0.05, max_cooldown=0.2, clock=Clock())
    assert check.confirm("default") is False
    assert check.problems("default") == ["self-check failed: bb crashed: bb was killed by signal SIGSEGV"]
    assert check.retry_after("default") >= 1
    gevent.sleep(0.15)
    assert check.problems("default"), "still failing: it stays out"
    assert len(circuit.checks) >= 2, "checked again in the background"
    circuit.check_error = None  # the cause is gone
    for _ in range(50):
        gevent.sleep(0.05)
        if not check.problems("default"):
            break
    assert check.problems("default") == [] and check.confirm("default")


def test_a_request_that_holds_a_slot_lends_it_to_the_check(check_of, stub_circuit):
    circuit = stub_circuit(check_error=None)
    check = check_of(circuit)

    class Grant:
        fds, threads = (7, 8), 3
    assert check.confirm("default", grant=Grant())
    assert circuit.checks[0]["keep_fds"] == (7, 8) and circuit.checks[0]["threads"] == 3


def test_without_a_slot_the_check_takes_one_or_is_busy(check_of, stub_circuit, tmp_path):
    circuit = stub_circuit(check_error=None)
    check = check_of(circuit)
    held = check.queue.slots.take(1)
    try:
        with pytest.raises(errors.Busy):
            check.confirm("default")
    finally:
        check.queue.slots.release(held)
    assert circuit.checks == [] and check.problems("default") == []  # busy is nobody's fault
    assert check.confirm("default") and len(circuit.checks) == 1


def test_a_verification_is_checked_on_a_proof_known_to_verify(check_of, stub_circuit):
    clock = Clock()
    circuit = stub_circuit(check_error=None)
    check = check_of(circuit, clock=clock)
    check.verified("default", b"known proof", b"inputs")
    assert check.confirm("default", verifying=True)
    assert circuit.checks == [] and circuit.verified[-1]["proof"] == b"known proof"  # no proof made: 10 ms
    circuit.verdict = False  # bb verify now rejects what it accepted before: ours
    clock.now += 1
    assert not check.confirm("default", verifying=True)
    assert check.problems("default") == ["self-check failed: bb verify now says no to a proof it said True to before"]


def test_a_verification_with_no_known_proof_checks_bytes_of_the_servers_making_without_proving(
        check_of, stub_circuit):
    """bb verify running and judging is what a verification needs: with no proof known to verify,
    bb verify must judge proof-shaped bytes the server made (the same every time) as it did first."""
    from bbworker.bbrunner.circuit import ProofShape
    from bbworker.web.selfcheck import made_up_proof

    clock = Clock()
    circuit = stub_circuit(check_error=None, verdict=False)
    circuit.shape = ProofShape(14656, 1, 9)
    check = check_of(circuit, clock=clock)
    assert check.confirm("default", verifying=True)
    made = made_up_proof(circuit.shape)
    assert circuit.checks == [] and [v["proof"] for v in circuit.verified] == [made[0]] * 2  # its verdict, then again
    assert len(made[0]) == 14656 and len(made[1]) == 32 and made == made_up_proof(circuit.shape)
    clock.now += 1
    assert check.confirm("default", verifying=True) and circuit.checks == []
    circuit.verify_error = errors.ServerFault(1, "bb verify failed: Segmentation fault")
    clock.now += 1
    assert not check.confirm("default", verifying=True)
    assert check.problems("default") == ["self-check failed: bb failed: bb verify failed: Segmentation fault"]


def test_one_check_at_a_time_the_others_share_its_verdict(check_of, stub_circuit):
    circuit = stub_circuit(check_error=None)
    check = check_of(circuit, clock=time.monotonic)
    original = circuit.self_check

    def slow(*args, **kwargs):
        gevent.sleep(0.1)
        return original(*args, **kwargs)
    circuit.self_check = slow
    first = gevent.spawn(check.confirm, "default")
    gevent.sleep(0)  # its check has started
    others = [gevent.spawn(check.confirm, "default") for _ in range(4)]  # failures during that check
    gevent.joinall([first] + others)
    assert [g.value for g in [first] + others] == [True] * 5
    assert len(circuit.checks) == 2  # the first's check, then one check shared by the four that failed meanwhile
