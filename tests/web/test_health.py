"""bbworker.web.health: readiness checks with stand-ins for bb, the circuits, the self-check and the slots."""
from bbworker.bbrunner import Status
from bbworker.server.rundir import WorkerDir
from bbworker.web.health import Health


class SelfCheck:
    """Stands in for selfcheck.SelfCheck: `failing` maps a circuit to its reason; Retry-After `wait`."""

    def __init__(self, wait=8):
        self.failing, self.wait = {}, wait

    def problems(self, name):
        return [f"self-check failed: {self.failing[name]}"] if name in self.failing else []

    def retry_after(self, name):
        return self.wait


# ---------------------------------------------------------------- Health.check with stand-ins

class BB:
    verifier_target = None

    def __init__(self, available=True):
        self.available = available

    def status(self, wait=None):
        return Status(self.available, "5.0.0-stub" if self.available else None, "elf" if self.available else "gone")


def work_dir(tmp_path, name="w"):
    """The rundir.WorkerDir at tmp_path/`name`."""
    return WorkerDir(str(tmp_path), path=str(tmp_path / name))


class Circuit:
    def __init__(self, *problems):
        self.list = list(problems)

    def problems(self):
        return list(self.list)


def test_starting_until_every_vk_is_there_then_ok(tmp_path):
    a, b = Circuit("starting: the verification key is being computed"), Circuit()
    health = Health(BB(), {"default": a, "other": b}, work_dir(tmp_path))
    ready, payload = health.check()
    assert not ready and payload["status"] == "starting"
    assert payload["circuits"] == {"default": {"ready": False, "reasons": a.list},
                                   "other": {"ready": True, "reasons": []}}
    assert payload["reasons"] == ["circuit default: starting: the verification key is being computed"]
    a.list = []
    ready, payload = health.check()
    assert ready and payload["status"] == "ok" and "reasons" not in payload
    assert (tmp_path / "w").is_dir() and (tmp_path / "w").stat().st_mode & 0o777 == 0o700  # made by the check


def test_server_problems_make_every_circuit_unready(tmp_path):
    health = Health(BB(available=False), {"default": Circuit()}, work_dir(tmp_path))
    ready, payload = health.check()
    assert not ready and payload["status"] == "unavailable"
    assert payload["reasons"] == ["bb is not usable: gone"] and "circuits" not in payload
    (tmp_path / "file").write_text("")
    health = Health(BB(), {"default": Circuit()}, work_dir(tmp_path, "file"))
    assert health.check()[1]["reasons"][0].startswith("temp dir is not writable")
    wedged = ["proof slot held for 999 s by process 7, past any proof's deadlines: proving is wedged"]
    health = Health(BB(), {"default": Circuit()}, work_dir(tmp_path), slots=lambda: list(wedged))
    assert health.circuit_problems("default") == wedged
    wedged.clear()
    assert health.circuit_problems("default") == []
    stopping = []
    health = Health(BB(), {"default": Circuit()}, work_dir(tmp_path), stopping=lambda: bool(stopping))
    assert health.check()[0]
    stopping.append(True)
    ready, payload = health.check()
    assert not ready and payload["reasons"][0].startswith("stopping: SIGTERM")


def test_a_failing_self_check_takes_only_its_circuit_out(tmp_path):
    check = SelfCheck()
    health = Health(BB(), {"default": Circuit(), "other": Circuit()}, work_dir(tmp_path), check)
    check.failing["other"] = "bb was killed by signal SIGSEGV"
    ready, payload = health.check()
    assert not ready and payload["status"] == "unavailable"
    assert payload["circuits"]["default"] == {"ready": True, "reasons": []}
    assert payload["circuits"]["other"] == {"ready": False,
                                            "reasons": ["self-check failed: bb was killed by signal SIGSEGV"]}
    assert health.circuit_problems("default") == []
    check.failing.clear()
    assert health.check()[0]


def test_retry_after_follows_the_problem(tmp_path):
    check = SelfCheck(wait=8)
    health = Health(BB(), {"default": Circuit()}, work_dir(tmp_path), check)
    assert health.retry_after(["temp dir is not writable: /x"]) == 5
    assert health.retry_after(["CRS too small: /crs holds 1 G1 points"]) == 30
    check.failing["default"] = "bb crashed"
    assert health.retry_after(["self-check failed: bb crashed"], "default") == 8  # the next background check


def test_a_health_check_answers_starting_while_a_slow_bb_tells_its_version(tmp_path):
    """`bb --version` may take seconds (a cold disk, an emulated arch): a health check waits a quarter
    of a second for it, then answers 503 "starting" instead of keeping the load balancer waiting."""
    import time

    from bbworker.bbrunner import BB as RealBB
    from support import write_script

    slow = RealBB(write_script(tmp_path / "bb", "#!/bin/sh\nsleep 2\necho 5.0.0-slow\n"))
    health = Health(slow, {"default": Circuit()}, work_dir(tmp_path))
    started = time.monotonic()
    ready, payload = health.check()
    assert time.monotonic() - started < 1.5
    assert not ready and payload["status"] == "starting"
    assert payload["reasons"] == ["starting: bb --version is running"]
    assert slow.status().version == "5.0.0-slow"  # the run went on; asked again, bb's answer
    assert health.check()[0]
