"""bbrunner.bb: the binary's status and version cache, its ELF description, one run with the server-wide options."""
import os
import platform
import shutil
import struct
import subprocess
import sys
import time

import gevent
import pytest

from bbworker.bbrunner import bb as bbmodule
from bbworker.bbrunner import BB, describe_elf
from bbworker.errors import ProverOutOfMemory, ProverTimeout, ProverUnavailable
from support import write_script


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
    ours = describe_elf(bb)
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
        ours = describe_elf(path)
        theirs = subprocess.run(["file", "-b", path], capture_output=True, text=True, check=True).stdout
        assert theirs.startswith(ours[len(path) + 2:]), (ours, theirs)


def test_describe_elf_of_an_arm64_header(tmp_path):
    path = tmp_path / "bb-arm64"
    path.write_bytes(elf64(183, "/lib/ld-linux-aarch64.so.1"))
    assert describe_elf(str(path)) == (
        f"{path}: ELF 64-bit LSB executable, ARM aarch64, version 1 (SYSV), dynamically linked, "
        "interpreter /lib/ld-linux-aarch64.so.1")


def test_describe_elf_of_static_pie_and_32_bit_big_endian_headers(tmp_path):
    static = tmp_path / "static"
    static.write_bytes(elf64(62, osabi=3))
    assert describe_elf(str(static)) == \
        f"{static}: ELF 64-bit LSB executable, x86-64, version 1 (GNU/Linux), statically linked"
    pie = tmp_path / "pie"
    pie.write_bytes(elf64(62, "/lib64/ld-linux-x86-64.so.2", e_type=3))
    assert describe_elf(str(pie)).startswith(f"{pie}: ELF 64-bit LSB pie executable, x86-64, ")
    mips = tmp_path / "mips"
    mips.write_bytes(elf32_msb(8, "/lib/ld.so.1"))
    assert describe_elf(str(mips)) == (
        f"{mips}: ELF 32-bit MSB executable, machine 8, version 1 (SYSV), dynamically linked, "
        "interpreter /lib/ld.so.1")


@pytest.mark.parametrize("content", [b"#!/bin/sh\necho hi\n", b"", b"\x7fELF", b"\x7fELF" + bytes(60),
                                     b"MZ" + bytes(100)], ids=["script", "empty", "magic-only", "bad-class", "pe"])
def test_describe_elf_of_a_file_that_is_not_elf(tmp_path, content):
    path = tmp_path / "thing"
    path.write_bytes(content)
    assert describe_elf(str(path)) == f"{path}: not an ELF file"


def test_describe_elf_of_a_missing_file_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        describe_elf(str(tmp_path / "missing"))


# ---------------------------------------------------------------- BB.status

VERSION_SCRIPT = """\
#!/bin/sh
echo call >> "{counter}"
if [ "$1" = "--version" ]; then echo "{version}"; exit 0; fi
exit 1
"""


def calls(counter):
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def fake_version_bb(path, counter, version="5.0.0-fake"):
    return write_script(path, VERSION_SCRIPT.format(counter=counter, version=version))


def test_status_runs_version_once_and_again_when_bb_changes(tmp_path):
    counter = tmp_path / "count"
    binary = fake_version_bb(tmp_path / "bb", counter)
    prover = BB(binary)
    assert prover.status() == (True, "5.0.0-fake", f"{binary}: not an ELF file")
    assert prover.status()[:2] == (True, "5.0.0-fake")
    assert prover.status().detail == f"{binary}: not an ELF file"  # was BB.binary_arch()
    assert prover.version() == "5.0.0-fake"
    assert calls(counter) == 1

    st = os.stat(binary)
    os.utime(binary, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))  # touch
    assert prover.status()[:2] == (True, "5.0.0-fake")
    assert calls(counter) == 2

    new = fake_version_bb(tmp_path / "bb.new", counter, version="5.0.1-fake")
    os.replace(new, binary)
    assert prover.status()[:2] == (True, "5.0.1-fake")
    assert prover.status()[:2] == (True, "5.0.1-fake")
    assert calls(counter) == 3


def test_status_of_a_missing_or_non_executable_bb(tmp_path):
    binary = tmp_path / "bb"
    prover = BB(str(binary))
    available, version, detail = prover.status()
    assert (available, version) == (False, None)
    assert detail == f"{binary}: No such file or directory"
    with pytest.raises(ProverUnavailable):
        prover.version()

    fake_version_bb(binary, tmp_path / "count")
    binary.chmod(0o644)
    assert prover.status() == (False, None, f"{binary}: not executable")
    binary.chmod(0o755)
    assert prover.status()[:2] == (True, "5.0.0-fake")  # appears later: picked up


def test_status_of_a_bb_that_does_not_run(tmp_path):
    binary = write_script(tmp_path / "bb", "#!/bin/sh\necho 'GLIBC_2.38 not found' >&2\nexit 1\n")
    available, version, detail = BB(binary).status()
    assert (available, version) == (False, None)
    assert "does not run" in detail


def test_status_recovers_after_a_transient_version_failure(tmp_path, monkeypatch):
    """One failed `bb --version` (fork EAGAIN, a slow start under load) must not keep
    /api/health at 503 and every proof at 500 until a restart; nor may a failing bb
    run `bb --version` on every health call."""
    monkeypatch.setattr(bbmodule, "VERSION_RETRY_SECONDS", 1.0)
    marker, calls = tmp_path / "failed-once", tmp_path / "calls"
    binary = write_script(tmp_path / "bb", f"""\
        #!/bin/sh
        echo x >> "{calls}"
        if [ ! -e "{marker}" ]; then touch "{marker}"; exit 1; fi
        echo 5.0.0-fake
        """)
    prover = BB(binary)
    assert prover.status()[0] is False
    for _ in range(5):  # within the retry interval: the failure is remembered, bb is not run
        assert prover.status()[0] is False
    assert len(calls.read_text().split()) == 1
    deadline = time.monotonic() + 3
    while not prover.status()[0] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert prover.status()[:2] == (True, "5.0.0-fake")
    assert len(calls.read_text().split()) == 2



def test_status_of_the_real_bb(bb):
    status = BB(bb).status()
    assert status.available is True
    assert status.version.startswith("5.") and status.version == BB(bb).version()
    assert status.detail == describe_elf(bb)


# ---------------------------------------------------------------- BB.argv, BB.crs, BB.run

def test_argv_adds_the_verifier_target_and_the_crs_after_the_command():
    assert BB("/x/bb").argv("prove", "-b", "c.json") == ["/x/bb", "prove", "-b", "c.json"]
    assert BB("/x/bb", crs_dir="/crs", verifier_target="evm").argv("verify", "-k", "vk") == \
        ["/x/bb", "verify", "-k", "vk", "-t", "evm", "-c", "/crs"]


def test_crs_is_the_configured_directory_else_bbs_default():
    assert BB("/x/bb", crs_dir="/crs").crs == "/crs"
    assert BB("/x/bb").crs == bbmodule.DEFAULT_CRS_DIR == os.path.expanduser("~/.bb-crs")


ECHO_ARGS = f"""\
#!{sys.executable}
import os, sys
print(" ".join(sys.argv[1:]))
print(os.environ.get("HARDWARE_CONCURRENCY", "-"), file=sys.stderr)
sys.exit(3)
"""


def test_run_passes_the_shared_options_and_returns_what_bb_said(tmp_path):
    binary = write_script(tmp_path / "bb", ECHO_ARGS)
    code, out, err = BB(binary, crs_dir="/crs", verifier_target="evm").run("prove", "-b", "c.json", threads=2)
    assert (code, out, err) == (3, b"prove -b c.json -t evm -c /crs\n", b"2\n")


def test_run_timeout_names_the_command(tmp_path):
    binary = write_script(tmp_path / "bb", "#!/bin/sh\nexec sleep 60\n")
    with pytest.raises(ProverTimeout, match=r"^bb write_vk did not finish within 0.5 s$"):
        BB(binary, timeout=60).run("write_vk", timeout=0.5)
    with pytest.raises(ProverTimeout, match=r"^bb prove did not finish within 0.25 s$"):
        BB(binary, timeout=0.25).run("prove")


def test_run_of_a_bb_whose_allocation_failed_is_out_of_memory_with_the_limit(tmp_path):
    binary = write_script(tmp_path / "bb", "#!/bin/sh\necho 'terminate called: std::bad_alloc' >&2\nkill -ABRT $$\n")
    with pytest.raises(ProverOutOfMemory, match=r"^bb ran out of memory \(limit 64 MiB\)$") as info:
        BB(binary, memory_limit_mb=64).run("prove")
    assert (info.value.returncode, info.value.limit_mb) == (-6, 64)
    with pytest.raises(ProverOutOfMemory, match=r"^bb ran out of memory$"):
        BB(binary).run("prove")


def test_callers_asking_while_bb_version_runs_share_its_answer(tmp_path):
    """One `bb --version` at a time: health checks arriving while a slow one runs wait for its answer
    instead of each starting bb again."""
    runs = tmp_path / "runs"
    binary = write_script(tmp_path / "bb", f"""\
        #!/bin/sh
        echo run >> {runs}
        sleep 0.3
        echo 5.0.0-slow
        """)
    bb = BB(binary)
    callers = [gevent.spawn(bb.status) for _ in range(5)]
    gevent.joinall(callers)
    assert [c.value.version for c in callers] == ["5.0.0-slow"] * 5
    assert runs.read_text().split() == ["run"]


def test_a_status_already_known_never_waits_on_the_event_loop(tmp_path, monkeypatch):
    """A health check gives status() STATUS_WAIT_SECONDS; a flood that kept the event loop busy that
    long made it answer "starting: bb --version is running" for a bb known for minutes (QA round 3):
    a known status is returned in the caller, with no greenlet to wait for."""
    counter = tmp_path / "count"
    binary = fake_version_bb(tmp_path / "bb", counter)
    prover = BB(binary)
    assert prover.status()[:2] == (True, "5.0.0-fake")

    def no_greenlet(*args, **kwargs):
        raise AssertionError("status() waited on a greenlet for what it knew")
    monkeypatch.setattr(bbmodule.gevent, "spawn", no_greenlet)
    assert prover.status(wait=0.1)[:2] == (True, "5.0.0-fake")
    assert calls(counter) == 1
