"""What bb 5's messages say about a failed run: the one table from stderr to an error class.

bb 5.0.0 (npm @aztec/bb.js 5.0.0) does not say in its exit status whose fault a failure is;
its stderr does. SIGNATURES maps substrings of it, checked in order, to the error raised
(bbworker.errors: the class says the status, the outcome and whose fault it is); a signal
outranks every message but running out of memory, and a failure no row matches is ours
(ServerFault). tests/bbrunner/test_messages.py pins the rows against the real bb.
"""
import os
import re
import signal

from bbworker import files
from bbworker.errors import (CrsUnavailable, ProverCrashed, ProverFailed, ProverOutOfMemory, ResourceUnavailable,
                             ServerFault)

# bb prints this (and exits 0) when a witness does not satisfy the circuit's constraints.
UNSATISFIED = b"Builder failure when we have real witnesses"

SIGNATURES = (
    # an allocation failed: bb aborts (SIGABRT), or exits 1 when no thread can start
    (ProverOutOfMemory, (b"std::bad_alloc", b"Cannot allocate memory", b"thread constructor failed")),
    # ENOSPC/EDQUOT while bb wrote
    (ResourceUnavailable, (b"No space left on device", b"Disk quota exceeded")),
    # the CRS is missing or too small: bb tried to download points
    (CrsUnavailable, (b"crs.aztec-labs.com", b"g1_compressed.dat", b"HTTP request failed")),
    # one of our own files is missing or unreadable
    (ResourceUnavailable, (b"Failed to open file", b"Failed to open JSON file", b"Unable to open file",
                           b"Failed to write to file", b"verification key has wrong size")),
    # bb refuses our arguments or settings
    (ServerFault, (b"Invalid proof system settings",  # e.g. -t starknet with bb 5's UltraHonk
                   b"Directory is actually a file",  # -c naming a file
                   b"Run with --help for more information")),  # any other argument bb refuses
    # the witness: the circuit was read at start, so a bad encoding is the witness's
    (ProverFailed, (UNSATISFIED,
                    b"does not match max witness index",  # witness of another circuit
                    b"deserialize_msgpack",  # not a witness stack
                    b"StackItem::index",  # a function index that is not a u32
                    b"insufficient bytes",  # truncated msgpack
                    b"Invalid gzip data")),
)

# bb 5 `bb verify` exits 1 both when it rejects a proof and when it cannot run. These lines,
# about the proof or its public inputs, make a 1 a rejection, unless a fault of ours shows too.
VERIFY_REJECTIONS = (b"Proof verification failed", b"verification failed at", b"invalid proof size",
                     b"Non-canonical", b"num_public_inputs mismatch",
                     b"proof file size must be a multiple", b"public inputs file size must be a multiple",
                     b"bad proof serde", b"not on the curve")  # proof fields out of range, bad points
VERIFY_FAULTS = (b"VK size", b"Unable to open file", b"HTTP request failed", b"crs", b"CRS")

_MEM_SUFFIX = re.compile(r"\s*\(mem: [^)]*\)\s*$")
_NOISE = ("Scheme is:", "CircuitProve:", "Public inputs saved", "Proof saved", "VK saved",
          "VK Hash saved", "(Experimental)", "Run with --help")


def classify(returncode, stderr):
    """The error class (bbworker.errors) of a bb run that failed.

    returncode: int, bb's exit status (negative: killed by that signal). stderr: bytes.
    """
    memory, *rows = SIGNATURES
    if any(needle in stderr for needle in memory[1]):
        return ProverOutOfMemory
    if returncode is not None and returncode < 0:
        return ProverCrashed  # bb aborting on an uncaught exception prints a message first
    for cls, needles in rows:
        if any(needle in stderr for needle in needles):
            return cls
    return ServerFault


def raise_if_out_of_memory(returncode, stderr, limit_mb):
    """Raise ProverOutOfMemory (`limit_mb`: the memory limit, MiB, or None) when a run that failed
    says an allocation failed."""
    if returncode != 0 and classify(returncode, stderr) is ProverOutOfMemory:
        raise ProverOutOfMemory(returncode, limit_mb)


def bb_error(returncode, stderr, hide=(), witness=True, prefix=""):
    """The error (a BBExited) for a bb run that failed, of the class classify() gives.

    returncode: bb's exit status (negative: the signal). stderr: bytes. hide: paths shown by
    base name only (failure_reason). witness: False for runs without a client's witness
    (write_vk, verify), where a "witness" message is ours. prefix: put before the reason.
    """
    cls = classify(returncode, stderr)
    if cls is ProverCrashed:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:  # real-time signals have no name
            name = str(-returncode)
        reason = f"bb was killed by signal {name}"
    elif cls is ProverFailed and UNSATISFIED in stderr and returncode == 0:
        reason = "the witness does not satisfy the circuit's constraints"
    elif cls is CrsUnavailable:
        reason = "the CRS lacks points bb needs (it tried to download them): " + failure_reason(stderr, hide)
    else:
        reason = failure_reason(stderr, hide)
    if cls is ProverFailed and not witness:
        cls = ServerFault
    if cls is ProverOutOfMemory:
        return ProverOutOfMemory(returncode, None)
    error = cls(returncode, prefix + reason)
    if returncode == -signal.SIGKILL:
        error.may_be_input = False  # the kernel's (out of memory) or an operator's, never bb's own doing
    return error


def verify_verdict(returncode, stderr):
    """True/False for `bb verify`'s exit status and stderr (bytes): accepted or rejected proof.

    Raises bb_error()'s error when bb did not judge the proof (see VERIFY_REJECTIONS).
    """
    if returncode == 0:
        return True
    if returncode == 1 and any(m in stderr for m in VERIFY_REJECTIONS) and \
            not any(m in stderr for m in VERIFY_FAULTS):
        return False
    raise bb_error(returncode, stderr, witness=False, prefix="bb verify failed: ")


def on_full_disk(error, path):
    """`error` (a BBExited), or a ResourceUnavailable in its place when `path`'s file system is
    full (files.low_on_space): bb does not check every write, so a full disk shows as anything
    from a short proof to exit 1 with nothing on stderr. The witness's own fault (bb named it)
    and out-of-memory are kept as they are.
    """
    if isinstance(error, (ProverFailed, ProverOutOfMemory, ResourceUnavailable)):
        return error
    try:
        if not files.low_on_space(path):
            return error
    except OSError:
        return error
    return ResourceUnavailable(error.returncode, f"{error.reason}, and its file system is full")


def failure_reason(stderr, hide=()):
    """Pick one readable line (str) out of bb's stderr (bytes) to explain a failure.

    Prefers bb's "Reason : ..." line, then "Assertion failed: ...", then the last
    line that is not progress noise. The strings in `hide` (temp paths) are replaced
    by their base names; the result is at most 300 characters.
    """
    lines = []
    for raw in stderr.decode("utf-8", "replace").splitlines():
        line = _MEM_SUFFIX.sub("", raw).strip()
        if line and not line.startswith(_NOISE):
            lines.append(line)
    reason = None
    for line in lines:
        if line.startswith("Reason"):
            reason = line.split(":", 1)[-1].strip()
            break
    if reason is None:
        asserts = [line for line in lines if line.startswith("Assertion failed")]
        reason = asserts[0] if asserts else (lines[-1] if lines else "no output")
    for path in sorted(hide, key=len, reverse=True):
        if path:
            reason = reason.replace(path, os.path.basename(path))
    return reason[:300]
