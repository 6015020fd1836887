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


# ---------------------------------------------------------------- Health.check with stand-ins

class BB:
    verifier_target = None

    def __init__(self, available=True):
        self.available = available

    def status(self):
        from bbrunner import Status
        return Status(self.available, "5.0.0-stub" if self.available else None, "elf" if self.available else "gone")


class Circuit:
    def __init__(self, *problems):
        self.list = list(problems)

    def problems(self):
        return list(self.list)


def test_starting_until_every_vk_is_there_then_ok(tmp_path):
    from health import Health
    a, b = Circuit("starting: the verification key is being computed"), Circuit()
    health = Health(BB(), {"default": a, "other": b}, str(tmp_path / "w"))
    ready, payload = health.check()
    assert not ready and payload["status"] == "starting"
    assert payload["circuits"] == {"default": {"ready": False, "reasons": a.list}, "other": {"ready": True, "reasons": []}}
    assert payload["reasons"] == ["circuit default: starting: the verification key is being computed"]
    a.list = []
    ready, payload = health.check()
    assert ready and payload["status"] == "ok" and "reasons" not in payload
    assert (tmp_path / "w").is_dir() and (tmp_path / "w").stat().st_mode & 0o777 == 0o700  # made by the check


def test_server_problems_make_every_circuit_unready(tmp_path):
    from health import Health
    health = Health(BB(available=False), {"default": Circuit()}, str(tmp_path / "w"))
    ready, payload = health.check()
    assert not ready and payload["status"] == "unavailable"
    assert payload["reasons"] == ["bb is not usable: gone"] and "circuits" not in payload
    (tmp_path / "file").write_text("")
    health = Health(BB(), {"default": Circuit()}, str(tmp_path / "file"))
    assert health.check()[1]["reasons"][0].startswith("temp dir is not writable")
    clock = Clock()
    health = Health(BB(), {"default": Circuit()}, str(tmp_path / "w"), Breaker(threshold=1, clock=clock))
    health.breaker.failure("bb crashed")
    assert health.circuit_problems("default")[0].startswith("1 server-side proof failure(s) in a row")
    clock.now += 5
    assert health.circuit_problems("default") == []
    stopping = []
    health = Health(BB(), {"default": Circuit()}, str(tmp_path / "w"), stopping=lambda: bool(stopping))
    assert health.check()[0]
    stopping.append(True)
    ready, payload = health.check()
    assert not ready and payload["reasons"][0].startswith("stopping: SIGTERM")
