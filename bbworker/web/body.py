"""Request bodies: read within their limits, checked while they arrive, parsed.

read_body() copies a body from gunicorn's wsgi.input into a sink, bounded in time
(an idle timeout per piece, a deadline for the whole) and framing errors made 400s;
WitnessSink checks a gzipped witness as it streams to disk (gzip members, sizes,
acir.check_size), MemorySink keeps a small body. parse_verify_request() reads a
POST /api/verify body. Every error raised is a bbworker.errors.Error.
"""
import base64
import gzip
import json
import os
import zlib

import gevent
from gunicorn.http.errors import ParseException

from bbworker.bbrunner import acir
from bbworker.bbrunner.formats import FIELD_BYTES, FIELD_MODULUS
from bbworker.errors import BadRequest, PayloadTooLarge, RequestTimeout
from bbworker.server import connection

CHUNK_BYTES = 64 * 1024
MAX_GZIP_MEMBERS = 4  # a witness is one gzip member (nargo, noir_js); a few concatenated ones are fine
GZIP_SLACK_BYTES = 64 * 1024  # gzip's own headers (a file name, a comment) and framing, all members together


# ---------------------------------------------------------------- witness and small bodies

def witness_body_limit(program, max_body):
    """The most bytes (int) a POST /api/prove body may have for a witness of `program` (an
    acir.Program, or None for a circuit that could not be decoded): its largest witness stored
    uncompressed (deflate's stored blocks add 5 bytes per 64 KiB) plus GZIP_SLACK_BYTES, never over
    `max_body` (MAX_BODY_BYTES). Bytes that inflate to nothing (long gzip headers, empty deflate
    blocks) then take no more disk or upload time than a real witness could."""
    if program is None:
        return max_body
    largest = program.max_witness_bytes
    return min(max_body, largest + largest // 1024 + GZIP_SLACK_BYTES)


class WitnessSink:
    """Write a gzip stream to `path` while checking it, in bounded memory.

    Decompresses as it goes, keeping the decompressed witness (`witness`, bytes, at most
    `max_witness` of them) for acir.check_witness: raises PayloadTooLarge past
    `max_body` compressed or `max_witness` decompressed bytes, BadRequest for data that
    is not gzip or is corrupt, or for more than MAX_GZIP_MEMBERS gzip members (a body of
    many empty members costs CPU and inflates to nothing), ProofFailed or PayloadTooLarge
    (acir.check_size) as soon as the witness is larger than any of `circuit`'s (acir.Program) can be. Call finish()
    at the end of the body: it raises BadRequest if the stream is empty or truncated, and
    rewrites a body of several members as one (bb reads the first member only).
    """

    def __init__(self, path, max_body, max_witness, circuit=None):
        self.file = open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), "wb")
        self.path = path
        self.max_body = max_body
        self.max_witness = max_witness
        self.circuit = circuit  # acir.Program: a witness over the limit is first checked for its format
        self.received = 0
        self.inflated = 0
        self.members = 1
        self._witness = bytearray()
        self._head = b""
        self._gzip = zlib.decompressobj(16 + zlib.MAX_WBITS)

    @property
    def witness(self):
        return bytes(self._witness)

    def write(self, chunk):
        self.received += len(chunk)
        if self.received > self.max_body:
            raise PayloadTooLarge(f"request body exceeds {self.max_body} bytes")
        if len(self._head) < 2:
            self._head += chunk[:2 - len(self._head)]
            if self._head != b"\x1f\x8b"[:len(self._head)]:
                raise BadRequest("body is not a gzipped witness (no gzip header)")
        self._inflate(chunk)
        self.file.write(chunk)

    def _inflate(self, data):
        try:
            while data:
                out = self._gzip.decompress(data, CHUNK_BYTES * 4)
                self.inflated += len(out)
                if self.inflated > self.max_witness:
                    raise PayloadTooLarge(f"witness exceeds {self.max_witness} bytes decompressed")
                if self.circuit is not None and self.inflated > self.circuit.max_witness_bytes:
                    acir.check_size((self._witness + out)[:9], self.inflated, self.circuit)
                self._witness += out
                if self._gzip.eof:  # end of a gzip member: whatever follows starts another
                    data = self._gzip.unused_data
                    if data:
                        self.members += 1
                        if self.members > MAX_GZIP_MEMBERS:
                            raise BadRequest(f"body has more than {MAX_GZIP_MEMBERS} gzip members")
                        self._gzip = zlib.decompressobj(16 + zlib.MAX_WBITS)
                else:
                    data = self._gzip.unconsumed_tail
                gevent.sleep(0)  # per output and per member: a gzip bomb must not starve other requests
        except zlib.error as exc:
            raise BadRequest(f"body is not valid gzip: {exc}") from None

    def finish(self):
        self.file.close()
        if self.received == 0:
            raise BadRequest("empty body: send the gzipped witness")
        if not self._gzip.eof:
            raise BadRequest("gzip stream is truncated")
        if self.members > 1:  # bb would read the first member only: give it the witness that was checked
            with open(self.path, "wb") as f:
                f.write(gzip.compress(self.witness, compresslevel=1, mtime=0))

    def close(self):
        self.file.close()


class MemorySink:
    """Collect a small request body in memory; PayloadTooLarge past `max_body` bytes."""

    def __init__(self, max_body):
        self.max_body = max_body
        self.received = 0
        self.parts = []

    def write(self, chunk):
        self.received += len(chunk)
        if self.received > self.max_body:
            raise PayloadTooLarge(f"request body exceeds {self.max_body} bytes")
        self.parts.append(chunk)

    def data(self):
        return b"".join(self.parts)


# ---------------------------------------------------------------- proofs to verify

MAX_VERIFY_BODY_BYTES = 1024 * 1024  # an UltraHonk proof is 14,656 bytes (bb 5.0.0), ~20 KB as base64 JSON
UNPINNED_PROOF_BYTES = 256 * 1024  # the most a proof whose length its verifier target does not pin may be


def verify_body_limit(shape):
    """The most bytes (int) a POST /api/verify body can need for proofs of `shape` (a bbrunner
    ProofShape): the JSON form, its proof in base64 and each public input as a quoted "0x" + 64 hex
    digits, twice over for whitespace, and never over MAX_VERIFY_BODY_BYTES. A larger body is
    refused before it is read or parsed, so parsing costs no more than a real proof's."""
    proof = shape.proof_bytes or UNPINNED_PROOF_BYTES
    inputs = shape.public_inputs if shape.public_inputs is not None else shape.max_public_inputs
    need = 4 * -(-proof // 3) + (2 * FIELD_BYTES + 6) * inputs + 256
    return min(MAX_VERIFY_BODY_BYTES, 2 * need)


def field_bytes(text):
    """One public input ("0x" + up to 64 hex digits, a BN254 scalar) -> 32 bytes big-endian; BadRequest otherwise."""
    if not isinstance(text, str):
        raise BadRequest("publicInputs must be strings like \"0x0a13...\"")
    digits = text.strip()
    if not digits.lower().startswith("0x") or not digits[2:] or any(c not in "0123456789abcdefABCDEF" for c in digits[2:]):
        raise BadRequest(f"public input {text[:80]!r} is not 0x-hex")
    if len(digits) > 2 + 2 * FIELD_BYTES:
        raise BadRequest(f"public input {text[:80]!r} is longer than 32 bytes")
    value = int(digits[2:], 16)
    if value >= FIELD_MODULUS:
        raise BadRequest(f"public input {text[:80]!r} is not a BN254 field element (>= the modulus)")
    return value.to_bytes(FIELD_BYTES, "big")


def parse_verify_request(body, content_type, public_inputs_header, shape=None):
    """A POST /api/verify body -> (proof bytes, public inputs bytes in bb's public_inputs format).

    JSON ({"proof": <base64>, "publicInputs": ["0x..", ...]}, when Content-Type is
    application/json; /api/prove's "success" may come along) or the raw proof with X-Public-Inputs
    (comma-separated 0x-hex, empty for none). shape: the circuit's bbrunner ProofShape, whose proof
    length and public input count the proof must have. Raises BadRequest for anything else.
    """
    if content_type.split(";")[0].strip().lower() == "application/json":
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("body is not JSON") from None
        except RecursionError:  # arrays or objects nested thousands deep
            raise BadRequest("body is JSON nested too deep") from None
        if not isinstance(request, dict):
            raise BadRequest('body must be a JSON object {"proof": <base64>, "publicInputs": [...]}')
        unknown = sorted(set(request) - {"proof", "publicInputs", "success"})  # /api/prove's reply as it is
        if unknown:
            raise BadRequest(f"unknown fields: {', '.join(unknown)}")
        for name in ("proof", "publicInputs"):
            if name not in request:
                raise BadRequest(f"{name} is missing")
        if not isinstance(request["proof"], str):
            raise BadRequest("proof must be a base64 string")
        try:
            proof = base64.b64decode(request["proof"], validate=True)
        except ValueError:
            raise BadRequest("proof is not valid base64") from None
        if not isinstance(request["publicInputs"], list):
            raise BadRequest("publicInputs must be a list of 0x-hex strings")
        inputs = request["publicInputs"]
    else:
        if public_inputs_header is None:
            raise BadRequest("a raw proof needs its public inputs in X-Public-Inputs (comma-separated 0x-hex)")
        proof = body
        inputs = [item for item in public_inputs_header.split(",") if item.strip()]
    if not proof:
        raise BadRequest("proof is empty")
    if len(proof) % FIELD_BYTES:
        raise BadRequest(f"proof is {len(proof)} bytes, not a multiple of 32 (whole field elements)")
    expected = None if shape is None else shape.public_inputs
    if shape is not None and len(inputs) > shape.max_public_inputs:  # before any is parsed
        raise BadRequest(f"publicInputs has {len(inputs)} values; this circuit's proofs have at most "
                         f"{shape.max_public_inputs}")
    public_inputs = b"".join(field_bytes(item) for item in inputs)
    if shape is not None and shape.proof_bytes and len(proof) != shape.proof_bytes:
        raise BadRequest(f"proof is {len(proof)} bytes; this circuit's proofs are {shape.proof_bytes}")
    if expected is not None and len(inputs) != expected:
        raise BadRequest(f"publicInputs has {len(inputs)} values; this circuit's proofs have {expected}")
    return proof, public_inputs


def read_body(environ, sink, idle_timeout, deadline):
    """Copy the request body into `sink` in chunks.

    idle_timeout: seconds the client may send nothing (every piece received starts
    it again); deadline: seconds for the whole body. Either raises RequestTimeout.
    Broken chunked framing (gunicorn's parse errors) and a body cut short raise
    BadRequest. Sends the "100 Continue" that connection.py held back first, and
    sets environ["bb_worker.body_read"] once the body has been read to its end.
    """
    length = environ.get("CONTENT_LENGTH") or ""
    if length and not (length.isascii() and length.isdigit()):
        raise BadRequest("Content-Length is not a number")
    stream = environ["wsgi.input"]
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    remaining = int(length) if length else (None if chunked or environ.get("wsgi.input_terminated") else 0)
    sock = environ.get("gunicorn.socket")
    connection.send_continue(environ)
    prior = sock.gettimeout() if sock is not None else None
    if sock is not None:
        sock.settimeout(idle_timeout)  # per recv(): one read below may wait for many pieces
    try:
        with gevent.Timeout(deadline, RequestTimeout(f"the body did not arrive within {deadline:g} s")):
            while remaining is None or remaining > 0:
                size = CHUNK_BYTES if remaining is None else min(CHUNK_BYTES, remaining)
                try:
                    with gevent.Timeout(None if sock is not None else idle_timeout, TimeoutError):
                        chunk = stream.read(size)
                except TimeoutError:
                    raise RequestTimeout(f"no body data for {idle_timeout:g} s") from None
                except ParseException as exc:  # gunicorn: bad chunk size, missing CRLF, bad trailer
                    raise BadRequest(f"bad chunked framing: {exc}") from None
                except OSError as exc:  # gunicorn's NoMoreData (body cut short), reset connection
                    raise BadRequest(f"request body could not be read: {exc or type(exc).__name__}") from None
                if not chunk:
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                sink.write(chunk)
            if remaining:
                raise BadRequest(f"request body ended {remaining} bytes short of its Content-Length")
    finally:
        if sock is not None:
            sock.settimeout(prior)
    environ["bb_worker.body_read"] = True


def refuse_oversized(environ, max_body):
    """Raise PayloadTooLarge (413) when the request's Content-Length announces more than
    `max_body` bytes: answered before any of the body is read (or a 100 Continue sent)."""
    length = environ.get("CONTENT_LENGTH") or ""
    if length.isascii() and length.isdigit() and int(length) > max_body:
        raise PayloadTooLarge(f"request body is {length} bytes; the limit is {max_body}")


def has_body(environ):
    """True when the request announced a body (a Content-Length above 0, or chunked)."""
    return environ.get("CONTENT_LENGTH", "") not in ("", "0") or "HTTP_TRANSFER_ENCODING" in environ
