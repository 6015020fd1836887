"""Health and readiness: what /api/health answers, and what load balancers act on.

Health.check() is cheap (a stat() of bb, no subprocess: BB.status caches the
version) and says whether a proof can succeed now.
"""
import platform
from datetime import datetime, timezone


class Health:
    """Readiness of this worker. bb: the bbrunner.BB every circuit shares."""

    def __init__(self, bb):
        self.bb = bb

    def check(self):
        """Return (ready: bool, payload: dict) for /api/health.

        payload: {"status": "ok"|"unavailable", "architecture", "bb": {"available",
        "version", "binary_arch"}, "verifier_target", "timestamp" (ISO 8601, ms, Z)}.
        """
        status = self.bb.status()
        payload = {
            "status": "ok" if status.available else "unavailable",
            "architecture": platform.machine(),
            "bb": {"available": status.available, "version": status.version, "binary_arch": status.detail},
            "verifier_target": self.bb.verifier_target,
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }
        return status.available, payload
