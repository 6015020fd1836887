"""Readiness: whether a proof can succeed now, and a circuit breaker over server-side failures.

/api/health reports Readiness.state(). Checks are cheap callables (a few stat()
calls) run on every look, so a removed CRS shows at the next health check and a
restored one too, without a restart. The breaker covers what no check can see:
after `threshold` server-side failures in a row the instance reports not ready for
`cooldown` seconds (doubling while failures go on, up to `max_cooldown`); then, if
the checks pass, it is ready again on probation: one more server-side failure
trips it again at once, one success closes it.
"""
import time
from collections import namedtuple

State = namedtuple("State", "ready reasons")
State.__doc__ = """ready: bool. reasons: list of str, why not ready (empty when ready)."""


class Breaker:
    """Counts server-side failures; open() says whether it holds the instance out of the pool.

    threshold: failures in a row that trip it; cooldown, max_cooldown: seconds.
    clock: a monotonic clock (for tests).
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

    def failure(self, reason):
        """Record a server-side failure (`reason`: str); returns True when this trips the breaker."""
        self.failures += 1
        self.last_reason = reason
        if self._probation or self.failures >= self.threshold:
            if self._probation:
                self._wait = min(self._wait * 2, self.max_cooldown)
            self._until = self.clock() + self._wait
            self._probation = True
            return True
        return False

    def success(self):
        """Record a proof that went through (or a client's fault): close the breaker."""
        self.failures = 0
        self._until = None
        self._probation = False
        self._wait = self.cooldown

    def open(self):
        """Return a reason (str) while tripped and cooling down, else None."""
        if self._until is not None and self.clock() < self._until:
            return (f"{self.failures} server-side proof failures in a row (last: {self.last_reason}); "
                    f"re-checking in {self._until - self.clock():.0f} s")
        return None


class Readiness:
    """Ready when every check passes and the breaker is not open.

    checks: list of callables returning None when fine or a reason (str) when a
    proof cannot succeed; an exception they raise counts as its message.
    breaker: a Breaker, or None.
    """

    def __init__(self, checks, breaker=None):
        self.checks = list(checks)
        self.breaker = breaker

    def state(self):
        """Run the checks; return State(ready, reasons)."""
        reasons = []
        for check in self.checks:
            try:
                reason = check()
            except Exception as exc:  # a check that fails to run means we cannot vouch for proofs
                reason = f"{getattr(check, '__name__', 'check')} failed: {exc}"
            if reason:
                reasons.append(reason)
        tripped = self.breaker.open() if self.breaker is not None else None
        if tripped:
            reasons.append(tripped)
        return State(not reasons, reasons)
