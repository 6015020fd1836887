"""bbrunner without HTTP: bb's output, ELF headers, process groups, the version cache, the VK, slots."""
import functools
import gzip
import os
import platform
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time

import gevent
import pytest

import bbrunner
from conftest import CIRCUIT, FIXTURES, expected, write_script
from support import ROOT, alive, tmpfs

NOISY_STDERR = (b"Scheme is: ultra_honk, num threads: 8 (mem: 5.1 MiB)\n"
                b"CircuitProve: Proving key computed in 3 ms (mem: 6 MiB)\n"
                b"Assertion failed: (witness.size() == 4)\n"
                b"  Reason   : bad witness in /tmp/bb-proofs/abc.out/x (mem: 7.25 MiB)\n"
                b"Proof saved to \"/tmp/bb-proofs/abc.out/proof\"\n")


# ---------------------------------------------------------------- failure_reason

def test_failure_reason_prefers_the_reason_line_without_mem_or_temp_paths():
    reason = bbrunner.failure_reason(NOISY_STDERR, hide=("/tmp/bb-proofs/abc.out",))
    assert reason == "bad witness in abc.out/x"


def test_failure_reason_hides_the_longest_path_first():
    stderr = b"Reason : cannot read /w/req.witness.gz or /w/req.out/vk\n"
    assert bbrunner.failure_reason(stderr, hide=("/w", "/w/req.witness.gz", "/w/req.out", "")) == \
        "cannot read req.witness.gz or req.out/vk"


def test_failure_reason_falls_back_to_the_assertion_line():
    stderr = b"Scheme is: ultra_honk\nAssertion failed: (a == b) (mem: 1 MiB)\nsomething after\n"
    assert bbrunner.failure_reason(stderr) == "Assertion failed: (a == b)"


def test_failure_reason_falls_back_to_the_last_line_that_is_not_noise():
    stderr = (b"Scheme is: ultra_honk\nfirst problem\nACIR witness size 7 does not match 12 (mem: 9 MiB)\n"
              b"\n   \nProof saved to \"/x/proof\"\nRun with --help for more information\n")
    assert bbrunner.failure_reason(stderr) == "ACIR witness size 7 does not match 12"


@pytest.mark.parametrize("stderr", [b"", b"\n\n  \n", b"Scheme is: ultra_honk (mem: 1 MiB)\nVK saved to x\n"])
def test_failure_reason_without_useful_output(stderr):
    assert bbrunner.failure_reason(stderr) == "no output"


def test_failure_reason_is_capped_at_300_characters():
    assert bbrunner.failure_reason(b"Reason : " + b"x" * 1000) == "x" * 300
    assert len(bbrunner.failure_reason(b"y" * 5000 + b"\n")) == 300


def test_failure_reason_survives_bytes_that_are_not_utf8():
    reason = bbrunner.failure_reason(b"\xff\xfe broken \x80\n")
    assert "broken" in reason and isinstance(reason, str)


# ---------------------------------------------------------------- parse_public_inputs

def test_parse_public_inputs_gives_0x_and_64_hex_digits_per_field():
    data = bytes(31) + b"\x07" + bytes(range(32))
    assert bbrunner.parse_public_inputs(data) == [
        "0x" + "00" * 31 + "07", "0x" + bytes(range(32)).hex()]
    assert bbrunner.parse_public_inputs(b"\xAB" * 32) == ["0x" + "ab" * 32]
    assert bbrunner.parse_public_inputs(b"") == []


@pytest.mark.parametrize("size", [1, 31, 33, 65])
def test_parse_public_inputs_rejects_partial_fields(size):
    with pytest.raises(ValueError, match=str(size)):
        bbrunner.parse_public_inputs(bytes(size))


# ---------------------------------------------------------------- describe_elf

def elf64(machine, interpreter=None, e_type=2, osabi=0):
    """A minimal little-endian ELF64 header, with a PT_INTERP program header if `interpreter`."""
    ident = b"\x7fELF" + bytes([2, 1, 1, osabi]) + bytes(8)
    phnum = 1 if interpreter else 0
    data = ident + struct.pack("<HHIQQQIHHHHHH", e_type, machine, 1, 0x400000, 64 if phnum else 0,
                               0, 0, 64, 56, phnum, 64, 0, 0)
    if interpreter:
        blob = interpreter.encode() + b"\0"
        data += struct.pack("<IIQQQQQQ", 3, 4, 64 + 56, 0, 0, len(blob), len(blob), 1) + blob
    return data


def elf32_msb(machine, interpreter):
    """A minimal big-endian ELF32 header with a PT_INTERP program header."""
    ident = b"\x7fELF" + bytes([1, 2, 1, 0]) + bytes(8)
    data = ident + struct.pack(">HHIIIIIHHHHHH", 2, machine, 1, 0x8000, 52, 0, 0, 52, 32, 1, 40, 0, 0)
    blob = interpreter.encode() + b"\0"
    return data + struct.pack(">IIIIIIII", 3, 52 + 32, 0, 0, len(blob), len(blob), 4, 1) + blob


def test_describe_elf_of_the_real_bb_matches_file(bb):
    ours = bbrunner.describe_elf(bb)
    assert ours.startswith(f"{bb}: ELF 64-bit LSB executable, ")
    if shutil.which("file"):
        theirs = subprocess.run(["file", "-b", bb], capture_output=True, text=True, check=True).stdout
        assert theirs.startswith(ours[len(bb) + 2:]), (ours, theirs)
    if platform.machine() == "x86_64":
        assert ours == (f"{bb}: ELF 64-bit LSB executable, x86-64, version 1 (SYSV), dynamically linked, "
                        "interpreter /lib64/ld-linux-x86-64.so.2")


@pytest.mark.skipif(not shutil.which("file"), reason="the `file` command is not installed")
def test_describe_elf_matches_file_on_other_executables():
    paths = {os.path.realpath(p) for p in (sys.executable, shutil.which("sh"), shutil.which("node")) if p}
    for path in sorted(paths):
        with open(path, "rb") as f:
            if f.read(4) != b"\x7fELF":
                continue
        ours = bbrunner.describe_elf(path)
        theirs = subprocess.run(["file", "-b", path], capture_output=True, text=True, check=True).stdout
        assert theirs.startswith(ours[len(path) + 2:]), (ours, theirs)


def test_describe_elf_of_an_arm64_header(tmp_path):
    path = tmp_path / "bb-arm64"
    path.write_bytes(elf64(183, "/lib/ld-linux-aarch64.so.1"))
    assert bbrunner.describe_elf(str(path)) == (
        f"{path}: ELF 64-bit LSB executable, ARM aarch64, version 1 (SYSV), dynamically linked, "
        "interpreter /lib/ld-linux-aarch64.so.1")


def test_describe_elf_of_static_pie_and_32_bit_big_endian_headers(tmp_path):
    static = tmp_path / "static"
    static.write_bytes(elf64(62, osabi=3))
    assert bbrunner.describe_elf(str(static)) == \
        f"{static}: ELF 64-bit LSB executable, x86-64, version 1 (GNU/Linux), statically linked"
    pie = tmp_path / "pie"
    pie.write_bytes(elf64(62, "/lib64/ld-linux-x86-64.so.2", e_type=3))
    assert bbrunner.describe_elf(str(pie)).startswith(f"{pie}: ELF 64-bit LSB pie executable, x86-64, ")
    mips = tmp_path / "mips"
    mips.write_bytes(elf32_msb(8, "/lib/ld.so.1"))
    assert bbrunner.describe_elf(str(mips)) == (
        f"{mips}: ELF 32-bit MSB executable, machine 8, version 1 (SYSV), dynamically linked, "
        "interpreter /lib/ld.so.1")


@pytest.mark.parametrize("content", [b"#!/bin/sh\necho hi\n", b"", b"\x7fELF", b"\x7fELF" + bytes(60),
                                     b"MZ" + bytes(100)], ids=["script", "empty", "magic-only", "bad-class", "pe"])
def test_describe_elf_of_a_file_that_is_not_elf(tmp_path, content):
    path = tmp_path / "thing"
    path.write_bytes(content)
    assert bbrunner.describe_elf(str(path)) == f"{path}: not an ELF file"


def test_describe_elf_of_a_missing_file_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        bbrunner.describe_elf(str(tmp_path / "missing"))


# ---------------------------------------------------------------- run()

SPAWNER = """\
#!/bin/sh
# A child that leaves a grandchild holding the output pipes, then waits.
sleep 300 &
echo $! > "$1.tmp"
echo $$ >> "$1.tmp"
mv "$1.tmp" "$1"
sleep 300
"""


def read_pids(pidfile, timeout=5):
    deadline = time.monotonic() + timeout
    while not os.path.exists(pidfile):
        assert time.monotonic() < deadline, "the spawner did not start"
        time.sleep(0.01)
    with open(pidfile) as f:
        return [int(line) for line in f.read().split()]


def test_run_returns_code_stdout_stderr_with_no_stdin():
    code, out, err = bbrunner.run(["sh", "-c", "cat; echo out; echo err >&2; exit 3"], 10)
    assert (code, out, err) == (3, b"out\n", b"err\n")


def test_run_starts_the_child_in_its_own_process_group_in_our_session():
    """Its own group: kill_group() reaches all of bb and nothing else. Our session: see child_setup()."""
    code, out, _ = bbrunner.run([sys.executable, "-c", "import os; print(os.getpgid(0), os.getpid(), os.getsid(0))"], 30)
    pgid, pid, sid = map(int, out.split())
    assert code == 0 and pgid == pid != os.getpgid(0)
    assert sid == os.getsid(0)


def test_run_timeout_kills_the_whole_group_including_a_grandchild(tmp_path):
    script = write_script(tmp_path / "spawner", SPAWNER)
    pidfile = str(tmp_path / "pids")
    started = time.monotonic()
    with pytest.raises(bbrunner.ProverTimeout, match="within 1 s"):
        bbrunner.run([script, pidfile], 1)
    assert time.monotonic() - started < 4
    grandchild, child = read_pids(pidfile)
    deadline = time.monotonic() + 2
    while (alive(grandchild) or alive(child)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(child), "the child survived"
    assert not alive(grandchild), "the grandchild survived"


def test_a_gevent_timeout_around_run_kills_the_group_too(tmp_path):
    script = write_script(tmp_path / "spawner", SPAWNER)
    pidfile = str(tmp_path / "pids")
    with pytest.raises(gevent.Timeout):
        with gevent.Timeout(1):
            bbrunner.run([script, pidfile], 60)
    grandchild, child = read_pids(pidfile)
    deadline = time.monotonic() + 2
    while (alive(grandchild) or alive(child)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(child) and not alive(grandchild)


class Interrupted(Exception):
    """Raised into a greenlet running bbrunner.run, as app.ClientGone is."""


def test_an_interruption_while_bb_is_being_started_still_kills_it(tmp_path, monkeypatch):
    """gevent's Popen yields while the child is between fork and exec: an exception raised
    into the caller there (a hang-up's ClientGone) must not leave that child running."""
    gate_r, gate_w = os.pipe()
    pidfile = tmp_path / "pid"
    real_setup = bbrunner.child_setup

    def held_setup(*args):  # in the child, after fork and before exec: say who it is, wait for the test
        pidfile.write_text(str(os.getpid()))
        os.read(gate_r, 1)
        real_setup(*args)

    monkeypatch.setattr(bbrunner, "child_setup", held_setup)
    runner = gevent.spawn(bbrunner.run, ["sleep", "60"], 120)
    try:
        deadline = time.monotonic() + 10
        while not pidfile.exists() or not pidfile.read_text():
            assert time.monotonic() < deadline, "the child never forked"
            gevent.sleep(0.02)
        pid = int(pidfile.read_text())
        assert not runner.ready()  # inside Popen, waiting for the exec
        runner.kill(Interrupted, block=True)
        assert isinstance(runner.exception, Interrupted)
    finally:
        os.write(gate_w, b"x")  # the child goes on to exec sleep 60
        os.close(gate_w)
        os.close(gate_r)
    while alive(pid) and time.monotonic() < deadline:
        gevent.sleep(0.02)
    assert not alive(pid), "the child started after the interruption outlived it"


def test_run_of_a_missing_program_is_unavailable(tmp_path):
    with pytest.raises(bbrunner.ProverUnavailable, match="cannot run missing-bb"):
        bbrunner.run([str(tmp_path / "missing-bb"), "--version"], 5)


def test_run_of_a_file_that_is_not_executable_is_unavailable(tmp_path):
    path = tmp_path / "bb"
    path.write_text("#!/bin/sh\necho hi\n")
    path.chmod(0o644)
    with pytest.raises(bbrunner.ProverUnavailable):
        bbrunner.run([str(path)], 5)


# ---------------------------------------------------------------- BB.status

VERSION_SCRIPT = """\
#!/bin/sh
echo call >> "{counter}"
if [ "$1" = "--version" ]; then echo "{version}"; exit 0; fi
exit 1
"""


def make_prover(binary, tmp_path, crs_dir=None, verify=True, **options):
    """The one place a Circuit (with its BB) is built in this file."""
    return bbrunner.Circuit(bbrunner.BB(binary, crs_dir=crs_dir, **options), CIRCUIT, str(tmp_path / "vk-cache"),
                            verify=verify)


def calls(counter):
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def fake_version_bb(path, counter, version="5.0.0-fake"):
    return write_script(path, VERSION_SCRIPT.format(counter=counter, version=version))


def test_status_runs_version_once_and_again_when_bb_changes(tmp_path):
    counter = tmp_path / "count"
    binary = fake_version_bb(tmp_path / "bb", counter)
    prover = make_prover(binary, tmp_path)
    assert prover.bb.status() == (True, "5.0.0-fake", f"{binary}: not an ELF file")
    assert prover.bb.status()[:2] == (True, "5.0.0-fake")
    assert prover.bb.binary_arch() == f"{binary}: not an ELF file"
    assert prover.version() == "5.0.0-fake"
    assert calls(counter) == 1

    st = os.stat(binary)
    os.utime(binary, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))  # touch
    assert prover.bb.status()[:2] == (True, "5.0.0-fake")
    assert calls(counter) == 2

    new = fake_version_bb(tmp_path / "bb.new", counter, version="5.0.1-fake")
    os.replace(new, binary)
    assert prover.bb.status()[:2] == (True, "5.0.1-fake")
    assert prover.bb.status()[:2] == (True, "5.0.1-fake")
    assert calls(counter) == 3


def test_status_of_a_missing_or_non_executable_bb(tmp_path):
    binary = tmp_path / "bb"
    prover = make_prover(str(binary), tmp_path)
    available, version, detail = prover.bb.status()
    assert (available, version) == (False, None)
    assert detail == f"{binary}: No such file or directory"
    with pytest.raises(bbrunner.ProverUnavailable):
        prover.version()

    fake_version_bb(binary, tmp_path / "count")
    binary.chmod(0o644)
    assert prover.bb.status() == (False, None, f"{binary}: not executable")
    binary.chmod(0o755)
    assert prover.bb.status()[:2] == (True, "5.0.0-fake")  # appears later: picked up


def test_status_of_a_bb_that_does_not_run(tmp_path):
    binary = write_script(tmp_path / "bb", "#!/bin/sh\necho 'GLIBC_2.38 not found' >&2\nexit 1\n")
    available, version, detail = make_prover(binary, tmp_path).bb.status()
    assert (available, version) == (False, None)
    assert "does not run" in detail


def test_status_recovers_after_a_transient_version_failure(tmp_path, monkeypatch):
    """One failed `bb --version` (fork EAGAIN, a slow start under load) must not keep
    /api/health at 503 and every proof at 500 until a restart; nor may a failing bb
    run `bb --version` on every health call."""
    monkeypatch.setattr(bbrunner, "VERSION_RETRY_SECONDS", 1.0)
    marker, calls = tmp_path / "failed-once", tmp_path / "calls"
    binary = write_script(tmp_path / "bb", f"""\
        #!/bin/sh
        echo x >> "{calls}"
        if [ ! -e "{marker}" ]; then touch "{marker}"; exit 1; fi
        echo 5.0.0-fake
        """)
    prover = make_prover(binary, tmp_path)
    assert prover.bb.status()[0] is False
    for _ in range(5):  # within the retry interval: the failure is remembered, bb is not run
        assert prover.bb.status()[0] is False
    assert len(calls.read_text().split()) == 1
    deadline = time.monotonic() + 3
    while not prover.bb.status()[0] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert prover.bb.status()[:2] == (True, "5.0.0-fake")
    assert len(calls.read_text().split()) == 2


# ---------------------------------------------------------------- the verification key

@pytest.fixture
def count_runs(monkeypatch):
    """Wrap bbrunner.run; returns the list of argv[1] of every bb run since."""
    seen = []
    real = bbrunner.run

    def run(argv, timeout, *args, **kwargs):
        seen.append(argv[1])
        return real(argv, timeout, *args, **kwargs)
    monkeypatch.setattr(bbrunner, "run", run)
    return seen


def test_ensure_vk_writes_the_real_vk_once(bb, crs_dir, reference_vk, tmp_path, count_runs):
    prover = make_prover(bb, tmp_path, crs_dir)
    vk = prover.ensure_vk()
    assert vk.startswith(str(tmp_path / "vk-cache"))
    with open(vk, "rb") as f, open(reference_vk, "rb") as g:
        assert f.read() == g.read()
    first = os.stat(vk)
    assert prover.ensure_vk() == vk
    assert make_prover(bb, tmp_path, crs_dir).ensure_vk() == vk  # a new Prover finds the cache
    assert count_runs.count("write_vk") == 1
    assert os.stat(vk).st_mtime_ns == first.st_mtime_ns and os.stat(vk).st_ino == first.st_ino
    assert sorted(os.listdir(tmp_path / "vk-cache")) == [".lock", os.path.basename(os.path.dirname(vk))]


def test_ensure_vk_depends_on_the_verifier_target(bb, crs_dir, tmp_path):
    default = make_prover(bb, tmp_path, crs_dir).vk_dir()
    evm = make_prover(bb, tmp_path, crs_dir, verifier_target="evm").vk_dir()
    assert default != evm


def test_concurrent_ensure_vk_in_greenlets_runs_bb_once(bb, crs_dir, tmp_path, count_runs):
    prover = make_prover(bb, tmp_path, crs_dir)
    greenlets = [gevent.spawn(prover.ensure_vk) for _ in range(6)]
    gevent.joinall(greenlets, timeout=60, raise_error=True)
    assert len({g.value for g in greenlets}) == 1
    assert os.path.getsize(greenlets[0].value) > 0
    assert count_runs.count("write_vk") == 1


VK_RACER = """\
import os, sys, time
sys.path.insert(0, {root!r})
import bbrunner
binary, circuit, cache, crs, log, go = sys.argv[1:]
real = bbrunner.run
def run(argv, timeout, *args, **kwargs):
    if argv[1] == "write_vk":
        with open(log, "a") as f:
            f.write(f"{{os.getpid()}}\\n")
        time.sleep(0.3)  # widen the window in which the others race
    return real(argv, timeout, *args, **kwargs)
bbrunner.run = run
prover = bbrunner.Circuit(bbrunner.BB(binary, crs_dir=crs or None), circuit, cache)
while not os.path.exists(go):
    time.sleep(0.005)
print(prover.ensure_vk())
"""


def test_concurrent_ensure_vk_in_processes_runs_bb_once(bb, crs_dir, tmp_path):
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
    with pytest.raises(bbrunner.ServerFault, match="bb write_vk failed: out of memory$"):
        prover.ensure_vk()
    assert os.listdir(tmp_path / "vk-cache") == [".lock"]


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
    with pytest.raises(bbrunner.ProverFailed) as info:
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
    """BUG for real-time signals: signal.Signals(-code) raises ValueError for numbers that
    are not enum members (e.g. 40), which app.py answers as a generic 500."""
    binary = fake_prove_bb(tmp_path, f"os.kill(os.getpid(), {int(sig)})")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(bbrunner.ProverCrashed, match="killed by signal") as info:
        make_prover(binary, tmp_path).prove(str(tmp_path / "w.gz"), str(out))
    assert info.value.returncode == -int(sig)


@pytest.mark.parametrize("body", ["sys.exit(0)", "open(os.path.join(out, 'proof'), 'wb').write(b'p'); "
                                  "open(os.path.join(out, 'public_inputs'), 'wb').write(b'x' * 33)"],
                         ids=["no-output", "bad-public-inputs"])
def test_bb_exiting_0_without_usable_output_is_crashed(tmp_path, body):
    binary = fake_prove_bb(tmp_path, body)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(bbrunner.ProverCrashed, match="without usable output"):
        make_prover(binary, tmp_path).prove(str(tmp_path / "w.gz"), str(out))


def test_unwritable_vk_cache_is_a_clear_prover_unavailable(bb, tmp_path):
    cache = tmp_path / "vk-cache"
    cache.write_text("a file, so nothing can be created under it")
    prover = bbrunner.Circuit(bbrunner.BB(bb), CIRCUIT, str(cache))
    with pytest.raises(bbrunner.ProverUnavailable, match="set VK_CACHE_DIR"):
        prover.ensure_vk()


# ---------------------------------------------------------------- verify

def test_circuit_verify_tells_rejected_proofs_from_server_faults(bb, crs_dir, tmp_path):
    """bb verify exits 1 for both; only a rejection of the proof is False, the rest is ProverCrashed (5xx)."""
    circuit = bbrunner.Circuit(bbrunner.BB(bb, crs_dir=crs_dir, timeout=60), CIRCUIT, str(tmp_path / "vk"))
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
    vk = circuit.ensure_vk()
    with open(vk, "r+b") as f:
        f.truncate(1000)  # a damaged VK cache: ours, not the client's
    with pytest.raises(bbrunner.ServerFault, match="VK size"):
        circuit.verify(proof, inputs)
    os.unlink(vk)
    with pytest.raises(bbrunner.ProverError):
        bbrunner.verify_verdict(*circuit.bb.run("verify", "-k", vk, "-p", proof, "-i", inputs)[::2])
    with pytest.raises(bbrunner.ProverCrashed, match="signal"):
        bbrunner.verify_verdict(-9, b"")
    with pytest.raises(bbrunner.CrsUnavailable, match="HTTP request failed"):  # one table: bbformat.classify
        bbrunner.verify_verdict(1, b"HTTP request failed for https://crs.aztec-labs.com/g1.dat")


# ---------------------------------------------------------------- verification, output checks, memory (issue 10)

def prove_into(prover, tmp_path, witness_path):
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    return prover.prove(str(witness_path), str(out))


def test_verification_catches_a_proof_bb_prove_exits_0_on(bb, crs_dir, tmp_path):
    """An empty witness (the app rejects it first) makes bb exit 0 with a proof bb verify rejects."""
    empty = tmp_path / "empty.gz"
    empty.write_bytes(gzip.compress(b""))
    prover = make_prover(bb, tmp_path, crs_dir)
    with pytest.raises(bbrunner.ProofRejected, match="proof failed verification") as info:
        prove_into(prover, tmp_path, empty)
    assert info.value.returncode == 0  # bb prove's: it exited 0
    unchecked = make_prover(bb, tmp_path, crs_dir, verify=False)
    assert prove_into(unchecked, tmp_path, empty).public_inputs  # VERIFY_PROOFS=0 lets it through


def test_unsatisfied_witness_stays_422_not_a_verification_failure(bb, crs_dir, tmp_path):
    with pytest.raises(bbrunner.ProverFailed, match="does not satisfy"):
        prove_into(make_prover(bb, tmp_path, crs_dir), tmp_path, os.path.join(FIXTURES, "unsatisfied.gz"))


def test_circuit_file_replaced_on_disk_cannot_pair_with_the_served_vk(bb, crs_dir, reference_vk, tmp_path, verify):
    served = tmp_path / "circuit.json"
    shutil.copyfile(CIRCUIT, served)
    prover = bbrunner.Circuit(bbrunner.BB(bb, crs_dir=crs_dir), str(served), str(tmp_path / "vk-cache"))
    vk = prover.ensure_vk()
    shutil.copyfile(os.path.join(FIXTURES, "other_circuit.json"), served)  # replaced while serving
    proof = prove_into(prover, tmp_path, os.path.join(FIXTURES, "valid_1.gz"))
    assert proof.public_inputs == expected()["valid_1.gz"]["public_inputs"]
    assert verify(proof.proof, proof.public_inputs, vk=vk)
    with open(os.path.join(os.path.dirname(vk), bbrunner.CIRCUIT_FILE), "rb") as f, open(CIRCUIT, "rb") as g:
        assert f.read() == g.read()  # bb proves the copy made at start


def test_memory_limit_below_what_bb_needs_is_out_of_memory(bb, crs_dir, tmp_path):
    prover = make_prover(bb, tmp_path, crs_dir)
    prover.ensure_vk()
    limited = bbrunner.Circuit(bbrunner.BB(bb, crs_dir=crs_dir, memory_limit_mb=12), CIRCUIT, str(tmp_path / "vk-cache"))
    with pytest.raises(bbrunner.ProverOutOfMemory, match=r"^bb ran out of memory \(limit 12 MiB\)$"):
        prove_into(limited, tmp_path, os.path.join(FIXTURES, "valid_1.gz"))
    roomy = bbrunner.Circuit(bbrunner.BB(bb, crs_dir=crs_dir, memory_limit_mb=256), CIRCUIT, str(tmp_path / "vk-cache"))
    assert prove_into(roomy, tmp_path, os.path.join(FIXTURES, "valid_1.gz")).public_inputs


def test_memory_limit_is_rlimit_data_in_the_child_only():
    code = "import resource, sys; sys.stdout.write(str(resource.getrlimit(resource.RLIMIT_DATA)[0]))"
    for limit, expected in ((100, 100 * 1024 * 1024), (None, resource.getrlimit(resource.RLIMIT_DATA)[0])):
        out = subprocess.run([sys.executable, "-c", code], preexec_fn=functools.partial(bbrunner.child_setup, os.getpid(), limit),
                             capture_output=True, check=True).stdout
        assert int(out) == expected
    assert resource.getrlimit(resource.RLIMIT_DATA)[0] != 100 * 1024 * 1024  # the server's own is untouched


@pytest.mark.parametrize("mode, error, words", [
    ("unverified", bbrunner.ProofRejected, "proof failed verification: bb verify rejects the proof bb prove wrote"),
    ("shortproof", bbrunner.ProverCrashed, "bb wrote a proof of 4096 bytes; this VK's proofs are 14656"),
    ("oom", bbrunner.ProverOutOfMemory, "bb ran out of memory (limit 64 MiB)"),
])
def test_fake_bb_faults_after_prove(fake_bb, tmp_path, monkeypatch, mode, error, words):
    monkeypatch.setenv("FAKE_BB_MODE", mode)
    prover = bbrunner.Circuit(bbrunner.BB(fake_bb, memory_limit_mb=64), CIRCUIT, str(tmp_path / "vk-cache"))
    with pytest.raises(error) as info:
        prove_into(prover, tmp_path, os.path.join(FIXTURES, "valid_1.gz"))
    assert str(info.value) == words


def test_public_input_count_is_checked_against_the_vk(fake_bb, tmp_path):
    prover = bbrunner.Circuit(bbrunner.BB(fake_bb), CIRCUIT, str(tmp_path / "vk-cache"))
    prover.ensure_vk()
    proof = bbrunner.Proof(b"P" * 14656, ["0x" + "00" * 32] * 2)
    with pytest.raises(bbrunner.ProverCrashed, match="bb wrote 2 public inputs; the VK says 1"):
        prover.check_proof(proof)


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
    with pytest.raises(bbrunner.ProverCrashed, match=f"unusable verification key: .*{re.escape(words)}"):
        prover.ensure_vk()
    assert os.listdir(tmp_path / "vk-cache") == [".lock"]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 16 KiB tmpfs (root only): room for bb's public inputs, not for a 14656-byte proof."""
    with tmpfs(tmp_path / "tmpfs", "16k") as mount:
        yield mount


def test_a_full_disk_while_bb_writes_is_no_space_never_a_proof(bb, crs_dir, tmp_path, small_tmpfs):
    prover = make_prover(bb, tmp_path, crs_dir)
    prover.ensure_vk()
    (small_tmpfs / "filler").write_bytes(b"x" * 4096)  # what other requests' witnesses take
    out = small_tmpfs / "out"
    out.mkdir()
    with pytest.raises(bbrunner.ResourceUnavailable, match="No space left on device"):  # bb 5 checks this write
        prover.prove(os.path.join(FIXTURES, "valid_1.gz"), str(out))


def test_a_short_proof_on_a_full_disk_is_no_space(fake_bb, tmp_path, small_tmpfs, monkeypatch):
    """A bb that does not check its writes exits 0 with a short proof: the size check and free space tell."""
    monkeypatch.setenv("FAKE_BB_MODE", "shortproof")
    (small_tmpfs / "filler").write_bytes(b"x" * 8192)
    out = small_tmpfs / "out"
    out.mkdir()
    prover = bbrunner.Circuit(bbrunner.BB(fake_bb), CIRCUIT, str(tmp_path / "vk-cache"))
    with pytest.raises(bbrunner.ResourceUnavailable, match="proof of 4096 bytes.*file system is full"):
        prover.prove(os.path.join(FIXTURES, "valid_1.gz"), str(out))


@pytest.mark.parametrize("mode", ["silent", "unknown", "nooutput", "segv"])
def test_any_failure_of_bb_on_a_full_disk_is_no_space(fake_bb, tmp_path, monkeypatch, mode):
    """bb 5 on a disk that fills as it runs may exit 1 with nothing on stderr (its stderr file is
    on that disk too): with the disk full, every failure not the witness's is 503's kind, not 500's."""
    monkeypatch.setenv("FAKE_BB_MODE", mode)
    prover = bbrunner.Circuit(bbrunner.BB(fake_bb), CIRCUIT, str(tmp_path / "vk-cache"))
    with tmpfs(tmp_path / "disk", "2m") as disk:
        out = disk / "out"
        out.mkdir()
        with pytest.raises(bbrunner.ProverError) as roomy:
            prover.prove(os.path.join(FIXTURES, "valid_1.gz"), str(out))
        assert not isinstance(roomy.value, bbrunner.ResourceUnavailable)  # ours (500) while there is room
        (disk / "filler").write_bytes(b"x" * (2 << 20))
        with pytest.raises(bbrunner.ResourceUnavailable, match="file system is full"):
            prover.prove(os.path.join(FIXTURES, "valid_1.gz"), str(out))


def test_a_witness_bb_rejects_stays_its_fault_on_a_full_disk(fake_bb, tmp_path, small_tmpfs, monkeypatch):
    monkeypatch.setenv("FAKE_BB_MODE", "fail")
    prover = bbrunner.Circuit(bbrunner.BB(fake_bb), CIRCUIT, str(tmp_path / "vk-cache"))
    out = small_tmpfs / "out"
    out.mkdir()
    (small_tmpfs / "filler").write_bytes(b"x" * 12288)  # bb's message still fits
    with pytest.raises(bbrunner.ProverFailed):
        prover.prove(os.path.join(FIXTURES, "valid_1.gz"), str(out))


def test_a_verification_key_cache_on_a_full_disk_is_no_space(fake_bb, small_tmpfs):
    (small_tmpfs / "vk-cache").mkdir()
    (small_tmpfs / "filler").write_bytes(b"x" * 16384)
    prover = bbrunner.Circuit(bbrunner.BB(fake_bb), CIRCUIT, str(small_tmpfs / "vk-cache"))
    with pytest.raises(bbrunner.ResourceUnavailable, match="No space left on device|file system is full"):
        prover.ensure_vk()
    assert sorted(os.listdir(small_tmpfs / "vk-cache")) == [".lock"]


def test_output_files_that_cannot_be_made_are_a_resource_fault(tmp_path):
    with pytest.raises(bbrunner.ResourceUnavailable, match="cannot make bb's output files"):
        bbrunner.run(["true"], 5, scratch=str(tmp_path / "missing"))
