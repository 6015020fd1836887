"""bbrunner.formats against the real bb 5: the VK header, the CRS size bb needs, proofs and public inputs."""
import os
import subprocess

import pytest

from bbworker.bbrunner import formats, messages
from bbworker.errors import CrsUnavailable


def read(path):
    with open(path, "rb") as f:
        return f.read()


def run_bb(bb, *args, env=None):
    proc = subprocess.run([bb, *args], capture_output=True, timeout=120, env=env)
    return proc.returncode, proc.stderr


def small_crs(tmp_path, crs_dir, points, name="small"):
    """A CRS dir holding the first `points` G1 points of `crs_dir`."""
    target = tmp_path / name
    target.mkdir()
    with open(os.path.join(crs_dir, formats.G1_FILE), "rb") as f:
        (target / formats.G1_FILE).write_bytes(f.read(points * formats.G1_POINT_BYTES))
    return str(target)


def vk_bytes(log_n=12, public_inputs=9, size=3680):
    """A VK of bb 5's layout: log2 of the rows, the public inputs (pairing points included), then zeros."""
    return log_n.to_bytes(32, "big") + public_inputs.to_bytes(32, "big") + bytes(size - 64)


# ---------------------------------------------------------------- the verification key

def test_vk_states_the_dyadic_circuit_size(hashchains):
    sizes = {n: formats.vk_log_circuit_size(read(chain.vk)) for n, chain in hashchains.items()}
    assert sizes == {7: 10, 15: 11, 31: 12, 62: 13}  # bench/README.md's table of rows


def test_vk_header_is_checked():
    with pytest.raises(ValueError):
        formats.vk_log_circuit_size(b"\0" * 31)
    with pytest.raises(ValueError):
        formats.vk_log_circuit_size(b"\0" * 32)
    with pytest.raises(ValueError):
        formats.vk_log_circuit_size((40).to_bytes(32, "big"))


def test_vk_counts_the_circuits_public_inputs_plus_the_pairing_points(reference_vk):
    """The demo circuit has 1 public input; bb 5's VK counts it with the 8 pairing point fields."""
    vk = read(reference_vk)
    assert formats.vk_public_inputs(vk) == 1 + formats.PAIRING_POINT_FIELDS
    assert formats.vk_problem(vk, read(os.path.join(os.path.dirname(reference_vk), "vk_hash")), 1) is None


@pytest.mark.parametrize("vk, vk_hash, public_inputs, problem", [
    (vk_bytes(), bytes(32), 1, None),
    (vk_bytes(public_inputs=3), bytes(32), None, None),  # the count is not checked without the circuit's
    (vk_bytes(), bytes(31), 1, "vk_hash is 31 bytes, not 32"),
    (vk_bytes(), bytes(33), None, "vk_hash is 33 bytes, not 32"),
    (vk_bytes(size=3681), bytes(32), 1, "vk is 3681 bytes, not a whole number of fields"),
    (vk_bytes(size=64), bytes(32), 1, "vk is 64 bytes, not a whole number of fields"),
    (vk_bytes(log_n=0), bytes(32), 1, "verification key states a circuit of 2^0 rows"),
    (vk_bytes(log_n=29), bytes(32), 1, "verification key states a circuit of 2^29 rows"),
    (vk_bytes(public_inputs=3), bytes(32), 1, "vk counts 3 public inputs; the circuit has 1 (+8 pairing point fields)"),
], ids=["good", "unchecked-count", "short-hash", "long-hash", "partial-field", "too-short", "no-rows",
        "too-many-rows", "public-inputs"])
def test_vk_problem(vk, vk_hash, public_inputs, problem):
    assert formats.vk_problem(vk, vk_hash, public_inputs) == problem


# ---------------------------------------------------------------- the CRS

def test_crs_points(tmp_path, crs_dir):
    assert formats.crs_points(crs_dir) == 32769
    assert formats.crs_points(small_crs(tmp_path, crs_dir, 1000)) == 1000
    (tmp_path / "empty").mkdir()
    assert formats.crs_points(str(tmp_path / "empty")) == 0
    with pytest.raises(FileNotFoundError):
        formats.crs_points(str(tmp_path / "missing"))
    with pytest.raises(NotADirectoryError):
        formats.crs_points(os.path.join(crs_dir, formats.G1_FILE))


def test_a_crs_of_the_stated_size_proves_and_a_much_smaller_one_fails(bb, crs_dir, hashchains, tmp_path):
    circuit, witness, vk = hashchains[7]
    need = formats.crs_points_needed(formats.vk_log_circuit_size(read(vk)))
    enough = small_crs(tmp_path, crs_dir, need, "enough")
    (tmp_path / "o1").mkdir()
    code, err = run_bb(bb, "prove", "-b", circuit, "-w", witness, "-k", vk, "-o", str(tmp_path / "o1"), "-c", enough)
    assert code == 0, err
    short = small_crs(tmp_path, crs_dir, need // 2, "short")
    (tmp_path / "o2").mkdir()
    code, err = run_bb(bb, "prove", "-b", circuit, "-w", witness, "-k", vk, "-o", str(tmp_path / "o2"), "-c", short)
    if code == 0:
        pytest.skip("bb downloaded the missing CRS points (this machine has internet access)")
    assert messages.classify(code, err) is CrsUnavailable, err


# ---------------------------------------------------------------- proofs and public inputs

def test_proof_bytes_of_the_real_bbs_proof(bb, crs_dir, hashchains, tmp_path):
    """bb 5's default target pads every proof to PROOF_FIELDS; the length does not grow with the circuit."""
    circuit, witness, vk = hashchains[31]
    out = tmp_path / "out"
    out.mkdir()
    code, err = run_bb(bb, "prove", "-b", circuit, "-w", witness, "-k", vk, "-o", str(out), "-c", crs_dir)
    assert code == 0, err
    log_n = formats.vk_log_circuit_size(read(vk))
    assert len((out / "proof").read_bytes()) == formats.proof_bytes(None, log_n) == 458 * 32


def test_proof_bytes_per_verifier_target():
    assert formats.proof_bytes(None, 12) == formats.proof_bytes("noir-recursive", 20) == 458 * 32
    assert formats.proof_bytes("noir-recursive-no-zk", 12) == 410 * 32
    assert formats.proof_bytes("evm", 12) == (82 + 12 * 12) * 32
    assert formats.proof_bytes("evm-no-zk", 10) == (67 + 11 * 10) * 32
    assert formats.proof_bytes("noir-rollup", 12) is None  # not pinned: only whole fields are checked


def test_parse_public_inputs_gives_0x_and_64_hex_digits_per_field():
    data = bytes(31) + b"\x07" + bytes(range(32))
    assert formats.parse_public_inputs(data) == [
        "0x" + "00" * 31 + "07", "0x" + bytes(range(32)).hex()]
    assert formats.parse_public_inputs(b"\xAB" * 32) == ["0x" + "ab" * 32]
    assert formats.parse_public_inputs(b"") == []


@pytest.mark.parametrize("size", [1, 31, 33, 65])
def test_parse_public_inputs_rejects_partial_fields(size):
    with pytest.raises(ValueError, match=str(size)):
        formats.parse_public_inputs(bytes(size))


def test_the_ignition_crs_is_told_from_another(crs_dir, tmp_path):
    """Point 1 of bn254_g1.dat is the ceremony's [x]_1 (bb verify pins its [x]_2): the real CRS passes,
    one with another point 1 (a development CRS) does not, a CRS too short to tell passes (the points
    check refuses it)."""
    assert formats.crs_is_ignition(crs_dir)
    with open(os.path.join(crs_dir, formats.G1_FILE), "rb") as f:
        real = f.read(4 * formats.G1_POINT_BYTES)
    assert real[64:128] == formats.IGNITION_X1
    other = tmp_path / "other"
    other.mkdir()
    (other / formats.G1_FILE).write_bytes(real[:64] + real[128:192] + real[128:])
    assert not formats.crs_is_ignition(str(other))
    short = tmp_path / "short"
    short.mkdir()
    (short / formats.G1_FILE).write_bytes(real[:64])
    assert formats.crs_is_ignition(str(short))
