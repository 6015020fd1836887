"""The self-check: telling a fault of ours from a client's bad input, with runs no client controls.

bb does not say in its exit status whose fault a failure is. A bb run on a client's bytes (a
witness, a proof) that fails for a reason that could be ours (an error whose class says
`fault = "server"`) is confirmed before anything else believes it: the server repeats the run on
inputs it controls, after the failure.

- For a proof: Circuit.self_check computes the VK again (it must be the cached one: the CRS and bb
  are what every proof needs) and proves the server's own witness of the circuit (every value 0).
  For a proof bb verify rejected, bb verify must also still accept a proof it accepted before.
- For a verification: bb verify of a reference proof must give the verdict it gave before: the
  last proof this worker saw verify, else proof-shaped bytes of the server's making, which bb
  verify rejects (made_up_proof). bb verify running and judging is what a verification needs;
  a check of this kind never proves, so it needs no proof slot.

The check passes: the server works, so the request's input was at fault when bb judged it
(`may_be_input`): the client gets the client's answer (422, or `{"valid": false}`), and readiness
does not move, whatever the client sent. The check fails: the fault is ours. Readiness answers 503
with the check's reason, and the check runs again in the background (after 5 s, doubling up to
60 s) until it passes. A proof bb verify rejected, on a worker that has seen no proof verify yet,
cannot be judged either way (the own witness rarely satisfies the circuit): it stays ours, and
readiness does not move. Requests that fail while a check runs share its verdict when it started
after their failure, so a crowd of bad requests costs each at most one run of its own kind.
"""
import hashlib
import logging
import os
import time
import uuid

import gevent
from gevent.lock import Semaphore

from bbworker import files
from bbworker.bbrunner import formats
from bbworker.errors import Busy, Error

log = logging.getLogger("bb_worker")
# The kinds of check, by what failed: a bb prove; a proof bb verify rejected; a bb verify.
PROVE, ACCEPT, VERIFY = "prove", "accept", "verify"
UNKNOWN = "a check no run could decide"  # _run's answer when nothing the server knows can tell


class SelfCheck:
    """The self-check of a worker's `circuits` (dict name -> bbrunner.Circuit).

    queue: admission.ProofQueue (a proof's check holding no slot takes one). work_dir:
    rundir.WorkerDir (the check's files). cooldown, max_cooldown: seconds before the first and
    the longest wait between background checks while one fails. clock: monotonic seconds.
    """

    def __init__(self, circuits, queue, work_dir, cooldown=5.0, max_cooldown=60.0, clock=time.monotonic):
        self.circuits = circuits
        self.queue = queue
        self.work_dir = work_dir
        self.cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.clock = clock
        self._passed = {}  # (name, kind) -> clock() when the last passing check started
        self._reference = {}  # name -> (proof bytes, public inputs bytes, bb verify's verdict on them)
        self._failed = {}  # name -> (reason, kind, clock() of the next background check)
        self._locks = {name: Semaphore() for name in circuits}

    def verified(self, name, proof, public_inputs):
        """bb verify accepted `proof` with `public_inputs` (bytes, bb's formats) for circuit `name`:
        the reference of later verification checks."""
        self._reference[name] = (proof, public_inputs, True)

    def confirm(self, name, verifying=False, grant=None, rejected=False):
        """True when the server works for circuit `name`, by a check started after this call: a
        request's failure was its input's. False when the check fails: readiness reports it from
        now on. None when nothing the server knows can decide (see the module). verifying: the
        failure was a `bb verify`'s; rejected: bb verify rejected the proof bb prove wrote. grant:
        the request's proof slot (a scheduler.Grant) for a check that proves, else one is taken.
        Raises Busy when no slot frees up for the check.
        """
        kind = VERIFY if verifying else ACCEPT if rejected else PROVE
        failed_at = self.clock()
        with self._locks[name]:  # one check at a time: the others share its verdict
            if name not in self._failed and self._passed.get((name, kind), -1e18) >= failed_at:
                return True
            started = self.clock()
            reason = self._run(name, kind, grant)
            if reason is UNKNOWN:
                return None
            if reason is None:
                self._failed.pop(name, None)
                self._passed[(name, kind)] = started
                return True
        if name not in self._failed:
            log.error("circuit %s: the self-check failed (%s): /api/health answers 503 until it passes", name, reason)
            gevent.spawn(self._recheck, name)
        self._failed[name] = (reason, kind, self.clock() + self.cooldown)
        return False

    def problems(self, name):
        """Why circuit `name` cannot be proved (list of str): the failing self-check's reason, or []."""
        if name not in self._failed:
            return []
        return [f"self-check failed: {self._failed[name][0]}"]

    def retry_after(self, name):
        """Seconds (int, at least 1) until the next background check of circuit `name`."""
        return max(1, round(self._failed.get(name, (None, None, 0))[2] - self.clock()))

    def _recheck(self, name):
        wait = self.cooldown
        while name in self._failed:
            gevent.sleep(wait)
            reason, kind, _ = self._failed[name]
            try:
                with self._locks[name]:
                    started = self.clock()
                    reason = self._run(name, kind, None)
            except Busy:  # every slot stayed busy: try again later
                pass
            if reason is None or reason is UNKNOWN:
                log.info("circuit %s: the self-check passes again", name)
                self._failed.pop(name, None)
                self._passed[(name, kind)] = started
                return
            wait = min(wait * 2, self.max_cooldown)
            self._failed[name] = (reason, kind, self.clock() + wait)

    def _run(self, name, kind, grant):
        """Run a check of `kind`; return None when it passes, else why not (str). Raises Busy."""
        circuit = self.circuits[name]
        scratch = os.path.join(self.work_dir.path, f"check-{uuid.uuid4().hex}")
        try:
            files.private_dir(self.work_dir.path)
            os.mkdir(scratch, 0o700)
            if kind == VERIFY:  # bb verify must judge a proof it judged before as it did then
                if name not in self._reference:
                    proof, public_inputs = made_up_proof(circuit.proof_shape())
                    self._reference[name] = (proof, public_inputs, _verify(circuit, scratch, proof, public_inputs))
                proof, public_inputs, verdict = self._reference[name]
                if _verify(circuit, scratch, proof, public_inputs) != verdict:
                    return f"bb verify now says {'no' if verdict else 'yes'} to a proof it said {verdict} to before"
                return None
            if grant is not None:
                circuit.self_check(scratch, keep_fds=grant.fds, threads=grant.threads)
            else:
                with self.queue.slot() as held:
                    circuit.self_check(scratch, keep_fds=held.fds, threads=held.threads)
            if kind == ACCEPT:  # bb verify must still accept what it accepted
                proof, public_inputs, verdict = self._reference.get(name, (None, None, False))
                if not verdict:
                    return UNKNOWN
                if not _verify(circuit, scratch, proof, public_inputs):
                    return "bb verify now rejects a proof it accepted before"
            return None
        except Busy:
            raise
        except Error as exc:
            return exc.detail
        except OSError as exc:
            return f"cannot write the self-check's files in {self.work_dir.path}: {exc.strerror}"
        finally:
            files.remove(scratch)


def _verify(circuit, scratch, proof, public_inputs):
    """circuit.verify() of `proof` and `public_inputs` (bytes) written into `scratch`: True or False."""
    paths = []
    for file_name, data in (("reference.proof", proof), ("reference.public_inputs", public_inputs)):
        paths.append(os.path.join(scratch, file_name))
        with open(paths[-1], "wb") as f:
            f.write(data)
    return circuit.verify(*paths)


def made_up_proof(shape):
    """(proof, public inputs) bytes of the length `shape` (a bbrunner ProofShape) says, filled with
    field elements derived from a counter (the same every time): something bb verify reads and rejects."""
    fields = (shape.proof_bytes or formats.PROOF_FIELDS[None][0] * formats.FIELD_BYTES) // formats.FIELD_BYTES
    count = shape.public_inputs if shape.public_inputs is not None else 0
    made = [int.from_bytes(hashlib.sha256(i.to_bytes(4, "big")).digest(), "big") % formats.FIELD_MODULUS
            for i in range(fields + count)]
    data = b"".join(value.to_bytes(formats.FIELD_BYTES, "big") for value in made)
    return data[:fields * formats.FIELD_BYTES], data[fields * formats.FIELD_BYTES:]
