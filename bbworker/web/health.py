"""Health and readiness: what /api/health answers, and what load balancers act on.

Health.check() says whether a proof can succeed now, per circuit, and why not: bb unusable
(BB.status, cached: no bb run), a circuit's VK not computed yet ("starting") or failed, its CRS
missing or smaller than the VK says the circuit needs (Circuit.problems: a few stat() calls),
the work directory missing, not writable or full, a failing self-check (selfcheck.SelfCheck),
proof slots that cannot be taken (the scheduler), or the process stopping (SIGTERM:
server.worker.stopping). Every look runs the checks again, so a fault shows at the next health
check and its end too, without a restart. Health.live() is liveness: the process answers.
"""
import os
import platform
from datetime import datetime, timezone

from bbworker import files
from bbworker.errors import CrsUnavailable

CRS_RETRY_AFTER_SECONDS = CrsUnavailable.retry_after
STATUS_WAIT_SECONDS = 0.25  # a health check waits at most this long for a `bb --version` to end


class Health:
    """Readiness of this worker.

    bb: the bbrunner.BB every circuit shares. circuits: dict name -> bbrunner.Circuit
    (anything with problems()). work_dir: rundir.WorkerDir, this worker's directory for
    request files (made again, mode 0700, when it is gone). selfcheck: a selfcheck.SelfCheck
    (anything with problems(name) and retry_after(name)), or None. slots: a callable giving
    why no proof slot can be taken (list of str; scheduler.Scheduler.problems). stopping: a callable, True
    once the process is shutting down (server.worker.stopping).
    """

    def __init__(self, bb, circuits, work_dir, selfcheck=None, slots=list, stopping=lambda: False):
        self.bb = bb
        self.circuits = circuits
        self.work_dir = work_dir
        self.selfcheck = selfcheck
        self.slots = slots
        self.stopping = stopping

    def server_problems(self):
        """Why no proof can succeed now, whatever the circuit (list of str)."""
        problems = []
        if self.stopping():
            problems.append("stopping: SIGTERM received; the requests in flight finish, no new ones")
        status = self.bb.status(wait=STATUS_WAIT_SECONDS)
        if not status.available:
            problems.append(status.detail if status.detail.startswith("starting") else f"bb is not usable: {status.detail}")
        return problems + self.work_dir_problems() + self.slots()

    def work_dir_problems(self):
        """[] when the work directory is there (made if need be), ours, writable and not full."""
        path = None
        try:
            path = self.work_dir.path
            files.private_dir(path)
            if not os.access(path, os.W_OK | os.X_OK):
                return [f"temp dir is not writable: {path}"]
            st = os.statvfs(path)
        except OSError as exc:
            return [f"temp dir is not writable: {exc.filename or path}: {exc.strerror}"]
        free = st.f_bavail * st.f_frsize
        if free < files.LOW_SPACE_BYTES:
            return [f"no space left in the temp dir: {free} bytes free"]
        return []

    def retry_after(self, problems, name=None):
        """Retry-After seconds (int) for a 503 answered because of `problems` (list of str) of
        circuit `name` (None: any)."""
        if any("CRS" in p[:30] for p in problems):
            return CRS_RETRY_AFTER_SECONDS
        names = [name] if name is not None else list(self.circuits)
        failing = [self.selfcheck.retry_after(n) for n in names if self.selfcheck and self.selfcheck.problems(n)]
        return min(failing) if failing else 5

    def own_problems(self, name):
        """Why circuit `name` in particular cannot be proved (list of str): its own and its self-check's."""
        return self.circuits[name].problems() + (self.selfcheck.problems(name) if self.selfcheck else [])

    def circuit_problems(self, name):
        """Why a proof of circuit `name` cannot succeed now (list of str; empty: it can)."""
        return self.server_problems() + self.own_problems(name)

    def check(self):
        """Return (ready: bool, payload: dict) for /api/health.

        payload: {"status": "ok"|"starting"|"unavailable", "architecture", "bb":
        {"available", "version", "binary_arch"}, "verifier_target", "timestamp"
        (ISO 8601, ms, Z), and when not ready "reasons" (list of str)}, plus
        "circuits": {name: {"ready", "reasons"}} when several circuits are served.
        Ready only when every circuit is.
        """
        status = self.bb.status(wait=STATUS_WAIT_SECONDS)
        server = self.server_problems()
        reasons = list(server)
        circuits = {}
        for name in self.circuits:
            own = self.own_problems(name)
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
