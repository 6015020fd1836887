"""bbrunner.vk: one circuit's verification key, computed once by `bb write_vk`, checked, and cached on disk."""
import os
import re
import shutil
import subprocess
import sys

import gevent
import pytest

from bbworker.bbrunner import BB, Circuit
from bbworker.bbrunner.vk import CIRCUIT_FILE
from bbworker.errors import ProverCrashed, ProverUnavailable, ResourceUnavailable, ServerFault
from support import CIRCUIT, FIXTURES, ROOT, expected, make_prover, prove_into, write_script


def test_ensure_writes_the_real_vk_once(bb, crs_dir, reference_vk, tmp_path, count_runs):
    prover = make_prover(bb, tmp_path, crs_dir)
    assert not prover.vk.cached()
    vk = prover.vk.ensure()
    assert prover.vk.cached()
    assert vk.startswith(str(tmp_path / "vk-cache"))
    with open(vk, "rb") as f, open(reference_vk, "rb") as g:
        assert f.read() == g.read()
    first = os.stat(vk)
    assert prover.vk.ensure() == vk
    assert make_prover(bb, tmp_path, crs_dir).vk.ensure() == vk  # a new Circuit finds the cache
    assert count_runs.count("write_vk") == 1
    assert os.stat(vk).st_mtime_ns == first.st_mtime_ns and os.stat(vk).st_ino == first.st_ino
    assert sorted(os.listdir(tmp_path / "vk-cache")) == [".lock", os.path.basename(os.path.dirname(vk))]


def test_read_gives_the_vk_and_its_hash_as_bb_wrote_them(bb, crs_dir, reference_vk, tmp_path):
    prover = make_prover(bb, tmp_path, crs_dir)
    vk, vk_hash = prover.vk.read()
    with open(reference_vk, "rb") as f:
        assert vk == f.read()
    with open(os.path.join(os.path.dirname(prover.vk.ensure()), "vk_hash"), "rb") as f:
        assert vk_hash == f.read() and len(vk_hash) == 32


def test_ensure_depends_on_the_verifier_target(bb, crs_dir, tmp_path):
    default = make_prover(bb, tmp_path, crs_dir).vk.directory()
    evm = make_prover(bb, tmp_path, crs_dir, verifier_target="evm").vk.directory()
    assert default != evm


def test_key_names_the_directory_or_the_circuit_when_bb_cannot_tell_its_version(bb, tmp_path):
    prover = make_prover(bb, tmp_path)
    assert prover.vk.key() == os.path.basename(prover.vk.directory())
    missing = make_prover(str(tmp_path / "missing-bb"), tmp_path)
    with pytest.raises(ProverUnavailable):
        missing.vk.directory()
    assert missing.vk.key() == missing.vk.sha256[:32] != prover.vk.key()


def test_concurrent_ensure_in_greenlets_runs_bb_once(bb, crs_dir, tmp_path, count_runs):
    prover = make_prover(bb, tmp_path, crs_dir)
    greenlets = [gevent.spawn(prover.vk.ensure) for _ in range(6)]
    gevent.joinall(greenlets, timeout=60, raise_error=True)
    assert len({g.value for g in greenlets}) == 1
    assert os.path.getsize(greenlets[0].value) > 0
    assert count_runs.count("write_vk") == 1


VK_RACER = """\
import os, sys, time
from bbworker.bbrunner import BB, Circuit
from bbworker.bbrunner import bb as bb_module
binary, circuit, cache, crs, log, go = sys.argv[1:]
real = bb_module.run
def run(argv, timeout, *args, **kwargs):
    if argv[1] == "write_vk":
        with open(log, "a") as f:
            f.write(f"{{os.getpid()}}\\n")
        time.sleep(0.3)  # widen the window in which the others race
    return real(argv, timeout, *args, **kwargs)
bb_module.run = run
prover = Circuit(BB(binary, crs_dir=crs or None), circuit, cache)
while not os.path.exists(go):
    time.sleep(0.005)
print(prover.vk.ensure())
"""


def test_concurrent_ensure_in_processes_runs_bb_once(bb, crs_dir, tmp_path):
    script = tmp_path / "racer.py"
    script.write_text(VK_RACER.format(root=ROOT))
    log, go = tmp_path / "write_vk.log", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, str(script), bb, CIRCUIT, str(tmp_path / "vk-cache"),
                               crs_dir or "", str(log), str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    go.touch()
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], results
    assert len({out.strip() for out, _ in results}) == 1
    assert os.path.getsize(results[0][0].strip()) > 0
    assert len(log.read_text().splitlines()) == 1


def test_failed_write_vk_is_a_server_fault_and_leaves_no_temp_dir(tmp_path):
    binary = write_script(tmp_path / "bb", """\
        #!/bin/sh
        if [ "$1" = "--version" ]; then echo 5.0.0-fake; exit 0; fi
        echo "Reason : out of memory (mem: 9 MiB)" >&2
        exit 2
        """)
    prover = make_prover(binary, tmp_path)
    with pytest.raises(ServerFault, match="bb write_vk failed: out of memory$"):
        prover.vk.ensure()
    assert os.listdir(tmp_path / "vk-cache") == [".lock"]
    assert prover.vk.error == "the verification key could not be computed: bb write_vk failed: out of memory"
    assert not prover.vk.cached()


def test_error_says_why_until_a_computation_succeeds(tmp_path, fake_bb):
    prover = make_prover(fake_bb, tmp_path)
    (tmp_path / "vk-cache").mkdir()
    (tmp_path / "vk-cache").chmod(0o777)  # open to other users: refused
    with pytest.raises(ProverUnavailable, match="set VK_CACHE_DIR"):
        prover.vk.ensure()
    assert "cannot write the verification key cache" in prover.vk.error
    (tmp_path / "vk-cache").chmod(0o700)
    assert prover.vk.ensure() and prover.vk.error is None


def test_unwritable_vk_cache_is_a_clear_prover_unavailable(bb, tmp_path):
    cache = tmp_path / "vk-cache"
    cache.write_text("a file, so nothing can be created under it")
    prover = Circuit(BB(bb), CIRCUIT, str(cache))
    with pytest.raises(ProverUnavailable, match="set VK_CACHE_DIR"):
        prover.vk.ensure()


def test_circuit_file_replaced_on_disk_cannot_pair_with_the_served_vk(bb, crs_dir, reference_vk, tmp_path, verify):
    served = tmp_path / "circuit.json"
    shutil.copyfile(CIRCUIT, served)
    prover = Circuit(BB(bb, crs_dir=crs_dir), str(served), str(tmp_path / "vk-cache"))
    vk = prover.vk.ensure()
    shutil.copyfile(os.path.join(FIXTURES, "other_circuit.json"), served)  # replaced while serving
    proof = prove_into(prover, tmp_path, os.path.join(FIXTURES, "valid_1.gz"))
    assert proof.public_inputs == expected()["valid_1.gz"]["public_inputs"]
    assert verify(proof.proof, proof.public_inputs, vk=vk)
    with open(os.path.join(os.path.dirname(vk), CIRCUIT_FILE), "rb") as f, open(CIRCUIT, "rb") as g:
        assert f.read() == g.read()  # bb proves the copy made at start


@pytest.mark.parametrize("vk, vk_hash, words", [
    ((12).to_bytes(32, "big") + (3).to_bytes(32, "big") + bytes(3680 - 64), bytes(32), "counts 3 public inputs"),
    ((12).to_bytes(32, "big") + (9).to_bytes(32, "big") + bytes(100), bytes(32), "not a whole number of fields"),
    ((40).to_bytes(32, "big") + (9).to_bytes(32, "big") + bytes(3680 - 64), bytes(32), "2^40 rows"),
    ((12).to_bytes(32, "big") + (9).to_bytes(32, "big") + bytes(3680 - 64), bytes(31), "vk_hash is 31 bytes"),
], ids=["public-inputs", "length", "size", "hash"])
def test_a_vk_that_does_not_fit_the_circuit_is_never_cached(tmp_path, vk, vk_hash, words):
    binary = write_script(tmp_path / "bb", f"""\
        #!{sys.executable}
        import os, sys
        args = sys.argv[1:]
        if args == ["--version"]:
            print("5.0.0-fake"); sys.exit(0)
        out = args[args.index("-o") + 1]
        open(os.path.join(out, "vk"), "wb").write({vk!r})
        open(os.path.join(out, "vk_hash"), "wb").write({vk_hash!r})
        """)
    prover = make_prover(binary, tmp_path)
    with pytest.raises(ProverCrashed, match=f"unusable verification key: .*{re.escape(words)}"):
        prover.vk.ensure()
    assert os.listdir(tmp_path / "vk-cache") == [".lock"]


def test_a_write_vk_that_writes_nothing_is_crashed(tmp_path):
    binary = write_script(tmp_path / "bb", "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 5.0.0-fake; fi\n")
    with pytest.raises(ProverCrashed, match="^bb write_vk exited 0 without writing the vk$"):
        make_prover(binary, tmp_path).vk.ensure()
    assert os.listdir(tmp_path / "vk-cache") == [".lock"]


def test_a_verification_key_cache_on_a_full_disk_is_no_space(fake_bb, small_tmpfs):
    (small_tmpfs / "vk-cache").mkdir()
    (small_tmpfs / "filler").write_bytes(b"x" * 16384)
    prover = Circuit(BB(fake_bb), CIRCUIT, str(small_tmpfs / "vk-cache"))
    with pytest.raises(ResourceUnavailable, match="No space left on device|file system is full"):
        prover.vk.ensure()
    assert sorted(os.listdir(small_tmpfs / "vk-cache")) == [".lock"]
