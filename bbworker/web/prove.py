"""POST /api/prove[/<circuit>]: admit, receive the witness, wait for a proof slot, run bb, reply.

The steps, in order: a Content-Length over the cap and an unready circuit are refused before
any of the body is read; admission.ProofQueue counts the request as uploading; the body
streams into a body.WitnessSink and is checked as a witness of the circuit (acir); the
request queues for a slot of the scheduler shared by the workers; bbrunner proves and
verifies; the reply is JSON, or the raw proof when Accept prefers it. A client that hangs
up after the upload has its bb killed (connection.watch_hangup); the request's files go in
a `finally`.
"""
import base64
import errno
import logging
import time
import uuid
from collections import namedtuple

import gevent

from bbworker import files
from bbworker.bbrunner import acir
from bbworker.errors import ClientGone, ProverError, ServiceUnavailable
from bbworker.server import connection, metrics
from bbworker.web.body import WitnessSink, read_body, refuse_oversized, witness_body_limit
from bbworker.web.service import Reply, accounted, json_reply

log = logging.getLogger("bb_worker")

# X-Public-Inputs is sent only up to this length (45 public inputs): nginx's default buffer for a
# whole upstream reply head is 4 KiB (proxy_buffer_size). Longer: see ProveHandler.reply.
PUBLIC_INPUTS_HEADER_BYTES = 3072

Limits = namedtuple("Limits", "max_body_bytes max_witness_bytes upload_timeout upload_deadline", defaults=(60.0,))
Limits.__doc__ = """Per-request limits: body bytes (compressed), witness bytes (decompressed),
seconds the body may stall (idle), seconds for the whole body."""


class ProveHandler:
    """POST /api/prove[/<circuit>] for `service` (service.ProverService), within `limits` (Limits).

    response_format: "json" or "binary", the proof format when Accept does not choose.
    """

    def __init__(self, service, limits, response_format="json"):
        self.service = service
        self.limits = limits
        self.response_format = response_format

    def __call__(self, environ, name):
        """Prove a witness of circuit `name`; return the Reply (200 with a verified proof)."""
        service = self.service
        with accounted(environ, metrics.PROOFS, name):
            refuse_oversized(environ, self.body_limit(name))
            service.refuse_unless_ready(environ, name)
            stem = uuid.uuid4().hex  # never the request id: clients choose that
            witness = service.new_path(f"{stem}.witness.gz")
            outdir = service.new_path(f"{stem}.out")
            watcher = None
            with service.queue.admit(client=environ.get("bb_worker.client")) as ticket:
                try:
                    self.receive(environ, name, witness, outdir, ticket)
                    ticket.uploaded()
                    greenlet = gevent.getcurrent()
                    watcher = connection.watch_hangup(environ.get("gunicorn.socket"), environ.get("SERVER_PROTOCOL"),
                                                      lambda: greenlet.kill(ClientGone(), block=False))
                    with service.queue.slot(ticket, service.circuits[name].vk.key()) as grant:
                        result = self.run_bb(environ, name, witness, outdir, grant)
                finally:
                    files.remove(witness, outdir)  # first: a ClientGone may still land below
                    if watcher is not None:
                        watcher.kill()  # blocks until it has stopped watching the socket
                        gevent.sleep(0)  # a ClientGone it already sent lands here, not in gunicorn
        return self.reply(environ, result)

    def body_limit(self, name):
        """The most bytes (int) a body for circuit `name` may have (body.witness_body_limit)."""
        return witness_body_limit(self.service.circuits[name].acir, self.limits.max_body_bytes)

    def receive(self, environ, name, witness_path, outdir, ticket=None):
        """Stream the body to `witness_path`, checked as gzip then as a witness of circuit `name`.

        Creates `outdir` for bb; `ticket` (admission.Ticket) learns the bytes received.
        Raises the 400/408/413/422/503 errors; bb is not started.
        """
        program = self.service.circuits[name].acir
        with self.service.writing_work_dir(environ):
            files.private_dir(outdir)
            sink = WitnessSink(witness_path, self.body_limit(name), self.limits.max_witness_bytes, program)
        if ticket is not None:
            ticket.progress = lambda: sink.received
        try:
            read_body(environ, sink, self.limits.upload_timeout, self.limits.upload_deadline)
            sink.finish()
            if program is not None:  # None: the circuit could not be decoded (Circuit.acir_error)
                acir.check_witness(sink.witness, program)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ServiceUnavailable("no space left for the witness") from None
            raise
        finally:
            sink.close()
            environ["bb_worker.bytes_in"] = sink.received
            metrics.RECEIVED.inc(sink.received)

    def run_bb(self, environ, name, witness, outdir, grant=None):
        """Prove `witness` with circuit `name`; a failure is judged (ProverService.failed) and raised.

        The caller holds a proof slot; `grant` (a scheduler.Grant) gives bb its thread
        count and the slot's lock descriptors, which bb inherits.
        """
        started = time.monotonic()
        try:
            with metrics.IN_FLIGHT.track_inprogress():
                result = self.service.circuits[name].prove(witness, outdir, keep_fds=grant.fds if grant else (),
                                                           threads=grant.threads if grant else None)
        except ProverError as exc:
            error = self.service.failed(environ, exc, name, grant)
            level = logging.ERROR if environ["bb_worker.fault"] == "server" else logging.WARNING
            log.log(level, "request %s: %s (fault: %s): %s", environ["bb_worker.request_id"], type(exc).__name__,
                    environ["bb_worker.fault"] or "nobody's", exc.message)
            raise error from None
        self.service.succeeded(name, result.proof, b"".join(bytes.fromhex(x[2:]) for x in result.public_inputs),
                               verified=self.service.circuits[name].verify_proofs)
        environ["bb_worker.outcome"] = "success"
        environ["bb_worker.bb_exit_code"] = 0
        metrics.PROVE_SECONDS.labels(name).observe(time.monotonic() - started)
        return result

    def reply(self, environ, result):
        """The 200 for a bbrunner.Proof: JSON, or the raw proof when Accept prefers it.

        A raw proof carries its public inputs in X-Public-Inputs, comma-separated, up to
        PUBLIC_INPUTS_HEADER_BYTES; past that the reply is the JSON one when Accept
        allows JSON at all, else the raw proof with only X-Public-Inputs-Count.
        """
        accept = environ.get("HTTP_ACCEPT", "")
        if wants_binary(accept, self.response_format):
            header = ",".join(result.public_inputs)
            if len(header) <= PUBLIC_INPUTS_HEADER_BYTES:
                return Reply(200, result.proof, "application/octet-stream", [("X-Public-Inputs", header)])
            if accept_quality(accept, "application/json") == 0:
                return Reply(200, result.proof, "application/octet-stream",
                             [("X-Public-Inputs-Count", str(len(result.public_inputs)))])
        return json_reply(200, {"success": True, "proof": base64.b64encode(result.proof).decode(),
                                "publicInputs": result.public_inputs})


# ---------------------------------------------------------------- content negotiation

def accept_quality(accept, media_type):
    """q-value (float, 0..1) that an Accept header gives `media_type` ("type/subtype").

    RFC 9110 section 12.5.1: the most specific matching range wins (type/subtype over
    type/* over */*); no Accept header means everything is acceptable (1.0).
    """
    if not accept.strip():
        return 1.0
    kind = media_type.split("/")[0]
    best = (-1, 0.0)
    for item in accept.split(","):
        parts = [p.strip() for p in item.split(";")]
        mrange, q = parts[0].lower(), 1.0
        for param in parts[1:]:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    q = 0.0
        specificity = {media_type: 2, f"{kind}/*": 1, "*/*": 0}.get(mrange)
        if specificity is not None and specificity > best[0]:
            best = (specificity, q)
    return best[1]


def wants_binary(accept, default):
    """True when the proof should be sent as raw bytes (application/octet-stream).

    The Accept header decides by q-values; a tie keeps `default` ("json" or "binary").
    """
    binary = accept_quality(accept, "application/octet-stream")
    as_json = accept_quality(accept, "application/json")
    if binary != as_json:
        return binary > as_json
    return default == "binary"
