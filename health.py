"""Health and readiness: what /api/health answers, and what load balancers act on.

Health.check() says whether a proof can succeed now, per circuit, and why not:
bb unusable (BB.status, cached: no bb run), a circuit's VK not computed yet
("starting") or failed, its CRS missing or smaller than the VK says the circuit
needs (Circuit.problems: a few stat() calls), the work directory missing, not
writable or full, the Breaker open after a run of server-side failures, or the
process stopping (SIGTERM: connection.stopping). Every
look runs the checks again, so a fault shows at the next health check and its
end too, without a restart. Health.live() is liveness: the process answers.
"""
import os
import platform
import time
from datetime import datetime, timezone

import ownership

MIN_FREE_BYTES = 1024 * 1024  # less free space than this in the work directory: not ready


class Breaker:
    """A circuit breaker over server-side proof failures.

    After `threshold` of them in a row (or one that must trip it at once, such as
    the CRS failing) open() gives a reason for `cooldown` seconds; then the
    instance is ready again on probation: one more failure trips it at once for
    twice as long (up to `max_cooldown`), one success closes it. clock: monotonic
    seconds (for tests).
    """

    def __init__(self, threshold=3, cooldown=5.0, max_cooldown=60.0, clock=time.monotonic):
        self.threshold = threshold
        self.cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.clock = clock
        self.failures = 0
        self.last_reason = None
        self._until = None  # monotonic time the current trip ends; None: closed
        self._wait = cooldown
        self._probation = False

    def failure(self, reason, trip=False):
        """Record a server-side failure (`reason`: str); return True when the breaker trips."""
        self.failures += 1
        self.last_reason = reason
        if not (trip or self._probation or self.failures >= self.threshold):
            return False
        if self._probation:
            self._wait = min(self._wait * 2, self.max_cooldown)
        self._until = self.clock() + self._wait
        self._probation = True
        return True

    def success(self):
        """Record a proof that went through, or failed by the client's fault: close the breaker."""
        self.failures = 0
        self._until = None
        self._probation = False
        self._wait = self.cooldown

    def open(self):
        """Return why proofs are held back (str) while tripped, else None."""
        left = None if self._until is None else self._until - self.clock()
        if left is None or left <= 0:
            return None
        return (f"{self.failures} server-side proof failure(s) in a row (last: {self.last_reason}); "
                f"trying again in {max(1, round(left))} s")

    def retry_after(self):
        """Seconds (int, at least 1) until the breaker lets proofs through again."""
        return max(1, round((self._until or 0) - self.clock()))


class Health:
    """Readiness of this worker.

    bb: the bbrunner.BB every circuit shares. circuits: dict name -> bbrunner.Circuit
    (anything with problems()). work_dir: this worker's directory for request files
    (made again, mode 0700, when it is gone). breaker: a Breaker. stopping: a callable,
    True once the process is shutting down (connection.stopping).
    """

    def __init__(self, bb, circuits, work_dir, breaker=None, stopping=lambda: False):
        self.bb = bb
        self.circuits = circuits
        self.work_dir = work_dir
        self.breaker = breaker or Breaker()
        self.stopping = stopping

    def server_problems(self):
        """Why no proof can succeed now, whatever the circuit (list of str)."""
        problems = []
        if self.stopping():
            problems.append("stopping: SIGTERM received; the requests in flight finish, no new ones")
        status = self.bb.status()
        if not status.available:
            problems.append(f"bb is not usable: {status.detail}")
        problems += self.work_dir_problems()
        tripped = self.breaker.open()
        if tripped:
            problems.append(tripped)
        return problems

    def work_dir_problems(self):
        """[] when the work directory is there (made if need be), ours, writable and not full."""
        try:
            ownership.private_dir(self.work_dir)
            if not os.access(self.work_dir, os.W_OK | os.X_OK):
                return [f"temp dir is not writable: {self.work_dir}"]
            st = os.statvfs(self.work_dir)
        except OSError as exc:
            return [f"temp dir is not writable: {exc.filename or self.work_dir}: {exc.strerror}"]
        free = st.f_bavail * st.f_frsize
        if free < MIN_FREE_BYTES:
            return [f"no space left in the temp dir: {free} bytes free"]
        return []

    def circuit_problems(self, name):
        """Why a proof of circuit `name` cannot succeed now (list of str; empty: it can)."""
        return self.server_problems() + self.circuits[name].problems()

    def check(self):
        """Return (ready: bool, payload: dict) for /api/health.

        payload: {"status": "ok"|"starting"|"unavailable", "architecture", "bb":
        {"available", "version", "binary_arch"}, "verifier_target", "timestamp"
        (ISO 8601, ms, Z), and when not ready "reasons" (list of str)}, plus
        "circuits": {name: {"ready", "reasons"}} when several circuits are served.
        Ready only when every circuit is.
        """
        status = self.bb.status()
        server = self.server_problems()
        reasons = list(server)
        circuits = {}
        for name, circuit in self.circuits.items():
            own = circuit.problems()
            circuits[name] = {"ready": not (server or own), "reasons": server + own}
            reasons += [f"circuit {name}: {r}" if len(self.circuits) > 1 else r for r in own]
        starting = bool(reasons) and all(r.startswith(("starting", "circuit ")) and "starting:" in r
                                         for r in reasons)
        payload = {
            "status": "ok" if not reasons else "starting" if starting else "unavailable",
            "architecture": platform.machine(),
            "bb": {"available": status.available, "version": status.version, "binary_arch": status.detail},
            "verifier_target": self.bb.verifier_target,
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }
        if reasons:
            payload["reasons"] = reasons
        if len(self.circuits) > 1:
            payload["circuits"] = circuits
        return not reasons, payload

    @staticmethod
    def live():
        """Liveness payload: the process answers (dict)."""
        return {"status": "alive", "pid": os.getpid()}
