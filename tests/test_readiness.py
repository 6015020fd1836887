"""readiness: checks and the circuit breaker, on a fake clock."""
from readiness import Breaker, Readiness


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_checks_are_run_on_every_look():
    missing = []
    r = Readiness([lambda: "CRS missing" if missing else None, lambda: None])
    assert r.state() == (True, [])
    missing.append(1)
    assert r.state() == (False, ["CRS missing"])
    missing.clear()
    assert r.state().ready


def test_a_check_that_raises_means_not_ready():
    def crs():
        raise OSError("boom")
    state = Readiness([crs]).state()
    assert not state.ready and "crs failed: boom" in state.reasons[0]


def test_breaker_trips_after_a_run_of_failures_and_recovers_on_probation():
    clock = Clock()
    b = Breaker(threshold=3, cooldown=5, max_cooldown=20, clock=clock)
    r = Readiness([], b)
    assert not b.failure("bb crashed") and not b.failure("bb crashed")
    b.success()  # a success breaks the run
    assert not b.failure("x") and not b.failure("x")
    assert b.failure("bb was killed by signal SIGABRT")
    state = r.state()
    assert not state.ready and "3 server-side proof failures in a row" in state.reasons[0]
    assert "SIGABRT" in state.reasons[0]
    clock.now += 5
    assert r.state().ready  # probation
    assert b.failure("again")  # one failure on probation trips it again, for longer
    clock.now += 5
    assert not r.state().ready
    clock.now += 5
    assert r.state().ready
    b.success()
    assert not b.failure("once") and r.state().ready  # closed: a single failure does not trip it


def test_breaker_cooldown_is_capped():
    clock = Clock()
    b = Breaker(threshold=1, cooldown=5, max_cooldown=12, clock=clock)
    for _ in range(5):
        assert b.failure("x")
        clock.now += 12
    assert b.open() is None
