"""What bb-worker reads of bb 5's files and messages: CRS size, VK header, stderr signatures.

Facts checked with bb 5.0.0 (npm @aztec/bb.js 5.0.0) on this project's circuits;
tests/test_bbformat.py pins them against the real bb where it matters.

- CRS directory (`bb -c DIR`): `bn254_g1.dat` holds uncompressed G1 points, 64 bytes
  each (x then y, 32-byte big-endian); bb downloads what is missing and fails offline
  with "HTTP request failed for http://crs.aztec-labs.com/g1_compressed.dat". bb 5
  pins the G2 point in its verifier: `bn254_g2.dat` is not read by prove or verify.
- Verification key (`bb write_vk` output `vk`, UltraHonk, any verifier target): a
  sequence of 32-byte big-endian field elements, the first being log2 of the circuit's
  dyadic size. bb needs at most that many CRS points to prove (a little more than the
  circuit's row count in practice), so a CRS with fewer points than 2^log2 is too small.
"""
import errno
import os
import stat
from collections import namedtuple

G1_FILE = "bn254_g1.dat"
G2_FILE = "bn254_g2.dat"
G1_POINT_BYTES = 64
FIELD_BYTES = 32  # a BN254 field element, big-endian: VK, proof and public_inputs files, witness values
MAX_LOG_CIRCUIT_SIZE = 28  # bb 5 proves circuits up to 2^28 rows

# ---------------------------------------------------------------- CRS and VK

CrsInfo = namedtuple("CrsInfo", "points g2")
CrsInfo.__doc__ = """A CRS directory as bb would read it.

points: int, whole G1 points in bn254_g1.dat (0 when the file is missing).
g2: bool, whether bn254_g2.dat is present (informative: bb 5 does not read it).
"""


def crs_info(crs_dir):
    """Return the CrsInfo of `crs_dir` (str). Raises OSError if the directory itself is unusable."""
    if not stat.S_ISDIR(os.stat(crs_dir).st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), crs_dir)
    try:
        points = os.stat(os.path.join(crs_dir, G1_FILE)).st_size // G1_POINT_BYTES
    except FileNotFoundError:
        points = 0
    return CrsInfo(points, os.path.exists(os.path.join(crs_dir, G2_FILE)))


def vk_log_circuit_size(vk):
    """Return log2 of the circuit's dyadic size (int) stated by a bb 5 VK (bytes, the `vk` file).

    Raises ValueError when `vk` is too short or the value is not a plausible size.
    """
    if len(vk) < FIELD_BYTES:
        raise ValueError(f"verification key is {len(vk)} bytes, too short")
    log_n = int.from_bytes(vk[:FIELD_BYTES], "big")
    if not 1 <= log_n <= MAX_LOG_CIRCUIT_SIZE:
        raise ValueError(f"verification key states a circuit of 2^{log_n} rows")
    return log_n


def crs_points_needed(log_n):
    """CRS G1 points (int) a circuit of 2^`log_n` rows needs to be proved with certainty."""
    return 1 << log_n


# ---------------------------------------------------------------- bb's failures

# What a failed bb run says about whose fault it is. Kinds:
WITNESS = "witness"   # the client's witness: 422
CRS = "crs"           # the CRS is missing or too small (bb tried to download): 503 + Retry-After
NO_SPACE = "no_space"  # ENOSPC/EDQUOT while bb wrote: 503
FILES = "files"       # one of our own files is missing or unreadable: 503
CONFIG = "config"     # bb rejects our arguments or settings (verifier target, CRS path): 500
SIGNAL = "signal"     # bb was killed by a signal (abort, OOM kill, segfault): 500
SERVER = "server"     # any other failure: ours, 500

# bb prints this (and exits 0) when a witness does not satisfy the circuit's constraints.
UNSATISFIED = b"Builder failure when we have real witnesses"

# Substrings of bb 5's stderr, checked in this order (first match wins).
SIGNATURES = (
    (NO_SPACE, (b"No space left on device", b"Disk quota exceeded")),
    (CRS, (b"crs.aztec-labs.com", b"g1_compressed.dat", b"HTTP request failed")),
    (FILES, (b"Failed to open file", b"Failed to open JSON file", b"Unable to open file",
             b"Failed to write to file", b"verification key has wrong size")),
    (CONFIG, (b"Invalid proof system settings",  # e.g. -t starknet with bb 5's UltraHonk
              b"Directory is actually a file",  # -c naming a file
              b"Run with --help for more information")),  # any other argument bb refuses
    (WITNESS, (UNSATISFIED,
               b"does not match max witness index",  # witness of another circuit
               b"deserialize_msgpack",  # not a witness stack
               b"insufficient bytes",  # truncated msgpack
               b"Invalid gzip data")),  # the circuit was read at start, so this is the witness
)


def classify(returncode, stderr):
    """Return the kind (one of the constants above) of a bb run that failed.

    returncode: int, bb's exit status (negative: killed by that signal).
    stderr: bytes, everything bb wrote to stderr. A signal outranks the messages
    (bb aborting on an uncaught exception prints one before SIGABRT).
    """
    if returncode is not None and returncode < 0:
        return SIGNAL
    for kind, needles in SIGNATURES:
        if any(needle in stderr for needle in needles):
            return kind
    return SERVER
