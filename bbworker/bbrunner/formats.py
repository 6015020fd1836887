"""What bb-worker reads of bb 5's files: the CRS, the verification key, proofs, public inputs.

Facts checked with bb 5.0.0 (npm @aztec/bb.js 5.0.0) on this project's circuits;
tests/bbrunner/test_formats.py pins them against the real bb where it matters.

- CRS directory (`bb -c DIR`): `bn254_g1.dat` holds uncompressed G1 points, 64 bytes each
  (x then y, 32-byte big-endian); bb downloads what is missing and fails offline. bb 5
  pins the G2 point in its verifier: `bn254_g2.dat` is not read by prove or verify.
- Verification key (`bb write_vk` output `vk`, UltraHonk, any verifier target): 32-byte
  big-endian field elements: log2 of the circuit's dyadic size, the number of public
  inputs (the circuit's plus PAIRING_POINT_FIELDS), their offset, then commitments. bb
  needs at most 2^log2 CRS points to prove, so a CRS with fewer is too small.
- Proof (`bb prove -o DIR` output `DIR/proof`): whole field elements, PROOF_FIELDS long;
  `DIR/public_inputs`: one 32-byte big-endian field element per public input.
"""
import errno
import os
import stat

G1_FILE = "bn254_g1.dat"
G1_POINT_BYTES = 64
# Point 1 of the Aztec Ignition ceremony's G1 points, [x]_1 (x then y, big-endian): bb 5's verifier
# pins the ceremony's [x]_2, so with any other CRS every proof fails verification.
IGNITION_X1 = bytes.fromhex("2d360628289ff943ff6bd1a87bbe4e62abe7fb61ba83effd266f22bdcf31e6f9"
                            "26b92a79e563c3f48252cce7feeca2f0f8d33dcb4ef7b0643bf07bd405700aaa")
FIELD_BYTES = 32  # a BN254 field element, big-endian: VK, proof and public_inputs files, witness values
# The BN254 scalar field modulus: witness values and public inputs are field elements below it.
FIELD_MODULUS = 0x30644E72E131A029B85045B68181585D2833E84879B9709143E1F593F0000001
MAX_LOG_CIRCUIT_SIZE = 28  # bb 5 proves circuits up to 2^28 rows
# Public inputs every bb 5 UltraHonk VK counts beyond the circuit's own: the pairing point object.
PAIRING_POINT_FIELDS = 8
# Proof length in 32-byte fields per verifier target, measured with bb 5.0.0: (fixed, per log2 rows).
# The recursive targets pad to a constant size; the evm ones grow with the circuit.
PROOF_FIELDS = {None: (458, 0), "noir-recursive": (458, 0), "noir-recursive-no-zk": (410, 0),
                "evm": (82, 12), "evm-no-zk": (67, 11)}


def crs_points(crs_dir):
    """Whole G1 points (int) in `crs_dir`'s bn254_g1.dat, 0 when it is missing.

    Raises OSError if the directory itself is unusable.
    """
    if not stat.S_ISDIR(os.stat(crs_dir).st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), crs_dir)
    try:
        return os.stat(os.path.join(crs_dir, G1_FILE)).st_size // G1_POINT_BYTES
    except FileNotFoundError:
        return 0


def crs_is_ignition(crs_dir):
    """True when `crs_dir`'s bn254_g1.dat holds the Ignition ceremony's point 1 (IGNITION_X1), or is too
    short to tell (the points check says so); False for another CRS. Raises OSError."""
    with open(os.path.join(crs_dir, G1_FILE), "rb") as f:
        f.seek(G1_POINT_BYTES)
        point = f.read(G1_POINT_BYTES)
    return len(point) < G1_POINT_BYTES or point == IGNITION_X1


def crs_points_needed(log_n):
    """CRS G1 points (int) a circuit of 2^`log_n` rows needs to be proved with certainty."""
    return 1 << log_n


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


def vk_public_inputs(vk):
    """The number of public inputs a bb 5 VK (bytes) counts, the pairing point fields included."""
    return int.from_bytes(vk[FIELD_BYTES:2 * FIELD_BYTES], "big")


def vk_problem(vk, vk_hash, public_inputs=None):
    """Why a `vk` and `vk_hash` (bytes) bb wrote are unusable (str), or None when they look right.

    public_inputs: the circuit's own count (int) to check the VK's against, or None.
    """
    if len(vk_hash) != FIELD_BYTES:
        return f"vk_hash is {len(vk_hash)} bytes, not {FIELD_BYTES}"
    if len(vk) % FIELD_BYTES or len(vk) < 3 * FIELD_BYTES:
        return f"vk is {len(vk)} bytes, not a whole number of fields"
    try:
        vk_log_circuit_size(vk)
    except ValueError as exc:
        return str(exc)
    if public_inputs is not None and vk_public_inputs(vk) != public_inputs + PAIRING_POINT_FIELDS:
        return (f"vk counts {vk_public_inputs(vk)} public inputs; the circuit has {public_inputs} "
                f"(+{PAIRING_POINT_FIELDS} pairing point fields)")
    return None


def proof_bytes(verifier_target, log_n):
    """The length (int, bytes) of a proof for `verifier_target` (None: bb's default) and a
    circuit of 2^`log_n` rows, or None for a target whose length is not pinned here."""
    fixed, per_log_size = PROOF_FIELDS.get(verifier_target, (None, None))
    return FIELD_BYTES * (fixed + per_log_size * log_n) if fixed else None


def parse_public_inputs(data):
    """Split bb's `public_inputs` file (bytes, 32 bytes per field element) into 0x-hex strings.

    Raises ValueError if the length is not a multiple of 32.
    """
    if len(data) % FIELD_BYTES:
        raise ValueError(f"public_inputs is {len(data)} bytes, not a multiple of {FIELD_BYTES}")
    return ["0x" + data[i:i + FIELD_BYTES].hex() for i in range(0, len(data), FIELD_BYTES)]
