"""health: the circuit breaker on a fake clock, readiness checks."""
from health import Breaker


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_breaker_trips_after_a_run_of_failures_and_recovers_on_probation():
    clock = Clock()
    b = Breaker(threshold=3, cooldown=5, max_cooldown=20, clock=clock)
    assert not b.failure("bb crashed") and not b.failure("bb crashed")
    b.success()  # a success breaks the run
    assert not b.failure("x") and not b.failure("x")
    assert b.failure("bb was killed by signal SIGABRT")
    reason = b.open()
    assert "3 server-side proof failure(s) in a row" in reason and "SIGABRT" in reason
    clock.now += 5
    assert b.open() is None  # probation
    assert b.failure("again")  # one failure on probation trips it again, for longer
    clock.now += 5
    assert b.open() is not None
    clock.now += 5
    assert b.open() is None
    b.success()
    assert not b.failure("once") and b.open() is None  # closed: a single failure does not trip it


def test_breaker_cooldown_is_capped():
    clock = Clock()
    b = Breaker(threshold=1, cooldown=5, max_cooldown=12, clock=clock)
    for _ in range(5):
        assert b.failure("x")
        clock.now += 12
    assert b.open() is None
