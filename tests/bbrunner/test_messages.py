"""bbrunner.messages: bb 5's stderr -> the error class (one table), pinned against the real bb; the readable reason."""
import os
import signal
import subprocess

import pytest

from bbworker import files
from bbworker.bbrunner import messages
from bbworker.errors import (BBExited, CrsUnavailable, ProverCrashed, ProverFailed, ProverOutOfMemory,
                             ResourceUnavailable, ServerFault)
from support import CIRCUIT, FIXTURES, tmpfs

NOISY_STDERR = (b"Scheme is: ultra_honk, num threads: 8 (mem: 5.1 MiB)\n"
                b"CircuitProve: Proving key computed in 3 ms (mem: 6 MiB)\n"
                b"Assertion failed: (witness.size() == 4)\n"
                b"  Reason   : bad witness in /tmp/bb-proofs/abc.out/x (mem: 7.25 MiB)\n"
                b"Proof saved to \"/tmp/bb-proofs/abc.out/proof\"\n")


def run_bb(bb, *args, env=None):
    proc = subprocess.run([bb, *args], capture_output=True, timeout=120, env=env)
    return proc.returncode, proc.stderr


# ---------------------------------------------------------------- failure_reason

def test_failure_reason_prefers_the_reason_line_without_mem_or_temp_paths():
    reason = messages.failure_reason(NOISY_STDERR, hide=("/tmp/bb-proofs/abc.out",))
    assert reason == "bad witness in abc.out/x"


def test_failure_reason_hides_the_longest_path_first():
    stderr = b"Reason : cannot read /w/req.witness.gz or /w/req.out/vk\n"
    assert messages.failure_reason(stderr, hide=("/w", "/w/req.witness.gz", "/w/req.out", "")) == \
        "cannot read req.witness.gz or req.out/vk"


def test_failure_reason_falls_back_to_the_assertion_line():
    stderr = b"Scheme is: ultra_honk\nAssertion failed: (a == b) (mem: 1 MiB)\nsomething after\n"
    assert messages.failure_reason(stderr) == "Assertion failed: (a == b)"


def test_failure_reason_falls_back_to_the_last_line_that_is_not_noise():
    stderr = (b"Scheme is: ultra_honk\nfirst problem\nACIR witness size 7 does not match 12 (mem: 9 MiB)\n"
              b"\n   \nProof saved to \"/x/proof\"\nRun with --help for more information\n")
    assert messages.failure_reason(stderr) == "ACIR witness size 7 does not match 12"


@pytest.mark.parametrize("stderr", [b"", b"\n\n  \n", b"Scheme is: ultra_honk (mem: 1 MiB)\nVK saved to x\n"])
def test_failure_reason_without_useful_output(stderr):
    assert messages.failure_reason(stderr) == "no output"


def test_failure_reason_is_capped_at_300_characters():
    assert messages.failure_reason(b"Reason : " + b"x" * 1000) == "x" * 300
    assert len(messages.failure_reason(b"y" * 5000 + b"\n")) == 300


def test_failure_reason_survives_bytes_that_are_not_utf8():
    reason = messages.failure_reason(b"\xff\xfe broken \x80\n")
    assert "broken" in reason and isinstance(reason, str)


# ---------------------------------------------------------------- classify against the real bb

def prove_error(bb, crs_dir, vk, tmp_path, circuit, witness, env=None, out=None):
    """The error class messages.classify gives a `bb prove` that failed (asserted)."""
    out = out or str(tmp_path / "out")
    os.makedirs(out, exist_ok=True)
    code, err = run_bb(bb, "prove", "-b", circuit, "-w", witness, "-k", vk, "-o", out, "-c", crs_dir, env=env)
    assert code != 0 or messages.UNSATISFIED in err, err
    return messages.classify(code, err)


def test_stderr_signatures(bb, crs_dir, hashchains, reference_vk, tmp_path):
    """Each fault of the issue, with bb's real message, lands in the right error class."""
    circuit, witness, vk = hashchains[7]
    not_msgpack = tmp_path / "w.gz"
    subprocess.run(f"echo hello | gzip > {not_msgpack}", shell=True, check=True)
    env = dict(os.environ, HARDWARE_CONCURRENCY="abc")
    cases = {
        "witness of another circuit": (circuit, os.path.join(FIXTURES, "valid_1.gz"), None, ProverFailed),
        "not a witness stack": (circuit, str(not_msgpack), None, ProverFailed),
        "witness file gone": (circuit, str(tmp_path / "gone.gz"), None, ResourceUnavailable),
        "HARDWARE_CONCURRENCY=abc": (circuit, witness, env, ProverCrashed),
    }
    got = {name: prove_error(bb, crs_dir, vk, tmp_path, c, w, e) for name, (c, w, e, _) in cases.items()}
    assert got == {name: case[3] for name, case in cases.items()}
    unsat = prove_error(bb, crs_dir, reference_vk, tmp_path, CIRCUIT, os.path.join(FIXTURES, "unsatisfied.gz"))
    assert unsat is ProverFailed
    truncated = tmp_path / "vk"
    with open(vk, "rb") as f:
        truncated.write_bytes(f.read()[:100])
    assert prove_error(bb, crs_dir, str(truncated), tmp_path, circuit, witness) is ResourceUnavailable


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny tmpfs needs root")
def test_no_space_is_a_passing_resource_fault_that_says_so(bb, crs_dir, hashchains, tmp_path):
    circuit, witness, vk = hashchains[7]
    with tmpfs(tmp_path / "tiny", "16k") as mnt:
        (mnt / "fill").write_bytes(b"\0" * 12 * 1024)
        out = str(mnt / "out")
        assert prove_error(bb, crs_dir, vk, tmp_path, circuit, witness, out=out) is ResourceUnavailable
        code, err = run_bb(bb, "prove", "-b", circuit, "-w", witness, "-k", vk, "-o", out, "-c", crs_dir)
    assert "No space left on device" in messages.bb_error(code, err).reason  # the row of ENOSPC, not a missing file


def test_classify_prefers_a_signal_and_defaults_to_ours():
    assert messages.classify(-6, b"Reason : ACIR witness size (798) does not match max witness index") is ProverCrashed
    assert messages.classify(1, b"something new") is ServerFault
    assert messages.classify(1, b"Failed to write to file: x (No space left on device)") is ResourceUnavailable
    crs = b"HTTP request failed for http://crs.aztec-labs.com/g1_compressed.dat"
    assert messages.classify(1, crs) is CrsUnavailable


def test_running_out_of_memory_outranks_a_signal():
    """bb aborts (SIGABRT) when an allocation fails: that is out of memory, not a crash."""
    assert messages.classify(-6, b"terminate called: std::bad_alloc") is ProverOutOfMemory
    assert messages.classify(1, b"thread constructor failed: Resource temporarily unavailable") is ProverOutOfMemory


def test_a_verifier_target_bb_rejects_is_a_config_fault(bb, crs_dir, tmp_path):
    """Ours: a ServerFault (was bbformat's CONFIG kind), never a resource that may come back."""
    code, err = run_bb(bb, "write_vk", "-b", CIRCUIT, "-o", str(tmp_path), "-c", crs_dir, "-t", "starknet")
    assert code != 0 and messages.classify(code, err) is ServerFault, err
    code, err = run_bb(bb, "write_vk", "-b", CIRCUIT, "-o", str(tmp_path), "-c", os.path.join(crs_dir, "bn254_g1.dat"))
    assert code != 0 and messages.classify(code, err) is ServerFault, err


# ---------------------------------------------------------------- bb_error, raise_if_out_of_memory

@pytest.mark.parametrize("code, reason", [
    (-int(signal.SIGSEGV), "bb was killed by signal SIGSEGV"),
    (-int(signal.SIGRTMIN + 6), f"bb was killed by signal {int(signal.SIGRTMIN + 6)}"),
], ids=["named", "real-time"])
def test_bb_error_of_a_signal_names_it(code, reason):
    error = messages.bb_error(code, b"Reason : whatever it printed")
    assert type(error) is ProverCrashed and (error.returncode, error.reason) == (code, reason)


def test_bb_error_of_an_unsatisfied_witness_says_so_and_is_the_witnesss_fault():
    error = messages.bb_error(0, b"Scheme is: ultra_honk\n" + messages.UNSATISFIED + b"\n")
    assert type(error) is ProverFailed and error.reason == "the witness does not satisfy the circuit's constraints"
    assert error.detail == "bb prove failed: the witness does not satisfy the circuit's constraints"


def test_bb_error_of_a_witness_message_without_a_witness_is_ours():
    """write_vk and verify have no client's witness: a "witness" message there is a fault of ours."""
    stderr = b"Reason : deserialize_msgpack_compact: expected ARRAY at /w/x.gz\n"
    assert type(messages.bb_error(1, stderr, hide=("/w/x.gz",))) is ProverFailed
    error = messages.bb_error(1, stderr, hide=("/w/x.gz",), witness=False, prefix="bb write_vk failed: ")
    assert type(error) is ServerFault
    assert error.reason == "bb write_vk failed: deserialize_msgpack_compact: expected ARRAY at x.gz"


def test_bb_error_of_a_crs_download_and_of_running_out_of_memory():
    error = messages.bb_error(1, b"HTTP request failed for http://crs.aztec-labs.com/g1_compressed.dat\n")
    assert type(error) is CrsUnavailable
    assert error.reason == ("the CRS lacks points bb needs (it tried to download them): "
                            "HTTP request failed for http://crs.aztec-labs.com/g1_compressed.dat")
    oom = messages.bb_error(-6, b"std::bad_alloc\n")
    assert type(oom) is ProverOutOfMemory
    assert (oom.returncode, oom.limit_mb, oom.reason) == (-6, None, "bb ran out of memory")


def test_raise_if_out_of_memory_only_for_a_failed_run_that_says_so():
    with pytest.raises(ProverOutOfMemory, match=r"^bb ran out of memory \(limit 64 MiB\)$") as info:
        messages.raise_if_out_of_memory(-6, b"std::bad_alloc", 64)
    assert (info.value.returncode, info.value.limit_mb) == (-6, 64)
    messages.raise_if_out_of_memory(0, b"std::bad_alloc", 64)  # bb succeeded after all
    messages.raise_if_out_of_memory(-6, b"Reason : something else", 64)  # a crash, not memory


# ---------------------------------------------------------------- verify_verdict

def test_verify_verdict():
    assert messages.verify_verdict(0, b"") is True
    for line in messages.VERIFY_REJECTIONS:
        assert messages.verify_verdict(1, b"Scheme is: ultra_honk\n" + line + b"\n") is False, line
    with pytest.raises(ServerFault, match="^bb verify failed: VK size 3 does not match"):
        # a rejection, but a fault of ours shows too
        messages.verify_verdict(1, b"Proof verification failed\nVK size 3 does not match\n")
    with pytest.raises(ServerFault, match="^bb verify failed: Proof verification failed$"):
        messages.verify_verdict(2, b"Proof verification failed\n")  # only exit 1 is a verdict
    with pytest.raises(ServerFault, match="^bb verify failed: no output$"):
        messages.verify_verdict(1, b"")


# ---------------------------------------------------------------- on_full_disk

@pytest.fixture
def full_disk(monkeypatch):
    """Every file system looks full to files.low_on_space."""
    monkeypatch.setattr(files, "LOW_SPACE_BYTES", 1 << 62)


@pytest.mark.parametrize("error", [ServerFault(1, "x"), ProverCrashed(-11, "bb was killed by signal SIGSEGV")],
                         ids=["fault", "crash"])
def test_on_full_disk_a_failure_of_ours_is_a_resource_fault(tmp_path, full_disk, error):
    found = messages.on_full_disk(error, str(tmp_path))
    assert type(found) is ResourceUnavailable
    assert (found.returncode, found.reason) == (error.returncode, f"{error.reason}, and its file system is full")


@pytest.mark.parametrize("error", [ProverFailed(1, "bad witness"), ProverOutOfMemory(-6, 64),
                                   ResourceUnavailable(1, "No space left on device")],
                         ids=["witness", "memory", "resource"])
def test_on_full_disk_keeps_the_witnesss_fault_and_out_of_memory(tmp_path, full_disk, error):
    assert messages.on_full_disk(error, str(tmp_path)) is error


def test_on_full_disk_with_room_or_a_path_gone_keeps_the_error(tmp_path, monkeypatch):
    error = ServerFault(1, "x")
    assert messages.on_full_disk(error, str(tmp_path)) is error
    monkeypatch.setattr(files, "LOW_SPACE_BYTES", 1 << 62)
    assert messages.on_full_disk(error, str(tmp_path / "gone")) is error
    assert isinstance(messages.on_full_disk(error, str(tmp_path)), BBExited)
