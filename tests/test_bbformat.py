"""bbformat against the real bb 5: the VK header, the CRS size bb needs, the stderr signatures."""
import os
import shutil
import subprocess

import pytest

import bbformat
from support import tmpfs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HASHCHAIN = os.path.join(ROOT, "bench", "fixtures")
DEMO = os.path.join(ROOT, "circuit.json")


def hashchain(n):
    return os.path.join(HASHCHAIN, f"hashchain-{n}", "circuit.json"), os.path.join(HASHCHAIN, f"hashchain-{n}", "witness.gz")


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
    with open(os.path.join(crs_dir, bbformat.G1_FILE), "rb") as f:
        (target / bbformat.G1_FILE).write_bytes(f.read(points * bbformat.G1_POINT_BYTES))
    return str(target)


@pytest.fixture(scope="module")
def vks(bb, crs_dir, tmp_path_factory):
    """{n: path of the VK} of the committed hashchain circuits (2^10..2^13 rows)."""
    out = {}
    for n in (7, 15, 31, 62):
        d = tmp_path_factory.mktemp(f"vk{n}")
        code, err = run_bb(bb, "write_vk", "-b", hashchain(n)[0], "-o", str(d), "-c", crs_dir)
        assert code == 0, err
        out[n] = str(d / "vk")
    return out


def test_vk_states_the_dyadic_circuit_size(vks):
    sizes = {n: bbformat.vk_log_circuit_size(read(vks[n])) for n in vks}
    assert sizes == {7: 10, 15: 11, 31: 12, 62: 13}  # bench/README.md's table of rows


def test_vk_header_is_checked():
    with pytest.raises(ValueError):
        bbformat.vk_log_circuit_size(b"\0" * 31)
    with pytest.raises(ValueError):
        bbformat.vk_log_circuit_size(b"\0" * 32)
    with pytest.raises(ValueError):
        bbformat.vk_log_circuit_size((40).to_bytes(32, "big"))


def test_crs_info(tmp_path, crs_dir):
    assert bbformat.crs_info(crs_dir) == (32769, True)
    assert bbformat.crs_info(small_crs(tmp_path, crs_dir, 1000)) == (1000, False)
    (tmp_path / "empty").mkdir()
    assert bbformat.crs_info(str(tmp_path / "empty")) == (0, False)
    with pytest.raises(FileNotFoundError):
        bbformat.crs_info(str(tmp_path / "missing"))
    with pytest.raises(NotADirectoryError):
        bbformat.crs_info(os.path.join(crs_dir, bbformat.G1_FILE))


def test_a_crs_of_the_stated_size_proves_and_a_much_smaller_one_fails(bb, crs_dir, vks, tmp_path):
    circuit, witness = hashchain(7)
    need = bbformat.crs_points_needed(bbformat.vk_log_circuit_size(read(vks[7])))
    enough = small_crs(tmp_path, crs_dir, need, "enough")
    (tmp_path / "o1").mkdir()
    code, err = run_bb(bb, "prove", "-b", circuit, "-w", witness, "-k", vks[7], "-o", str(tmp_path / "o1"), "-c", enough)
    assert code == 0, err
    short = small_crs(tmp_path, crs_dir, need // 2, "short")
    (tmp_path / "o2").mkdir()
    code, err = run_bb(bb, "prove", "-b", circuit, "-w", witness, "-k", vks[7], "-o", str(tmp_path / "o2"), "-c", short)
    if code == 0:
        pytest.skip("bb downloaded the missing CRS points (this machine has internet access)")
    assert bbformat.classify(code, err) == bbformat.CRS, err


def prove_kind(bb, crs_dir, vk, tmp_path, circuit, witness, env=None, out=None):
    out = out or str(tmp_path / "out")
    os.makedirs(out, exist_ok=True)
    code, err = run_bb(bb, "prove", "-b", circuit, "-w", witness, "-k", vk, "-o", out, "-c", crs_dir, env=env)
    assert code != 0 or bbformat.UNSATISFIED in err, err
    return bbformat.classify(code, err)


def test_stderr_signatures(bb, crs_dir, vks, tmp_path):
    """Each fault of the issue, with bb's real message, lands in the right kind."""
    circuit, witness = hashchain(7)
    fixtures = os.path.join(ROOT, "tests", "fixtures")
    not_msgpack = tmp_path / "w.gz"
    subprocess.run(f"echo hello | gzip > {not_msgpack}", shell=True, check=True)
    env = dict(os.environ, HARDWARE_CONCURRENCY="abc")
    cases = {
        "witness of another circuit": (circuit, os.path.join(fixtures, "valid_1.gz"), None, bbformat.WITNESS),
        "not a witness stack": (circuit, str(not_msgpack), None, bbformat.WITNESS),
        "witness file gone": (circuit, str(tmp_path / "gone.gz"), None, bbformat.FILES),
        "HARDWARE_CONCURRENCY=abc": (circuit, witness, env, bbformat.SIGNAL),
    }
    got = {name: prove_kind(bb, crs_dir, vks[7], tmp_path, c, w, e) for name, (c, w, e, _) in cases.items()}
    assert got == {name: case[3] for name, case in cases.items()}
    unsat = prove_kind(bb, crs_dir, reference_vk_path(bb, crs_dir, tmp_path), tmp_path, DEMO,
                       os.path.join(fixtures, "unsatisfied.gz"))
    assert unsat == bbformat.WITNESS
    truncated = tmp_path / "vk"
    truncated.write_bytes(read(vks[7])[:100])
    assert prove_kind(bb, crs_dir, str(truncated), tmp_path, circuit, witness) == bbformat.FILES


def reference_vk_path(bb, crs_dir, tmp_path):
    d = tmp_path / "demo-vk"
    d.mkdir()
    code, err = run_bb(bb, "write_vk", "-b", DEMO, "-o", str(d), "-c", crs_dir)
    assert code == 0, err
    return str(d / "vk")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny tmpfs needs root")
def test_no_space_is_its_own_kind(bb, crs_dir, vks, tmp_path):
    circuit, witness = hashchain(7)
    with tmpfs(tmp_path / "tiny", "16k") as mnt:
        (mnt / "fill").write_bytes(b"\0" * 12 * 1024)
        assert prove_kind(bb, crs_dir, vks[7], tmp_path, circuit, witness, out=str(mnt / "out")) == bbformat.NO_SPACE


def test_classify_prefers_a_signal_and_defaults_to_ours():
    assert bbformat.classify(-6, b"Reason : ACIR witness size (798) does not match max witness index") == bbformat.SIGNAL
    assert bbformat.classify(1, b"something new") == bbformat.SERVER
    assert bbformat.classify(1, b"Failed to write to file: x (No space left on device)") == bbformat.NO_SPACE
    assert bbformat.classify(1, b"HTTP request failed for http://crs.aztec-labs.com/g1_compressed.dat") == bbformat.CRS


def test_a_verifier_target_bb_rejects_is_a_config_fault(bb, crs_dir, tmp_path):
    code, err = run_bb(bb, "write_vk", "-b", DEMO, "-o", str(tmp_path), "-c", crs_dir, "-t", "starknet")
    assert code != 0 and bbformat.classify(code, err) == bbformat.CONFIG, err
    code, err = run_bb(bb, "write_vk", "-b", DEMO, "-o", str(tmp_path), "-c", os.path.join(crs_dir, bbformat.G1_FILE))
    assert code != 0 and bbformat.classify(code, err) == bbformat.CONFIG, err
