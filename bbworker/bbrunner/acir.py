"""Noir witness stacks and ACIR programs, decoded with msgpack and checked before bb runs.

Formats are those of Noir 1.0.0-beta.26 and bb 5.0.0 (npm @aztec/bb.js 5.0.0):

- The circuit is nargo's / noir_wasm's program JSON: its `bytecode` is base64 of a gzip of one
  format byte then the msgpack `Program` (acvm-repo/acir/src/serialization.rs, noir-lang/noir).
- The witness that `nargo execute` / noir_js `execute()` write is a gzip of one format byte then
  the msgpack `WitnessStack`. Noir writes the format byte 3 (msgpack-compact: structs as arrays):
  `[[[function_index, {witness_index: <32-byte big-endian field element>, ...}]]]`.

bb 5 reads only format bytes 2 and 3 and, even for 2, only the compact (array) layout; for a
single-function program it needs exactly one witness map in the stack. It fills a dense vector
up to the largest witness index before it compares anything with the circuit (an index of 2^28
costs it 8 GiB), then requires the witness count to equal the circuit's largest witness index
+ 1 (acir_format/acir_to_constraint_buf.cpp, barretenberg). An empty witness map makes it exit 0
with a proof that does not verify. `check_witness` rejects all of these in milliseconds.
"""
import base64
import gzip
import json

import msgpack

from bbworker.bbrunner.formats import FIELD_BYTES, FIELD_MODULUS
from bbworker.errors import BadRequest, PayloadTooLarge, ProofFailed

FORMAT_MSGPACK_COMPACT = 3  # the witness and bytecode format byte Noir 1.0.0-beta.26 writes
FORMAT_NAMES = {0: "bincode", 1: "protobuf or bincode", 2: "msgpack with named fields", 3: "msgpack-compact"}
STACK_HEAD = b"\x03\x91\x91\x92"  # format byte, then [[[ (a stack of one [function_index, map])
MODULUS_BYTES = FIELD_MODULUS.to_bytes(FIELD_BYTES, "big")
# Largest msgpack encoding of one witness map entry: uint64 key (9 bytes) + bin8 header (2) + 32.
ENTRY_BYTES = 43
STACK_OVERHEAD_BYTES = 32  # format byte, array and map headers, function index


class CircuitError(ValueError):
    """The circuit file cannot be served: not a Noir program bb 5 can prove."""


# ---------------------------------------------------------------- the circuit

class Program:
    """What the checks need to know about one compiled Noir program (circuit.json).

    Attributes: `noir_version` (str, from the JSON), `max_witness_index` (int: the largest witness
    index any opcode or parameter of the circuit uses, computed as bb 5 does), `witness_count`
    (int, max_witness_index + 1), `public_inputs` (int: public parameters + return values),
    `max_witness_bytes` (int: the largest decompressed witness stack this circuit can have).
    """

    def __init__(self, bytecode, noir_version=""):
        self.noir_version = noir_version
        program = _unpack_format3(bytecode, CircuitError, "circuit bytecode")
        try:
            functions = program[0]
            if len(functions) != 1:
                raise CircuitError(f"the program has {len(functions)} ACIR functions; bb proves single-function programs")
            _name, opcodes, private, public, returns = functions[0][:5]
            highest = max([-1, *private, *public, *returns])
            for opcode in opcodes:
                highest = max(highest, _opcode_max_witness(opcode))
        except CircuitError:
            raise
        except (TypeError, ValueError, IndexError, KeyError, AttributeError) as exc:
            raise CircuitError(f"circuit bytecode is not a Noir ACIR program: {type(exc).__name__}: {exc}") from None
        if highest < 0:
            raise CircuitError("the circuit uses no witnesses")
        self.max_witness_index = highest
        self.witness_count = highest + 1
        self.public_inputs = len(public) + len(returns)
        self.max_witness_bytes = STACK_OVERHEAD_BYTES + ENTRY_BYTES * self.witness_count

    @classmethod
    def from_json(cls, data):
        """Decode program JSON (bytes or str) with a base64 gzipped `bytecode`; raises CircuitError."""
        try:
            doc = json.loads(data)
            bytecode = gzip.decompress(base64.b64decode(doc["bytecode"], validate=True))
        except (ValueError, TypeError, KeyError, OSError, EOFError) as exc:
            raise CircuitError(f"not a Noir program JSON with a gzipped base64 bytecode: {exc}") from None
        return cls(bytecode, str(doc.get("noir_version") or ""))


def _unpack_format3(data, error, what):
    if not data or data[0] != FORMAT_MSGPACK_COMPACT:
        found = f"0x{data[0]:02x}" if data else "nothing"
        raise error(f"{what} starts with {found}; bb 5 reads format byte 0x03 (msgpack-compact)")
    try:
        return msgpack.unpackb(data[1:], strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise error(f"{what} is not valid msgpack: {exc}") from None


def _expression_max(expr):
    """Largest witness of an ACIR Expression [mul_terms, linear_combinations, q_c]."""
    mul, linear = expr[0], expr[1]
    return max([-1] + [max(t[1], t[2]) for t in mul] + [t[1] for t in linear])


def _ints_max(value):
    """Largest int anywhere inside `value` (nested lists and maps); -1 if none."""
    if isinstance(value, bool):
        return -1
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)):
        return max([-1] + [_ints_max(v) for v in value])
    if isinstance(value, dict):
        return max([-1] + [_ints_max(v) for v in value.values()])
    return -1  # bytes (field constants), str, None


def _opcode_max_witness(opcode):
    """Largest witness index one ACIR opcode uses, as bb 5's update_max_witness_index_from_opcode.

    The msgpack-compact layout is that of Noir 1.0.0-beta.26. For black box calls every integer
    in the call counts except RANGE's bit size: their other integer fields are witnesses, or (in
    calls bb's rule has no special case for) small sizes that can only raise the bound a little.
    """
    (kind, body), = opcode.items()
    if kind == "AssertZero":
        return _expression_max(body)
    if kind == "BlackBoxFuncCall":
        (name, args), = body.items()
        if name == "RANGE":
            return _ints_max(args[0])
        return _ints_max(args)
    if kind == "BrilligCall":
        _id, inputs, outputs, predicate = body[:4]
        highest = -1
        for item in inputs:
            (shape, value), = item.items()
            if shape == "Single":
                highest = max(highest, _expression_max(value))
            elif shape == "Array":
                highest = max([highest] + [_expression_max(e) for e in value])
            # MemoryArray: a block id, no witness
        highest = max(highest, _ints_max(outputs))
        if predicate is not None:
            highest = max(highest, _expression_max(predicate))
        return highest
    if kind == "MemoryInit":
        return _ints_max(body[1])  # [block_id, init witnesses, block_type]
    if kind == "MemoryOp":
        return _ints_max(body[1:])  # [block_id, op, ...]: the op's index and value
    if kind == "Call":
        raise CircuitError("the circuit uses ACIR Call opcodes, which bb does not prove")
    raise CircuitError(f"unknown ACIR opcode {kind!r} (this server reads Noir 1.0.0-beta.26 programs)")


# ---------------------------------------------------------------- the witness

def check_witness(data, circuit):
    """Check a decompressed witness stack (bytes) against `circuit` (Program); return its size.

    Returns the number of witness values (int). Raises BadRequest (400), PayloadTooLarge (413) or ProofFailed (422) for everything
    bb 5 would choke on, fill memory with, or prove into a proof that does not verify. Cost: one
    msgpack decode plus C-speed scans; about 20 ms for a 2^18-row circuit's 2 MiB witness.
    """
    check_head(data[:9], circuit)
    check_size(data[:9], len(data), circuit)
    try:
        stack = msgpack.unpackb(memoryview(data)[1:], strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:  # ExtraData, FormatError, StackError, ...
        raise BadRequest(f"the witness is not valid msgpack: {type(exc).__name__}") from None
    witness_map = _witness_map(stack)
    keys, values = witness_map.keys(), witness_map.values()
    if set(map(type, keys)) != {int}:
        raise BadRequest("witness indices must be unsigned integers")
    if set(map(type, values)) != {bytes} or set(map(len, values)) != {FIELD_BYTES}:
        raise BadRequest(f"witness values must be {FIELD_BYTES}-byte big-endian field elements")
    low, high = min(keys), max(keys)
    if low < 0 or high > circuit.max_witness_index:
        bad = low if low < 0 else high
        raise ProofFailed(f"witness index {bad} is not in this circuit: it has {circuit.witness_count} "
                                f"witnesses (indices 0 to {circuit.max_witness_index}); is the witness "
                                "for another circuit?")
    if max(values) >= MODULUS_BYTES:  # big-endian, equal lengths: bytes order is numeric order
        raise ProofFailed("a witness value is not below the BN254 scalar field modulus")
    return len(witness_map)


def is_bincode(head):
    """True when `head` (the first 9 bytes of a decompressed witness) starts a bincode witness stack.

    Noir's bincode WitnessStack starts with the stack length as a u64 little-endian (1), after a
    format byte 0x00 in the releases that wrote one (acvm-repo/acir/src/serialization.rs).
    """
    one = b"\x01" + bytes(7)
    return head[:8] == one or head[:9] == b"\x00" + one


def check_head(head, circuit):
    """Check the first bytes of a decompressed witness (bytes, 9 of them when there are that many).

    Raises BadRequest (400) when it is empty or its format byte is not 0x03, naming the
    format found and the Noir version `circuit` (Program) needs.
    """
    needs = f"Noir {circuit.noir_version.split('+')[0]}" if circuit.noir_version else "the circuit's Noir version"
    if not head:
        raise BadRequest("the witness is empty: send the gzipped witness stack that `nargo execute` writes")
    if head[0] != FORMAT_MSGPACK_COMPACT:
        if is_bincode(head):
            raise BadRequest("the witness is in bincode format, written by a Noir older than this "
                                    f"server needs: execute it with {needs} (format byte 0x03, msgpack-compact)")
        name = FORMAT_NAMES.get(head[0])
        found = f"format byte 0x{head[0]:02x}" + (f" ({name})" if name else "")
        raise BadRequest(f"the witness starts with {found}; this server needs a witness stack "
                                f"from {needs}: format byte 0x03 then msgpack-compact")


def check_size(head, size, circuit):
    """Raise ProofFailed (422) or PayloadTooLarge (413) when `size` bytes of decompressed witness are more than `circuit` can have.

    head: the witness's first bytes (9). A witness stack of the right format is 422 (the witness
    of a larger circuit, most likely), a bincode one gets check_head's 400, anything else 413.
    """
    if size <= circuit.max_witness_bytes:
        return
    if head.startswith(STACK_HEAD):
        raise ProofFailed(f"the witness is over {size} bytes decompressed; this circuit's "
                                f"{circuit.witness_count} witnesses take at most {circuit.max_witness_bytes}: "
                                "is it for another circuit?")
    if is_bincode(head):
        check_head(head, circuit)
    raise PayloadTooLarge(f"witness exceeds {circuit.max_witness_bytes} bytes decompressed, the most "
                            f"this circuit's {circuit.witness_count} witnesses take")


def _witness_map(stack):
    """The one witness map of `[[[function_index, {index: value}]]]`; BadRequest (400) otherwise."""
    if not (isinstance(stack, list) and len(stack) == 1 and isinstance(stack[0], list)):
        raise BadRequest("the witness is not a msgpack-compact witness stack [[[index, {witness: value}]]]")
    items = stack[0]
    if not items:
        raise BadRequest("the witness stack is empty")
    if len(items) != 1:
        raise BadRequest(f"the witness stack holds {len(items)} witness maps; bb proves a "
                                "single-function program, whose stack holds one")
    item = items[0]
    if not (isinstance(item, list) and len(item) == 2 and type(item[0]) is int and isinstance(item[1], dict)):
        raise BadRequest("the witness stack item is not [function_index, {witness: value}]")
    if not 0 <= item[0] < 1 << 32:  # bb reads a u32 ("error converting into field StackItem::index")
        raise BadRequest(f"the witness stack item's function index {item[0]} is not an unsigned 32-bit integer")
    if not item[1]:
        raise BadRequest("the witness map is empty")
    return item[1]


def zero_witness(program):
    """A gzipped witness stack (bytes, Noir 1.0.0-beta.26's format) giving every witness of
    `program` (Program) the value 0: the server's own witness, which no client controls."""
    values = {index: bytes(FIELD_BYTES) for index in range(program.witness_count)}
    stack = bytes([FORMAT_MSGPACK_COMPACT]) + msgpack.packb([[[0, values]]])
    return gzip.compress(stack, compresslevel=1, mtime=0)
