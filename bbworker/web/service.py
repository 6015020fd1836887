"""What the handlers share: one worker's proving resources, its rules, and the Reply they return.

ProverService holds the circuits, the proof queue, the verification limit, readiness, the
self-check and the worker's directory for request files; it computes the VKs after the port is
open, refuses work readiness says cannot succeed, and judges a bb failure (whose fault, with the
self-check). accounted() gives a prove or verify request exactly one outcome.
"""
import contextlib
import json
import logging
import os
from collections import namedtuple

import gevent

from bbworker import files
from bbworker.errors import ClientGone, Error, NotReady, ProofFailed, ProofRejected, ProverError, ServiceUnavailable

log = logging.getLogger("bb_worker")

WARM_UP_MAX_DELAY_SECONDS = 30.0  # longest pause between two attempts to compute a failed VK

Reply = namedtuple("Reply", "status body content_type headers")
Reply.__doc__ = """A handler's answer: status (int), body (bytes), content_type (str or None), headers (list)."""


def json_reply(status, payload, headers=()):
    """A Reply whose body is `payload` as compact JSON."""
    return Reply(status, json.dumps(payload, separators=(",", ":")).encode(), "application/json", list(headers))


@contextlib.contextmanager
def accounted(environ, counter, name):
    """Give one prove or verify request of circuit `name` exactly one outcome: in the access log
    (environ's bb_worker.outcome and bb_worker.fault) and counted once in `counter` (a metrics
    counter labelled circuit, outcome). The handler sets the outcome where it knows it (success,
    valid, a bb failure, not_ready); an error that ends the request unset gives its own (its
    class's outcome and fault), and a client that hung up ends it as client_gone whatever came before.
    """
    try:
        yield
    except Exception as exc:
        if isinstance(exc, ClientGone) or "bb_worker.outcome" not in environ:
            error = exc if isinstance(exc, Error) else Error("")
            environ["bb_worker.outcome"], environ["bb_worker.fault"] = error.outcome, error.fault
        raise
    finally:
        if environ.get("bb_worker.outcome"):
            counter.labels(name, environ["bb_worker.outcome"]).inc()


class ProverService:
    """One worker process's proving resources.

    circuits: dict name -> bbrunner.Circuit, all sharing one bbrunner.BB. queue:
    admission.ProofQueue. verify_limit: admission.VerifyLimit. health: health.Health.
    selfcheck: selfcheck.SelfCheck. work_dir: rundir.WorkerDir, this worker's private directory
    for request files (made, mode 0700, when first needed).
    """

    def __init__(self, circuits, queue, verify_limit, health, selfcheck, work_dir):
        self.circuits = circuits
        self.queue = queue
        self.verify_limit = verify_limit
        self.health = health
        self.selfcheck = selfcheck
        self.work_dir = work_dir
        self._warm_up = None  # the greenlet computing missing VKs

    # -- start-up: the VKs, computed after the port is open

    def start(self):
        """Compute missing VKs in a background greenlet (again whenever one goes missing); idempotent.

        The first call only spawns it: telling whether a VK is cached asks bb its version, which
        may take seconds, and the worker accepts no connection until post_worker_init returns.
        """
        if self._warm_up is None:
            self._warm_up = gevent.spawn(self.warm_up)
        elif self._warm_up.dead and any(not _vk_ready(c) for c in self.circuits.values()):
            self._warm_up = gevent.spawn(self.warm_up)

    def warm_up(self):
        """Compute every circuit's VK, each on a proof slot; retry failures with a growing pause."""
        delay = 1.0
        while True:
            missing = [(name, c) for name, c in self.circuits.items() if not _vk_ready(c)]
            if not missing:
                return
            for name, circuit in missing:
                try:
                    self.compute_vk(circuit)
                    log.info("circuit %s: VK ready (bb %s)", name, circuit.bb.version())
                except Error as exc:
                    log.error("circuit %s: the verification key could not be computed: %s", name, exc.detail)
            gevent.sleep(delay)
            delay = min(delay * 2, WARM_UP_MAX_DELAY_SECONDS)

    def compute_vk(self, circuit):
        """circuit.vk.ensure() on a proof slot: `bb write_vk` runs bb like a proof does.

        The slot names no circuit, so write_vk's peak RSS is not taken for a proof's.
        Raises what ProofQueue.slot() and VerificationKey.ensure() raise.
        """
        with self.queue.slot() as grant:
            circuit.vk.ensure(grant.threads)

    # -- readiness and failures

    def refuse_unless_ready(self, environ, name):
        """Raise NotReady (503, Retry-After) when readiness says circuit `name` cannot be served
        now (Health.circuit_problems: bb, VK, CRS, temp dir, self-check, slots), before bb runs."""
        problems = self.health.circuit_problems(name)
        if problems:
            environ["bb_worker.outcome"], environ["bb_worker.fault"] = NotReady.outcome, NotReady.fault
            raise NotReady(problems[0], retry_after=self.health.retry_after(problems, name))

    def failed(self, environ, exc, name=None, grant=None, verifying=False):
        """Judge a bbrunner failure `exc` (a ProverError) of this request, whose outcome and fault it
        sets; return the error to answer, or None for a verification bb judged invalid.

        name: the circuit, when bb ran on the client's bytes (a witness, or a proof when
        `verifying`): a failure that looks like ours is then confirmed by the self-check (run in
        `grant`, the request's proof slot, when it holds one), which moves readiness when it fails.
        When it shows the server works, a failure bb can owe to its input (`may_be_input`) is the
        input's: 422 for a witness, invalid for a proof.
        Raises Busy when the self-check finds no proof slot.
        """
        environ["bb_worker.bb_exit_code"] = exc.returncode
        if name is not None and exc.fault == "server":
            works = self.selfcheck.confirm(name, verifying, grant, rejected=isinstance(exc, ProofRejected))
            if works and exc.may_be_input:
                if verifying:
                    return None
                exc = ProofFailed(f"bb prove failed on this witness: {exc.detail} (the server proves its own "
                                  "witness of this circuit)")
        environ["bb_worker.outcome"], environ["bb_worker.fault"] = exc.outcome, exc.fault
        return exc

    def succeeded(self, name, proof, public_inputs, verified=True):
        """A request's bb run for circuit `name` went through: `proof` and `public_inputs` (bytes, bb's
        formats), when `verified` by bb verify, are the self-check's reference from now on."""
        if verified:
            self.selfcheck.verified(name, proof, public_inputs)

    @contextlib.contextmanager
    def writing_work_dir(self, environ):
        """For the `with` body's writes into the work directory, made again (mode 0700) when gone:
        an OSError is logged and answered 503 "temp dir is not writable" (outcome unavailable)."""
        try:
            files.private_dir(self.work_dir.path)
            yield
        except OSError as exc:
            log.error("request %s: cannot write to %s: %s", environ["bb_worker.request_id"], self.work_dir.path, exc)
            raise ServiceUnavailable(f"temp dir is not writable: {exc.strerror}") from None

    def new_path(self, name):
        """A path (str) in the work directory for a request's file or directory `name`."""
        return os.path.join(self.work_dir.path, name)


def _vk_ready(circuit):
    try:
        return circuit.vk.cached()
    except ProverError:
        return False
