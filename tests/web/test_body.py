"""bbworker.web.body alone: WitnessSink (gzip checked as it streams), MemorySink, read_body (framing,
lengths, timeouts), parse_verify_request, refuse_oversized, has_body. Through the app: test_prove.py."""
import base64
import gzip
import json
import os
import stat
import zlib

import pytest
from gunicorn.http.errors import InvalidChunkSize, NoMoreData

from bbworker.bbrunner import acir
from bbworker.bbrunner.acir import STACK_HEAD
from bbworker.bbrunner.formats import FIELD_MODULUS
from bbworker.errors import BadRequest, PayloadTooLarge, ProofFailed, RequestTimeout
from bbworker.web import body
from support import CIRCUIT, fixture_bytes

MiB = 1024 * 1024
CHUNK = 64 * 1024  # what read_body hands a sink at a time


# ---------------------------------------------------------------- WitnessSink

def sink_of(path, data, max_body=10_000, max_witness=10_000, circuit=None, split=None):
    """A WitnessSink at `path` fed `data` in writes of `split` bytes (None: one write), then finished."""
    sink = body.WitnessSink(str(path), max_body, max_witness, circuit)
    try:
        step = split or max(len(data), 1)
        for i in range(0, len(data), step):
            sink.write(data[i:i + step])
        sink.finish()
    finally:
        sink.close()
    return sink


@pytest.mark.parametrize("split", [1, 10, None])
def test_multi_member_gzip_is_rewritten_as_one_for_bb(tmp_path, split):
    """bb reads only the first gzip member (checked with bb 5): it gets the whole checked witness as one."""
    a, b = gzip.compress(b"first" * 100), gzip.compress(b"second" * 100)
    data = a + b
    sink = body.WitnessSink(str(tmp_path / "w.gz"), 10_000, 10_000)
    cut = len(a) if split is None else split  # None: the chunk ends exactly at the member boundary
    sink.write(data[:cut])
    sink.write(data[cut:])
    sink.finish()
    assert sink.inflated == 1100 and sink.witness == b"first" * 100 + b"second" * 100
    written = (tmp_path / "w.gz").read_bytes()
    assert zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(written) == sink.witness  # in its first member


@pytest.mark.parametrize("split", [1, 10, 100])
def test_one_member_in_any_chunks_is_kept_whole(tmp_path, split):
    data = fixture_bytes("valid_1.gz")
    sink = body.WitnessSink(str(tmp_path / "w.gz"), 100_000, 100_000)
    for i in range(0, len(data), split):
        sink.write(data[i:i + split])
    sink.finish()
    assert sink.witness == gzip.decompress(data)
    assert (tmp_path / "w.gz").read_bytes() == data


def test_garbage_after_a_gzip_member_is_400(tmp_path):
    sink = body.WitnessSink(str(tmp_path / "w.gz"), 10_000, 10_000)
    with pytest.raises(BadRequest, match="not valid gzip"):
        sink.write(gzip.compress(b"x" * 100) + b"garbage!")
    sink.close()


def test_up_to_four_members_are_accepted_and_more_are_400(tmp_path):
    parts = [gzip.compress(bytes([65 + i]) * 10) for i in range(body.MAX_GZIP_MEMBERS + 1)]
    sink = sink_of(tmp_path / "four.gz", b"".join(parts[:body.MAX_GZIP_MEMBERS]))
    assert sink.members == 4 and sink.witness == b"A" * 10 + b"B" * 10 + b"C" * 10 + b"D" * 10
    assert gzip.decompress((tmp_path / "four.gz").read_bytes()) == sink.witness
    with pytest.raises(BadRequest, match="more than 4 gzip members") as raised:
        sink_of(tmp_path / "five.gz", b"".join(parts))
    assert raised.value.status == 400


def test_many_empty_members_are_400(tmp_path):
    with pytest.raises(BadRequest, match="gzip members"):
        sink_of(tmp_path / "w.gz", gzip.compress(b"") * 1000, max_body=1 * MiB)


@pytest.mark.parametrize("data", [
    b"\x1f", b"\x1f\x8b", gzip.compress(b"x" * 1000)[:-1], gzip.compress(b"x" * 1000)[:12],
    gzip.compress(b"a") + gzip.compress(b"b")[:10],  # a whole member, then half of one
], ids=["one-byte", "header-only", "no-last-byte", "cut-in-deflate", "second-member-cut"])
def test_a_truncated_stream_is_400_at_finish(tmp_path, data):
    sink = body.WitnessSink(str(tmp_path / "w.gz"), 10_000, 10_000)
    sink.write(data)  # nothing wrong so far
    with pytest.raises(BadRequest, match="gzip stream is truncated"):
        sink.finish()


def test_an_empty_body_is_400(tmp_path):
    with pytest.raises(BadRequest, match="empty body"):
        sink_of(tmp_path / "w.gz", b"")


@pytest.mark.parametrize("pieces", [[b"PK\x03\x04"], [b"\x1f", b"\x8c"], [b"\x8b\x1f"]],
                         ids=["zip", "second-byte-in-its-own-write", "swapped"])
def test_no_gzip_magic_is_400_at_once(tmp_path, pieces):
    sink = body.WitnessSink(str(tmp_path / "w.gz"), 10_000, 10_000)
    with pytest.raises(BadRequest, match="no gzip header"):
        for piece in pieces:
            sink.write(piece)
    sink.close()


def test_body_and_witness_limits_are_exact(tmp_path):
    data = gzip.compress(b"w" * 1000)
    assert sink_of(tmp_path / "a", data, max_body=len(data), max_witness=1000).inflated == 1000
    with pytest.raises(PayloadTooLarge, match=f"request body exceeds {len(data) - 1} bytes"):
        sink_of(tmp_path / "b", data, max_body=len(data) - 1)
    with pytest.raises(PayloadTooLarge, match="witness exceeds 999 bytes decompressed"):
        sink_of(tmp_path / "c", data, max_witness=999)


def test_a_witness_larger_than_the_circuits_is_refused_while_it_streams(tmp_path):
    with open(CIRCUIT, "rb") as f:
        program = acir.Program.from_json(f.read())
    over = program.max_witness_bytes + 1
    with pytest.raises(ProofFailed, match="another circuit"):  # a witness stack: another circuit's
        sink_of(tmp_path / "a", gzip.compress(STACK_HEAD + bytes(over)), max_body=MiB, max_witness=MiB,
                circuit=program)
    with pytest.raises(PayloadTooLarge, match="decompressed"):  # anything else is just too large
        sink_of(tmp_path / "b", gzip.compress(bytes(over)), max_body=MiB, max_witness=MiB, circuit=program)
    assert sink_of(tmp_path / "c", fixture_bytes("valid_1.gz"), max_body=MiB, max_witness=MiB,
                   circuit=program).inflated == len(gzip.decompress(fixture_bytes("valid_1.gz")))


def with_file_name(witness_gz, name):
    """`witness_gz` (one gzip member) with gzip's FNAME field set to `name` (bytes, no NUL)."""
    head = bytearray(witness_gz[:10])
    head[3] |= 0x08  # FNAME
    return bytes(head) + name + b"\0" + witness_gz[10:]


def test_a_body_is_bounded_by_what_the_circuit_s_largest_witness_needs_gzipped(tmp_path):
    """Bytes that inflate to nothing (a gzip header's file name here) took up to MAX_BODY_BYTES
    of disk per upload: ten stalled uploads filled a 200 MiB TMPDIR and health went 503 (QA round 3)."""
    with open(CIRCUIT, "rb") as f:
        program = acir.Program.from_json(f.read())
    limit = body.witness_body_limit(program, 50 * MiB)
    largest = program.max_witness_bytes
    assert limit == largest + largest // 1024 + body.GZIP_SLACK_BYTES
    assert body.witness_body_limit(program, 1000) == 1000 and body.witness_body_limit(None, 50 * MiB) == 50 * MiB
    # the largest witness the circuit can have, stored uncompressed, fits; so does a real one with a long file name
    stored = gzip.compress(STACK_HEAD + bytes(largest - len(STACK_HEAD)), compresslevel=0)
    assert len(stored) <= limit
    named = with_file_name(fixture_bytes("valid_1.gz"), b"w" * 5000)
    assert sink_of(tmp_path / "a", named, max_body=limit, max_witness=MiB, circuit=program).inflated > 0
    # a file name that never ends is refused once the body passes the limit, with no more than that on disk
    endless = with_file_name(fixture_bytes("valid_1.gz"), b"w" * (2 * limit))[:2 * limit]
    with pytest.raises(PayloadTooLarge, match=f"request body exceeds {limit} bytes"):
        sink_of(tmp_path / "b", endless, max_body=limit, max_witness=MiB, circuit=program, split=CHUNK)
    assert os.path.getsize(tmp_path / "b") <= limit


def test_the_witness_file_is_private_and_new(tmp_path):
    sink_of(tmp_path / "w.gz", gzip.compress(b"x"))
    assert stat.S_IMODE(os.stat(tmp_path / "w.gz").st_mode) == 0o600
    with pytest.raises(FileExistsError):
        body.WitnessSink(str(tmp_path / "w.gz"), 10, 10)


# ---------------------------------------------------------------- MemorySink

def test_memory_sink_keeps_up_to_its_limit():
    sink = body.MemorySink(10)
    sink.write(b"12345")
    sink.write(b"67890")
    assert sink.data() == b"1234567890" and sink.received == 10
    with pytest.raises(PayloadTooLarge, match="exceeds 10 bytes"):
        sink.write(b"!")


# ---------------------------------------------------------------- read_body

def environ_for(data_stream, **extra):
    return {"wsgi.input": data_stream, **extra}


def test_read_body_reads_exactly_the_content_length(stream):
    data = stream(b"x" * 200_000 + b"never read")
    sink = body.MemorySink(MiB)
    environ = environ_for(data, CONTENT_LENGTH="200000")
    body.read_body(environ, sink, 5, 60)
    assert sink.data() == b"x" * 200_000 and data.position == 200_000
    assert environ["bb_worker.body_read"] is True


def test_a_body_short_of_its_content_length_is_400(stream):
    environ = environ_for(stream(b"x" * 50), CONTENT_LENGTH="100")
    with pytest.raises(BadRequest, match="ended 50 bytes short of its Content-Length"):
        body.read_body(environ, body.MemorySink(MiB), 5, 60)
    assert "bb_worker.body_read" not in environ


@pytest.mark.parametrize("length", ["-1", "1e3", "0x10", "ten"])
def test_a_content_length_that_is_not_a_number_is_400(stream, length):
    with pytest.raises(BadRequest, match="Content-Length is not a number"):
        body.read_body(environ_for(stream(fail=True), CONTENT_LENGTH=length), body.MemorySink(MiB), 5, 60)


@pytest.mark.parametrize("extra", [{"HTTP_TRANSFER_ENCODING": "chunked"}, {"HTTP_TRANSFER_ENCODING": "gzip, Chunked"},
                                   {"wsgi.input_terminated": True}], ids=["chunked", "chunked-last", "terminated"])
def test_without_content_length_a_framed_body_is_read_to_its_end(stream, extra):
    data = os.urandom(3 * body.CHUNK_BYTES + 5)
    sink = body.MemorySink(MiB)
    environ = environ_for(stream(data), **extra)
    body.read_body(environ, sink, 5, 60)
    assert sink.data() == data and environ["bb_worker.body_read"] is True


def test_without_length_or_framing_there_is_no_body(stream):
    sink = body.MemorySink(MiB)
    environ = environ_for(stream(fail=True))
    body.read_body(environ, sink, 5, 60)
    assert sink.data() == b"" and environ["bb_worker.body_read"] is True


@pytest.mark.parametrize("error, words", [
    (InvalidChunkSize(b"zz"), "bad chunked framing"),
    (NoMoreData(b""), "request body could not be read"),
    (ConnectionResetError(104, "Connection reset by peer"), "request body could not be read"),
])
def test_broken_framing_and_cut_bodies_are_400(stream, error, words):
    environ = environ_for(stream(error=error), HTTP_TRANSFER_ENCODING="chunked")
    with pytest.raises(BadRequest, match=words):
        body.read_body(environ, body.MemorySink(MiB), 5, 60)


def test_a_body_that_stops_arriving_is_408(stream):
    environ = environ_for(stream(b"\x1f\x8b", stall=10), CONTENT_LENGTH="100")
    with pytest.raises(RequestTimeout, match="no body data for 0.05 s") as raised:
        body.read_body(environ, body.MemorySink(MiB), 0.05, 60)
    assert raised.value.status == 408


def test_a_body_that_trickles_past_the_deadline_is_408(stream):
    environ = environ_for(stream(bytes(16 * MiB), stall=0.02), HTTP_TRANSFER_ENCODING="chunked")
    with pytest.raises(RequestTimeout, match="did not arrive within 0.1 s"):
        body.read_body(environ, body.MemorySink(32 * MiB), 5, 0.1)  # every read is in time, not the whole


def test_the_sinks_refusal_stops_reading(stream):
    data = stream(bytes(MiB))
    with pytest.raises(PayloadTooLarge):
        body.read_body(environ_for(data, HTTP_TRANSFER_ENCODING="chunked"), body.MemorySink(100_000), 5, 60)
    assert data.position <= 100_000 + body.CHUNK_BYTES


# ---------------------------------------------------------------- refuse_oversized, has_body

def test_refuse_oversized_reads_only_the_announced_length():
    with pytest.raises(PayloadTooLarge, match="request body is 101 bytes; the limit is 100"):
        body.refuse_oversized({"CONTENT_LENGTH": "101"}, 100)
    for environ in ({"CONTENT_LENGTH": "100"}, {"CONTENT_LENGTH": ""}, {"CONTENT_LENGTH": "x"}, {}):
        assert body.refuse_oversized(environ, 100) is None  # read_body judges a bad length


@pytest.mark.parametrize("environ, announced", [
    ({}, False), ({"CONTENT_LENGTH": ""}, False), ({"CONTENT_LENGTH": "0"}, False),
    ({"CONTENT_LENGTH": "1"}, True), ({"HTTP_TRANSFER_ENCODING": "chunked"}, True)])
def test_has_body(environ, announced):
    assert body.has_body(environ) is announced


# ---------------------------------------------------------------- parse_verify_request

PROOF = bytes(range(64))
B64 = base64.b64encode(PROOF).decode()


def as_json(**fields):
    return json.dumps(fields).encode()


@pytest.mark.parametrize("content_type", ["application/json", "Application/JSON; charset=utf-8"])
def test_a_json_request_gives_the_proof_and_its_inputs_as_field_bytes(content_type):
    proof, inputs = body.parse_verify_request(
        as_json(proof=B64, publicInputs=["0x07", " 0x" + "1b" * 32, "0X0"], success=True), content_type, None)
    assert proof == PROOF
    assert inputs == bytes(31) + b"\x07" + b"\x1b" * 32 + bytes(32)


def test_a_raw_proof_takes_its_inputs_from_the_header():
    assert body.parse_verify_request(PROOF, "application/octet-stream", "0x01,0x02") == (
        PROOF, bytes(31) + b"\x01" + bytes(31) + b"\x02")
    assert body.parse_verify_request(PROOF, "", "") == (PROOF, b"")  # no public inputs


@pytest.mark.parametrize("data, content_type, header, words", [
    (b"{", "application/json", None, "body is not JSON"),
    (b"\xff\xfe", "application/json", None, "body is not JSON"),
    (b"[]", "application/json", None, "must be a JSON object"),
    (as_json(proof=B64, publicInputs=[], extra=1), "application/json", None, "unknown fields: extra"),
    (as_json(publicInputs=[]), "application/json", None, "proof is missing"),
    (as_json(proof=B64), "application/json", None, "publicInputs is missing"),
    (as_json(proof=5, publicInputs=[]), "application/json", None, "proof must be a base64 string"),
    (as_json(proof="!!", publicInputs=[]), "application/json", None, "proof is not valid base64"),
    (as_json(proof=B64, publicInputs="0x01"), "application/json", None, "publicInputs must be a list"),
    (as_json(proof=B64, publicInputs=[1]), "application/json", None, "publicInputs must be strings"),
    (as_json(proof=B64, publicInputs=["12"]), "application/json", None, "is not 0x-hex"),
    (as_json(proof=B64, publicInputs=["0x"]), "application/json", None, "is not 0x-hex"),
    (as_json(proof=B64, publicInputs=["0xzz"]), "application/json", None, "is not 0x-hex"),
    (as_json(proof=B64, publicInputs=["0x" + "0" * 65]), "application/json", None, "longer than 32 bytes"),
    (as_json(proof=B64, publicInputs=[hex(FIELD_MODULUS)]), "application/json", None, "not a BN254 field element"),
    (as_json(proof="", publicInputs=[]), "application/json", None, "proof is empty"),
    (as_json(proof=base64.b64encode(bytes(33)).decode(), publicInputs=[]), "application/json", None,
     "33 bytes, not a multiple of 32"),
    (PROOF, "application/octet-stream", None, "needs its public inputs in X-Public-Inputs"),
    (b"", "application/octet-stream", "", "proof is empty"),
], ids=["bad-json", "not-utf8", "not-object", "unknown-field", "no-proof", "no-inputs", "proof-not-str",
        "bad-base64", "inputs-not-list", "input-not-str", "no-0x", "0x-alone", "bad-hex", "too-long",
        "modulus", "empty-proof", "odd-length", "raw-no-header", "raw-empty"])
def test_bad_verify_requests_are_400(data, content_type, header, words):
    with pytest.raises(BadRequest, match=words) as raised:
        body.parse_verify_request(data, content_type, header)
    assert raised.value.status == 400


def test_the_largest_field_element_is_accepted():
    _, inputs = body.parse_verify_request(as_json(proof=B64, publicInputs=[hex(FIELD_MODULUS - 1)]),
                                          "application/json", None)
    assert int.from_bytes(inputs, "big") == FIELD_MODULUS - 1
