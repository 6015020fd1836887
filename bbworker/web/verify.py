"""POST /api/verify[/<circuit>]: `bb verify` a proof with the served VK -> {"valid": bool}.

The body (a JSON {"proof", "publicInputs"} or the raw proof with X-Public-Inputs) is bounded by
what the circuit's proofs can need (body.verify_body_limit) before any of it is read, read into
memory, and parsed against the circuit's proof shape (body.parse_verify_request); bb verify runs
in one of VERIFY_CONCURRENCY places (admission.VerifyLimit), never a proof slot. Whatever bb says
of a well-formed proof is a verdict unless the self-check shows bb itself cannot run.
"""
import logging
import os
import uuid

from bbworker import files
from bbworker.errors import ProverError, ProverTimeout, VerifyTimeout
from bbworker.server import metrics
from bbworker.web.body import (MAX_VERIFY_BODY_BYTES, MemorySink, parse_verify_request, read_body, refuse_oversized,
                               verify_body_limit)
from bbworker.web.service import accounted, json_reply

log = logging.getLogger("bb_worker")


class VerifyHandler:
    """POST /api/verify[/<circuit>] for `service` (service.ProverService); `limits`: prove.Limits
    (the upload timeouts apply)."""

    def __init__(self, service, limits):
        self.service = service
        self.limits = limits

    def __call__(self, environ, name):
        """Verify a proof with circuit `name`'s VK: 200 {"valid": bool}."""
        with accounted(environ, metrics.VERIFICATIONS, name):
            valid = self.run(environ, name)
        return json_reply(200, {"valid": valid})

    def run(self, environ, name):
        """Receive the body and run bb verify on it: True or False (outcome "valid" or "invalid").
        bb's failures are judged as a proof's (ProverService.failed), a timeout is VerifyTimeout (504)."""
        service = self.service
        circuit = service.circuits[name]
        refuse_oversized(environ, MAX_VERIFY_BODY_BYTES)
        service.refuse_unless_ready(environ, name)
        try:
            shape = circuit.proof_shape()  # the VK is there: readiness said so
        except ProverError as exc:
            raise service.failed(environ, exc) from None
        limit = verify_body_limit(shape)
        refuse_oversized(environ, limit)
        sink = MemorySink(limit)
        client = environ.get("bb_worker.client")
        with service.queue.admit(proof=False, client=client) as ticket:  # an uploading place, as a proof's body takes
            ticket.progress = lambda: sink.received
            try:
                read_body(environ, sink, self.limits.upload_timeout, self.limits.upload_deadline)
            finally:
                environ["bb_worker.bytes_in"] = sink.received
        proof, public_inputs = parse_verify_request(sink.data(), environ.get("CONTENT_TYPE", ""),
                                                    environ.get("HTTP_X_PUBLIC_INPUTS"), shape)
        workdir = service.new_path(f"verify-{uuid.uuid4().hex}")
        try:
            with service.verify_limit.slot(client):  # the self-check's own bb verify, if any, runs in this place too
                valid = self.judge(environ, name, proof, public_inputs, workdir)
        finally:
            files.remove(workdir)
        if valid:
            service.succeeded(name, proof, public_inputs)
        environ["bb_worker.bb_exit_code"] = 0 if valid else environ.get("bb_worker.bb_exit_code") or 1
        environ["bb_worker.outcome"], environ["bb_worker.fault"] = "valid" if valid else "invalid", None
        return valid

    def judge(self, environ, name, proof, public_inputs, workdir):
        """bb verify `proof` and `public_inputs` (bytes, bb's formats), written into `workdir`, with circuit
        `name`'s VK: True or False. A failure of bb is judged (ProverService.failed): False when it was
        the proof's, else the error to answer is raised (a timeout as VerifyTimeout, 504)."""
        service, circuit = self.service, self.service.circuits[name]
        try:
            if not circuit.vk.cached():  # only after the cache was cleaned: computed at start
                service.compute_vk(circuit)
            with service.writing_work_dir(environ):
                os.mkdir(workdir, 0o700)
                for file_name, data in (("proof", proof), ("public_inputs", public_inputs)):
                    with open(os.open(os.path.join(workdir, file_name),
                                      os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), "wb") as f:
                        f.write(data)
            return circuit.verify(os.path.join(workdir, "proof"), os.path.join(workdir, "public_inputs"))
        except ProverError as exc:
            error = service.failed(environ, exc, name, verifying=True)
            log.warning("request %s: verify: %s: %s", environ["bb_worker.request_id"], type(exc).__name__, exc.message)
            if error is None:
                return False  # bb failed on this proof while it verifies the server's reference: it rejects it
            raise (VerifyTimeout(error.message) if isinstance(error, ProverTimeout) else error) from None
