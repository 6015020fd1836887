"""bbrunner.acir on the real fixtures and on crafted witness stacks: what passes, what is rejected, with which error."""
import base64
import glob
import gzip
import json
import os
import struct

import msgpack
import pytest

from bbworker.bbrunner import acir
from bbworker.errors import BadRequest, PayloadTooLarge, ProofFailed
from support import CIRCUIT, FIXTURES, ROOT, fixture_bytes


def program(path):
    """The acir.Program of the circuit JSON at `path`."""
    with open(path, "rb") as f:
        return acir.Program.from_json(f.read())


DEMO = program(CIRCUIT)
VALID_MAP = msgpack.unpackb(gzip.decompress(fixture_bytes("valid_1.gz"))[1:], strict_map_key=False)[0][0][1]
# The two inputs of issue 10: an empty gzip, and one witness at index 2^28 in a 36-byte upload.
EMPTY_GZIP = gzip.compress(b"")
HUGE_INDEX = gzip.compress(b"\x03\x91\x91\x92\x00\x81\xce\x10\x00\x00\x00\xc4\x20" + bytes(32))


def stack(witness_map, fmt=3, items=None):
    """A witness stack as Noir 1.0.0-beta.26 writes it (format byte, msgpack-compact), decompressed."""
    return bytes([fmt]) + msgpack.packb([items if items is not None else [[0, witness_map]]])


def rejected(data, circuit=DEMO):
    """The error class (BadRequest 400, PayloadTooLarge 413, ProofFailed 422) and message check_witness raises."""
    with pytest.raises((BadRequest, PayloadTooLarge, ProofFailed)) as info:
        acir.check_witness(data, circuit)
    return type(info.value), info.value.message


# ---------------------------------------------------------------- the circuit

def real_pairs():
    """(circuit.json, gzipped witness) of every real fixture: demo, other, the committed benchmark circuits."""
    pairs = [(CIRCUIT, os.path.join(FIXTURES, name)) for name in ("valid_1.gz", "valid_2.gz", "valid_3.gz")]
    pairs.append((os.path.join(FIXTURES, "other_circuit.json"), os.path.join(FIXTURES, "other_circuit.gz")))
    for directory in sorted(glob.glob(os.path.join(ROOT, "bench", "fixtures", "*"))):
        pairs.append((os.path.join(directory, "circuit.json"), os.path.join(directory, "witness.gz")))
    return pairs


@pytest.mark.parametrize("circuit_path, witness_path", real_pairs(),
                         ids=lambda p: os.path.relpath(p, ROOT))
def test_witness_count_follows_bbs_rule_on_real_fixtures(circuit_path, witness_path):
    """bb 5 requires the witness count to be the circuit's largest witness index + 1: ours agrees."""
    circuit = program(circuit_path)
    with open(witness_path, "rb") as f:
        data = gzip.decompress(f.read())
    witness_map = msgpack.unpackb(data[1:], strict_map_key=False)[0][0][1]
    assert circuit.witness_count == max(witness_map) + 1
    assert acir.check_witness(data, circuit) == len(witness_map)
    assert len(data) <= circuit.max_witness_bytes


def test_demo_circuit_shape():
    assert (DEMO.witness_count, DEMO.public_inputs) == (798, 1)
    assert DEMO.noir_version.startswith("1.0.0-beta.26")


def test_a_program_that_is_not_format_3_is_a_circuit_error():
    with open(CIRCUIT) as f:
        doc = json.load(f)
    raw = gzip.decompress(base64.b64decode(doc["bytecode"]))
    doc["bytecode"] = base64.b64encode(gzip.compress(b"\x00" + raw[1:])).decode()
    with pytest.raises(acir.CircuitError, match="format byte 0x03"):
        acir.Program.from_json(json.dumps(doc))
    with pytest.raises(acir.CircuitError, match="gzipped base64 bytecode"):
        acir.Program.from_json(b'{"bytecode": "not base64!"}')


def test_two_functions_or_a_call_opcode_are_circuit_errors():
    with pytest.raises(acir.CircuitError, match="2 ACIR functions"):
        acir.Program(b"\x03" + msgpack.packb([[["main", [], [0], [], [], []]] * 2, []]))
    with pytest.raises(acir.CircuitError, match="Call opcodes"):
        acir.Program(b"\x03" + msgpack.packb([[["main", [{"Call": [1, [0], [1], None]}], [0], [], [], []]], []]))


# ---------------------------------------------------------------- the two inputs of issue 10

def test_empty_gzip_is_400():
    error, message = rejected(gzip.decompress(EMPTY_GZIP))
    assert error is BadRequest and "empty" in message


def test_huge_index_is_422_in_milliseconds():
    error, message = rejected(gzip.decompress(HUGE_INDEX))
    assert error is ProofFailed
    assert "witness index 268435456 is not in this circuit" in message
    assert "798 witnesses" in message


# ---------------------------------------------------------------- crafted stacks

def test_a_valid_stack_passes_whatever_the_function_index():
    assert acir.check_witness(stack(VALID_MAP), DEMO) == 798
    assert acir.check_witness(stack(None, items=[[5, VALID_MAP]]), DEMO) == 798


@pytest.mark.parametrize("index", [-1, 1 << 32, 1 << 63])
def test_a_function_index_that_is_not_a_u32_is_400(index):
    """bb fails on it ("error converting into field StackItem::index") in a way no message of the
    witness's explained: refused before bb, as the client's."""
    with pytest.raises(BadRequest, match="not an unsigned 32-bit integer"):
        acir.check_witness(stack(None, items=[[index, VALID_MAP]]), DEMO)
    assert acir.check_witness(stack(None, items=[[(1 << 32) - 1, VALID_MAP]]), DEMO) == 798


def test_a_stack_with_gaps_passes_bb_judges_it():
    """Noir may leave indices unassigned; bb fills them. Only bb can say whether constraints hold."""
    gappy = {k: v for k, v in VALID_MAP.items() if k != 10}
    assert acir.check_witness(stack(gappy), DEMO) == 797


@pytest.mark.parametrize("data, words", [
    (stack({}), "witness map is empty"),
    (stack(None, items=[]), "witness stack is empty"),
    (stack(None, items=[[0, {0: bytes(32)}], [1, {0: bytes(32)}]]), "holds 2 witness maps"),
    (b"\x03" + msgpack.packb({"stack": []}), "not a msgpack-compact witness stack"),
    (b"\x03" + msgpack.packb([[[0]]]), "not [function_index"),
    (b"\x03" + msgpack.packb([[["0", VALID_MAP]]]), "not [function_index"),
    (stack(VALID_MAP) + b"\x00", "not valid msgpack: ExtraData"),
    (stack(VALID_MAP)[:-5], "not valid msgpack"),
    (b"\x03\xc1", "not valid msgpack"),
    (stack({str(k): v for k, v in VALID_MAP.items()}), "indices must be unsigned integers"),
    (stack({0: bytes(31)}), "32-byte big-endian field elements"),
    (stack({0: "0" * 32}), "32-byte big-endian field elements"),
    (stack({0: 7}), "32-byte big-endian field elements"),
], ids=["empty-map", "empty-stack", "two-maps", "named", "short-item", "str-function", "trailing-byte",
        "truncated", "reserved-byte", "str-indices", "short-value", "str-value", "int-value"])
def test_malformed_stacks_are_400(data, words):
    error, message = rejected(data)
    assert error is BadRequest
    assert words in message


@pytest.mark.parametrize("fmt, words", [(2, "0x02 (msgpack with named fields)"), (1, "0x01 (protobuf or bincode)"),
                                        (4, "format byte 0x04"), (0x91, "format byte 0x91")])
def test_other_format_bytes_are_400_naming_the_noir_version(fmt, words):
    error, message = rejected(stack(VALID_MAP, fmt=fmt))
    assert error is BadRequest
    assert words in message and "Noir 1.0.0-beta.26" in message and "+" not in message


def bincode_stack(witness_map, marker=b""):
    """A bincode WitnessStack as Noir wrote before msgpack-compact (u64 lengths, u32 indices, hex fields)."""
    out = marker + struct.pack("<Q", 1) + struct.pack("<I", 0) + struct.pack("<Q", len(witness_map))
    for index, value in sorted(witness_map.items()):
        text = value.hex().encode()
        out += struct.pack("<I", index) + struct.pack("<Q", len(text)) + text
    return out


@pytest.mark.parametrize("marker", [b"", b"\x00"], ids=["legacy", "format-0"])
def test_a_bincode_witness_names_the_noir_version_needed(marker):
    error, message = rejected(bincode_stack(VALID_MAP, marker))
    assert error is BadRequest
    assert "bincode" in message and "Noir 1.0.0-beta.26" in message


@pytest.mark.parametrize("index", [798, 1000, 2 ** 28, 2 ** 32 - 1, 2 ** 63])
def test_indices_beyond_the_circuit_are_422(index):
    error, message = rejected(stack({**VALID_MAP, index: bytes(32)}))
    assert error is ProofFailed and f"witness index {index} is not in this circuit" in message


def test_negative_index_is_422():
    error, _ = rejected(stack({**VALID_MAP, -1: bytes(32)}))
    assert error is ProofFailed


def test_value_at_or_above_the_field_modulus_is_422():
    error, message = rejected(stack({**VALID_MAP, 0: acir.MODULUS_BYTES}))
    assert error is ProofFailed and "modulus" in message
    below = (acir.FIELD_MODULUS - 1).to_bytes(32, "big")
    assert acir.check_witness(stack({**VALID_MAP, 0: below}), DEMO) == 798


def test_a_witness_larger_than_the_circuit_allows_is_rejected_before_decoding():
    error, message = rejected(b"\x03" + bytes(DEMO.max_witness_bytes))
    assert error is PayloadTooLarge and str(DEMO.max_witness_bytes) in message
    error, message = rejected(acir.STACK_HEAD + bytes(DEMO.max_witness_bytes))
    assert error is ProofFailed and "another circuit" in message


def test_other_circuits_witness_passes_the_demo_bound_but_not_the_reverse():
    """other_circuit has 4 witnesses: the demo's (798) are beyond it. The reverse is bb's call (422 there)."""
    other = program(os.path.join(FIXTURES, "other_circuit.json"))
    error, message = rejected(gzip.decompress(fixture_bytes("valid_1.gz")), other)
    assert error is ProofFailed and "another circuit" in message



# ---------------------------------------------------------------- the server's own witness

@pytest.mark.parametrize("circuit_path", [CIRCUIT, os.path.join(FIXTURES, "other_circuit.json")],
                         ids=["demo", "other"])
def test_zero_witness_gives_every_witness_of_the_circuit_the_value_0(circuit_path):
    circuit = program(circuit_path)
    data = gzip.decompress(acir.zero_witness(circuit))
    assert acir.check_witness(data, circuit) == circuit.witness_count
    assert data.startswith(acir.STACK_HEAD)
    witness_map = msgpack.unpackb(data[1:], strict_map_key=False)[0][0][1]
    assert sorted(witness_map) == list(range(circuit.max_witness_index + 1))
    assert set(witness_map.values()) == {bytes(32)}
    assert acir.zero_witness(circuit) == acir.zero_witness(circuit)  # no timestamp: the same bytes every time
