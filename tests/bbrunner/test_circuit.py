"""bbrunner.circuit: proving, the checks of bb's output, verification, readiness problems, the self-check."""
import gzip
import os
import shutil
import signal
import sys

import pytest

from bbworker.bbrunner import BB, Circuit, Proof, acir, circuit as circuit_module, messages
from bbworker.errors import (CrsUnavailable, ProofRejected, ProverCrashed, ProverError, ProverFailed,
                             ProverOutOfMemory, ResourceUnavailable, ServerFault)
from support import CIRCUIT, FIXTURES, expected, make_prover, prove_into, tmpfs, write_script


# ---------------------------------------------------------------- the circuit

def test_a_circuit_the_decoder_cannot_read_is_served_unchecked(tmp_path, bb):
    """Circuit keeps serving it (bb and readiness judge it) and says why witnesses are not checked."""
    path = tmp_path / "broken.json"
    path.write_text('{"noir_version": "1.0.0-beta.26", "bytecode": "H4sIAAAA"}')
    circuit = Circuit(BB(bb), str(path), str(tmp_path / "vk"))
    assert circuit.acir is None and "gzipped base64 bytecode" in circuit.acir_error


def test_the_demo_circuit_is_decoded_and_its_vk_must_count_its_public_inputs(bb, tmp_path):
    circuit = make_prover(bb, tmp_path)
    assert circuit.acir.witness_count == 798 and circuit.acir_error is None
    assert circuit.vk.public_inputs == 1
    assert circuit.verifier_target is None
    assert make_prover(bb, tmp_path, verifier_target="noir-rollup").vk.public_inputs is None  # not told


# ---------------------------------------------------------------- proving with the real bb

def test_prove_with_the_real_bb_gives_a_proof_bb_verifies(bb, crs_dir, tmp_path, verify):
    prover = make_prover(bb, tmp_path, crs_dir)
    out = tmp_path / "out"
    out.mkdir()
    proof = prover.prove(os.path.join(FIXTURES, "valid_1.gz"), str(out))
    assert proof.public_inputs == expected()["valid_1.gz"]["public_inputs"]
    assert verify(proof.proof, proof.public_inputs)


@pytest.mark.parametrize("name, words", [
    ("unsatisfied.gz", "the witness does not satisfy the circuit's constraints"),
    ("other_circuit.gz", "ACIR witness size"),
])
def test_prove_with_the_real_bb_rejects_bad_witnesses(bb, crs_dir, tmp_path, name, words):
    prover = make_prover(bb, tmp_path, crs_dir)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ProverFailed) as info:
        prover.prove(os.path.join(FIXTURES, name), str(out))
    assert words in info.value.reason
    assert str(tmp_path) not in info.value.reason


def fake_prove_bb(tmp_path, body):
    return write_script(tmp_path / "bb", f"""\
        #!{sys.executable}
        import os, signal, sys
        args = sys.argv[1:]
        if args == ["--version"]:
            print("5.0.0-fake"); sys.exit(0)
        out = args[args.index("-o") + 1]
        if args[0] == "write_vk":
            os.makedirs(out, exist_ok=True)
            head = (12).to_bytes(32, "big") + (9).to_bytes(32, "big") + (5).to_bytes(32, "big")
            open(os.path.join(out, "vk"), "wb").write(head + bytes(3680 - 96))
            open(os.path.join(out, "vk_hash"), "wb").write(bytes(32))
            sys.exit(0)
        {body}
        """)


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL, signal.SIGRTMIN + 6])
def test_bb_killed_by_a_signal_is_crashed(tmp_path, sig):
    """Real-time signals too: signal.Signals(-code) raises ValueError for numbers that are not
    enum members (e.g. 40); the reason then names the number."""
    binary = fake_prove_bb(tmp_path, f"os.kill(os.getpid(), {int(sig)})")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ProverCrashed, match="killed by signal") as info:
        make_prover(binary, tmp_path).prove(str(tmp_path / "w.gz"), str(out))
    assert info.value.returncode == -int(sig)


@pytest.mark.parametrize("body", ["sys.exit(0)", "open(os.path.join(out, 'proof'), 'wb').write(b'p'); "
                                  "open(os.path.join(out, 'public_inputs'), 'wb').write(b'x' * 33)"],
                         ids=["no-output", "bad-public-inputs"])
def test_bb_exiting_0_without_usable_output_is_crashed(tmp_path, body):
    binary = fake_prove_bb(tmp_path, body)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ProverCrashed, match="without usable output"):
        make_prover(binary, tmp_path).prove(str(tmp_path / "w.gz"), str(out))


def test_read_proof_reads_bbs_two_files(tmp_path):
    (tmp_path / "proof").write_bytes(b"P" * 64)
    (tmp_path / "public_inputs").write_bytes((7).to_bytes(32, "big") + (8).to_bytes(32, "big"))
    assert circuit_module.read_proof(str(tmp_path)) == \
        Proof(b"P" * 64, ["0x" + "00" * 31 + "07", "0x" + "00" * 31 + "08"])
    (tmp_path / "public_inputs").unlink()
    with pytest.raises(ProverCrashed, match="^bb exited 0 without usable output: ") as info:
        circuit_module.read_proof(str(tmp_path), returncode=3)
    assert info.value.returncode == 3


# ---------------------------------------------------------------- verify

def test_circuit_verify_tells_rejected_proofs_from_server_faults(bb, crs_dir, tmp_path):
    """bb verify exits 1 for both; only a rejection of the proof is False, the rest is an error of ours (5xx)."""
    circuit = Circuit(BB(bb, crs_dir=crs_dir, timeout=60), CIRCUIT, str(tmp_path / "vk"))
    out = tmp_path / "out"
    out.mkdir()
    circuit.prove(os.path.join(FIXTURES, "valid_1.gz"), str(out))
    proof, inputs = str(out / "proof"), str(out / "public_inputs")
    assert circuit.verify(proof, inputs) is True
    flipped = bytearray((out / "proof").read_bytes())
    flipped[300] ^= 1
    (tmp_path / "flipped").write_bytes(bytes(flipped))
    assert circuit.verify(str(tmp_path / "flipped"), inputs) is False
    (tmp_path / "short").write_bytes(bytes(flipped[:64]))
    assert circuit.verify(str(tmp_path / "short"), inputs) is False
    vk = circuit.vk.ensure()
    with open(vk, "r+b") as f:
        f.truncate(1000)  # a damaged VK cache: ours, not the client's
    with pytest.raises(ServerFault, match="VK size"):
        circuit.verify(proof, inputs)
    os.unlink(vk)
    with pytest.raises(ProverError):
        messages.verify_verdict(*circuit.bb.run("verify", "-k", vk, "-p", proof, "-i", inputs)[::2])
    with pytest.raises(ProverCrashed, match="signal"):
        messages.verify_verdict(-9, b"")
    with pytest.raises(CrsUnavailable, match="HTTP request failed"):  # one table: messages.classify
        messages.verify_verdict(1, b"HTTP request failed for https://crs.aztec-labs.com/g1.dat")


# ---------------------------------------------------------------- verification, output checks, memory (issue 10)

def test_verification_catches_a_proof_bb_prove_exits_0_on(bb, crs_dir, tmp_path):
    """An empty witness (the app rejects it first) makes bb exit 0 with a proof bb verify rejects."""
    empty = tmp_path / "empty.gz"
    empty.write_bytes(gzip.compress(b""))
    prover = make_prover(bb, tmp_path, crs_dir)
    with pytest.raises(ProofRejected, match="proof failed verification") as info:
        prove_into(prover, tmp_path, empty)
    assert info.value.returncode == 0  # bb prove's: it exited 0
    unchecked = make_prover(bb, tmp_path, crs_dir, verify=False)
    assert prove_into(unchecked, tmp_path, empty).public_inputs  # VERIFY_PROOFS=0 lets it through


def test_unsatisfied_witness_stays_422_not_a_verification_failure(bb, crs_dir, tmp_path):
    with pytest.raises(ProverFailed, match="does not satisfy"):
        prove_into(make_prover(bb, tmp_path, crs_dir), tmp_path, os.path.join(FIXTURES, "unsatisfied.gz"))


def test_memory_limit_below_what_bb_needs_is_out_of_memory(bb, crs_dir, tmp_path):
    prover = make_prover(bb, tmp_path, crs_dir)
    prover.vk.ensure()
    limited = Circuit(BB(bb, crs_dir=crs_dir, memory_limit_mb=12), CIRCUIT, str(tmp_path / "vk-cache"))
    with pytest.raises(ProverOutOfMemory, match=r"^bb ran out of memory \(limit 12 MiB\)$"):
        prove_into(limited, tmp_path, os.path.join(FIXTURES, "valid_1.gz"))
    roomy = Circuit(BB(bb, crs_dir=crs_dir, memory_limit_mb=256), CIRCUIT, str(tmp_path / "vk-cache"))
    assert prove_into(roomy, tmp_path, os.path.join(FIXTURES, "valid_1.gz")).public_inputs


@pytest.mark.parametrize("mode, error, words", [
    ("unverified", ProofRejected, "proof failed verification: bb verify rejects the proof bb prove wrote"),
    ("shortproof", ProverCrashed, "bb wrote a proof of 4096 bytes; this VK's proofs are 14656"),
    ("oom", ProverOutOfMemory, "bb ran out of memory (limit 64 MiB)"),
])
def test_fake_bb_faults_after_prove(fake_bb, tmp_path, monkeypatch, mode, error, words):
    monkeypatch.setenv("FAKE_BB_MODE", mode)
    prover = Circuit(BB(fake_bb, memory_limit_mb=64), CIRCUIT, str(tmp_path / "vk-cache"))
    with pytest.raises(error) as info:
        prove_into(prover, tmp_path, os.path.join(FIXTURES, "valid_1.gz"))
    assert str(info.value) == words


def test_public_input_count_is_checked_against_the_vk(fake_bb, tmp_path):
    prover = Circuit(BB(fake_bb), CIRCUIT, str(tmp_path / "vk-cache"))
    prover.vk.ensure()
    proof = Proof(b"P" * 14656, ["0x" + "00" * 32] * 2)
    with pytest.raises(ProverCrashed, match="bb wrote 2 public inputs; the VK says 1"):
        prover.check_proof(proof)
    prover.check_proof(Proof(b"P" * 14656, ["0x" + "00" * 32]))  # the right shape passes


@pytest.mark.parametrize("size", [0, 14656 - 32, 14656 + 32, 14656 + 1])
def test_a_proof_of_another_length_than_the_vks_is_crashed(fake_bb, tmp_path, size):
    prover = Circuit(BB(fake_bb), CIRCUIT, str(tmp_path / "vk-cache"))
    with pytest.raises(ProverCrashed, match=f"^bb wrote a proof of {size} bytes; this VK's proofs are 14656$"):
        prover.check_proof(Proof(b"P" * size, ["0x" + "00" * 32]))


# ---------------------------------------------------------------- a full disk

def test_a_full_disk_while_bb_writes_is_no_space_never_a_proof(bb, crs_dir, tmp_path, small_tmpfs):
    prover = make_prover(bb, tmp_path, crs_dir)
    prover.vk.ensure()
    (small_tmpfs / "filler").write_bytes(b"x" * 4096)  # what other requests' witnesses take
    out = small_tmpfs / "out"
    out.mkdir()
    with pytest.raises(ResourceUnavailable, match="No space left on device"):  # bb 5 checks this write
        prover.prove(os.path.join(FIXTURES, "valid_1.gz"), str(out))


def test_a_short_proof_on_a_full_disk_is_no_space(fake_bb, tmp_path, small_tmpfs, monkeypatch):
    """A bb that does not check its writes exits 0 with a short proof: the size check and free space tell."""
    monkeypatch.setenv("FAKE_BB_MODE", "shortproof")
    (small_tmpfs / "filler").write_bytes(b"x" * 8192)
    out = small_tmpfs / "out"
    out.mkdir()
    prover = Circuit(BB(fake_bb), CIRCUIT, str(tmp_path / "vk-cache"))
    with pytest.raises(ResourceUnavailable, match="proof of 4096 bytes.*file system is full"):
        prover.prove(os.path.join(FIXTURES, "valid_1.gz"), str(out))


@pytest.mark.parametrize("mode", ["silent", "unknown", "nooutput", "segv"])
def test_any_failure_of_bb_on_a_full_disk_is_no_space(fake_bb, tmp_path, monkeypatch, mode):
    """bb 5 on a disk that fills as it runs may exit 1 with nothing on stderr (its stderr file is
    on that disk too): with the disk full, every failure not the witness's is 503's kind, not 500's."""
    monkeypatch.setenv("FAKE_BB_MODE", mode)
    prover = Circuit(BB(fake_bb), CIRCUIT, str(tmp_path / "vk-cache"))
    with tmpfs(tmp_path / "disk", "2m") as disk:
        out = disk / "out"
        out.mkdir()
        with pytest.raises(ProverError) as roomy:
            prover.prove(os.path.join(FIXTURES, "valid_1.gz"), str(out))
        assert not isinstance(roomy.value, ResourceUnavailable)  # ours (500) while there is room
        (disk / "filler").write_bytes(b"x" * (2 << 20))
        with pytest.raises(ResourceUnavailable, match="file system is full"):
            prover.prove(os.path.join(FIXTURES, "valid_1.gz"), str(out))


def test_a_witness_bb_rejects_stays_its_fault_on_a_full_disk(fake_bb, tmp_path, small_tmpfs, monkeypatch):
    monkeypatch.setenv("FAKE_BB_MODE", "fail")
    prover = Circuit(BB(fake_bb), CIRCUIT, str(tmp_path / "vk-cache"))
    out = small_tmpfs / "out"
    out.mkdir()
    (small_tmpfs / "filler").write_bytes(b"x" * 12288)  # bb's message still fits
    with pytest.raises(ProverFailed):
        prover.prove(os.path.join(FIXTURES, "valid_1.gz"), str(out))


# ---------------------------------------------------------------- problems()

def small_crs(tmp_path, crs_dir, points):
    """A CRS dir holding the first `points` G1 points of `crs_dir`."""
    target = tmp_path / f"crs-{points}"
    target.mkdir()
    with open(os.path.join(crs_dir, "bn254_g1.dat"), "rb") as f:
        (target / "bn254_g1.dat").write_bytes(f.read(points * 64))
    return str(target)


def test_problems_say_starting_until_the_vk_is_computed_then_nothing(bb, crs_dir, tmp_path):
    prover = make_prover(bb, tmp_path, crs_dir)
    assert prover.problems() == ["starting: the verification key is being computed"]
    prover.vk.ensure()
    assert prover.problems() == []


def test_problems_name_a_crs_too_small_or_missing(bb, crs_dir, tmp_path):
    make_prover(bb, tmp_path, crs_dir).vk.ensure()  # the demo circuit: 2^12 rows
    small = small_crs(tmp_path, crs_dir, 1000)
    assert make_prover(bb, tmp_path, small).problems() == [
        f"CRS too small: {small} holds 1000 G1 points; this circuit (2^12 rows) needs 4096"]
    assert make_prover(bb, tmp_path, small_crs(tmp_path, crs_dir, 4096)).problems() == []
    missing = str(tmp_path / "no-crs")
    assert make_prover(bb, tmp_path, missing).problems() == [f"CRS unavailable: {missing}: No such file or directory"]


def test_problems_say_why_the_vk_could_not_be_computed_and_nothing_while_bb_is_unusable(tmp_path):
    binary = write_script(tmp_path / "bb", "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 5.0.0-fake; fi\n")
    prover = make_prover(binary, tmp_path)
    with pytest.raises(ProverCrashed):
        prover.vk.ensure()
    assert prover.problems() == [
        "the verification key could not be computed: bb write_vk exited 0 without writing the vk"]
    assert make_prover(str(tmp_path / "missing-bb"), tmp_path).problems() == []  # bb's own status says it


# ---------------------------------------------------------------- self_check

def test_self_check_with_the_real_bb_passes_on_the_demo_circuit(bb, crs_dir, tmp_path, count_runs):
    """It proves the server's own zero witness: bb runs to the end, whether or not 0s satisfy the circuit."""
    prover = make_prover(bb, tmp_path, crs_dir)
    out = tmp_path / "out"
    out.mkdir()
    assert prover.self_check(str(out)) is None
    assert count_runs == ["--version", "write_vk", "write_vk", "prove"]  # the VK, the VK again, the own witness
    assert (out / "self-check.witness.gz").read_bytes() == acir.zero_witness(prover.acir)


def test_self_check_finds_a_crs_changed_under_the_server(bb, crs_dir, tmp_path):
    """A CRS whose points changed after the VK was computed (two swapped here; a development CRS, a
    corrupted copy) makes proofs of the right shape that never verify: the VK computed again differs."""
    crs = tmp_path / "crs"
    shutil.copytree(crs_dir, crs)
    prover = make_prover(bb, tmp_path, str(crs))
    prover.vk.ensure()
    g1 = bytearray((crs / "bn254_g1.dat").read_bytes())
    g1[64:128], g1[128:192] = g1[128:192], g1[64:128]  # points 1 and 2
    (crs / "bn254_g1.dat").write_bytes(bytes(g1))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ServerFault, match="another verification key"):
        prover.self_check(str(out))


def test_self_check_passes_when_bb_rejects_the_zero_witness(fake_bb, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_BB_MODE", "fail")  # bb's message for a witness it cannot read: the witness's fault
    assert make_prover(fake_bb, tmp_path).self_check(str(tmp_path)) is None


@pytest.mark.parametrize("mode, error", [("unknown", ServerFault), ("segv", ProverCrashed), ("crs", CrsUnavailable),
                                         ("shortproof", ProverCrashed), ("oom", ProverOutOfMemory),
                                         ("nospace", ResourceUnavailable)])
def test_self_check_raises_a_failure_of_ours(fake_bb, tmp_path, monkeypatch, mode, error):
    monkeypatch.setenv("FAKE_BB_MODE", mode)
    with pytest.raises(error):
        make_prover(fake_bb, tmp_path).self_check(str(tmp_path))


def test_self_check_of_a_circuit_that_cannot_be_decoded_checks_the_vk_only(fake_bb, tmp_path, monkeypatch,
                                                                          count_runs):
    path = tmp_path / "broken.json"
    path.write_text('{"noir_version": "1.0.0-beta.26", "bytecode": "H4sIAAAA"}')
    prover = Circuit(BB(fake_bb), str(path), str(tmp_path / "vk-cache"))
    monkeypatch.setenv("FAKE_BB_MODE", "segv")  # a prove would fail
    assert prover.self_check(str(tmp_path)) is None
    assert "prove" not in count_runs and "write_vk" in count_runs and prover.vk.cached()

