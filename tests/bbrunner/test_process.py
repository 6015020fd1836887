"""bbrunner.process: one bb run in its own process group, its limits, and nothing left behind."""
import functools
import os
import resource
import signal
import subprocess
import sys
import time

import gevent
import pytest

from bbworker.bbrunner import process
from bbworker.errors import ProverTimeout, ProverUnavailable, ResourceUnavailable
from support import CIRCUIT, FIXTURES, ROOT, alive, write_script

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


def child_python(code, **kwargs):
    """process.run() of `python -c code`; returns its stdout (str), after checking it exited 0."""
    returncode, out, err = process.run([sys.executable, "-c", code], 30, **kwargs)
    assert returncode == 0, err
    return out.decode()


# ---------------------------------------------------------------- run()

def test_run_returns_code_stdout_stderr_with_no_stdin():
    code, out, err = process.run(["sh", "-c", "cat; echo out; echo err >&2; exit 3"], 10)
    assert (code, out, err) == (3, b"out\n", b"err\n")


def test_run_starts_the_child_in_its_own_process_group_in_our_session():
    """Its own group: kill_group() reaches all of bb and nothing else. Our session: see child_setup()."""
    out = child_python("import os; print(os.getpgid(0), os.getpid(), os.getsid(0))")
    pgid, pid, sid = map(int, out.split())
    assert pgid == pid != os.getpgid(0)
    assert sid == os.getsid(0)


def test_run_timeout_kills_the_whole_group_including_a_grandchild(tmp_path):
    script = write_script(tmp_path / "spawner", SPAWNER)
    pidfile = str(tmp_path / "pids")
    started = time.monotonic()
    with pytest.raises(ProverTimeout, match="within 1 s"):
        process.run([script, pidfile], 1)
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
            process.run([script, pidfile], 60)
    grandchild, child = read_pids(pidfile)
    deadline = time.monotonic() + 2
    while (alive(grandchild) or alive(child)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(child) and not alive(grandchild)


class Interrupted(Exception):
    """Raised into a greenlet running process.run, as errors.ClientGone is."""


def test_an_interruption_while_bb_is_being_started_still_kills_it(tmp_path, monkeypatch):
    """gevent's Popen yields while the child is between fork and exec: an exception raised
    into the caller there (a hang-up's ClientGone) must not leave that child running, and the
    child must be gone before the exception reaches the caller's clean-up (which removes bb's
    output directory: a bb still starting would make it again, and leave it behind)."""
    gate_r, gate_w = os.pipe()
    pidfile = tmp_path / "pid"
    real_setup = process.child_setup

    def held_setup(*args):  # in the child, after fork and before exec: say who it is, wait for the test
        pidfile.write_text(str(os.getpid()))
        os.read(gate_r, 1)
        real_setup(*args)

    monkeypatch.setattr(process, "child_setup", held_setup)
    runner = gevent.spawn(process.run, ["sleep", "60"], 120)
    try:
        deadline = time.monotonic() + 10
        while not pidfile.exists() or not pidfile.read_text():
            assert time.monotonic() < deadline, "the child never forked"
            gevent.sleep(0.02)
        pid = int(pidfile.read_text())
        assert not runner.ready()  # inside Popen, waiting for the exec
        runner.kill(Interrupted, block=False)
        gevent.sleep(0.1)
        assert not runner.ready()  # interrupted, it waits for the start to kill the child itself
    finally:
        os.write(gate_w, b"x")  # the child goes on to exec sleep 60
        os.close(gate_w)
        os.close(gate_r)
    runner.join(10)
    assert isinstance(runner.exception, Interrupted)
    assert not alive(pid), "the child outlived the interruption of the caller that started it"


def test_run_of_a_missing_program_is_unavailable(tmp_path):
    with pytest.raises(ProverUnavailable, match="cannot run missing-bb"):
        process.run([str(tmp_path / "missing-bb"), "--version"], 5)


def test_run_of_a_file_that_is_not_executable_is_unavailable(tmp_path):
    path = tmp_path / "bb"
    path.write_text("#!/bin/sh\necho hi\n")
    path.chmod(0o644)
    with pytest.raises(ProverUnavailable):
        process.run([str(path)], 5)


def test_output_files_that_cannot_be_made_are_a_resource_fault(tmp_path):
    with pytest.raises(ResourceUnavailable, match="cannot make bb's output files"):
        process.run(["true"], 5, scratch=str(tmp_path / "missing"))


def test_bb_runs_in_its_scratch_directory_and_its_output_files_leave_nothing_there(tmp_path):
    """bb's working directory is `scratch` (relative paths it writes land there); without one, ours."""
    assert child_python("import os; print(os.getcwd())", scratch=str(tmp_path)).strip() == str(tmp_path)
    assert os.listdir(tmp_path) == []  # the output files are unlinked temp files
    assert child_python("import os; print(os.getcwd())").strip() == os.getcwd()


def test_threads_set_hardware_concurrency_and_none_leaves_the_environment_alone(monkeypatch):
    code = "import os; print(os.environ.get('HARDWARE_CONCURRENCY', '-'), os.environ.get('BB_WORKER_PROBE', '-'))"
    monkeypatch.setenv("BB_WORKER_PROBE", "inherited")
    monkeypatch.delenv("HARDWARE_CONCURRENCY", raising=False)
    assert child_python(code, threads=3).split() == ["3", "inherited"]
    assert child_python(code).split() == ["-", "inherited"]
    assert "HARDWARE_CONCURRENCY" not in os.environ  # ours is untouched


def test_output_beyond_the_kept_bytes_keeps_the_head_and_the_tail(monkeypatch):
    monkeypatch.setattr(process, "OUTPUT_KEEP_BYTES", 4)
    code, out, err = process.run(["sh", "-c", "printf 0123456789; printf abcdefgh >&2"], 10)
    assert (code, out, err) == (0, b"0123\n...\n6789", b"abcdefgh")  # 8 bytes: 2 * 4 fit whole


# ---------------------------------------------------------------- child_setup

def test_memory_limit_is_rlimit_data_in_the_child_only():
    code = "import resource, sys; sys.stdout.write(str(resource.getrlimit(resource.RLIMIT_DATA)[0]))"
    for limit, expected in ((100, 100 * 1024 * 1024), (None, resource.getrlimit(resource.RLIMIT_DATA)[0])):
        out = subprocess.run([sys.executable, "-c", code],
                             preexec_fn=functools.partial(process.child_setup, os.getpid(), limit),
                             capture_output=True, check=True).stdout
        assert int(out) == expected
    assert resource.getrlimit(resource.RLIMIT_DATA)[0] != 100 * 1024 * 1024  # the server's own is untouched


@pytest.fixture
def unlimited_core():
    """This process's RLIMIT_CORE raised to unlimited (root; else to its hard limit) for the test."""
    saved = resource.getrlimit(resource.RLIMIT_CORE)
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (saved[1], saved[1]))
    if resource.getrlimit(resource.RLIMIT_CORE)[0] == 0:
        resource.setrlimit(resource.RLIMIT_CORE, saved)
        pytest.skip("the hard RLIMIT_CORE is 0 here: a child would have 0 without child_setup")
    try:
        yield resource.getrlimit(resource.RLIMIT_CORE)
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, saved)


def test_bb_gets_no_core_dumps_whatever_the_servers_limit(unlimited_core):
    """A crash on a big circuit would leave a core file of hundreds of MB: child_setup sets RLIMIT_CORE to 0."""
    code = "import resource; print(*resource.getrlimit(resource.RLIMIT_CORE))"
    assert child_python(code).split() == ["0", "0"]
    assert resource.getrlimit(resource.RLIMIT_CORE) == unlimited_core  # the server's own is untouched
    assert unlimited_core[0] != 0


def test_bb_runs_niced_below_the_server():
    ours = os.nice(0)
    assert int(child_python("import os; print(os.nice(0))")) == min(19, ours + process.BB_NICE)


# ---------------------------------------------------------------- die_with_parent

def test_child_dies_with_its_parent(tmp_path):
    """A parent starts a grandchild with die_with_parent, then is killed -9: the grandchild dies too."""
    code = ("import os, subprocess, sys; from bbworker.bbrunner import process; me = os.getpid(); "
            "p = subprocess.Popen(['sleep', '60'], preexec_fn=lambda: process.die_with_parent(me)); "
            "print(p.pid, flush=True); p.wait()")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.stdout.close()
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break  # dead, waiting for init to reap it
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child outlived its parent")


def test_die_with_parent_kills_a_child_whose_parent_is_already_gone():
    code = "from bbworker.bbrunner import process; process.die_with_parent(1); print('survived')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == -signal.SIGKILL and "survived" not in proc.stdout


# ---------------------------------------------------------------- kill_group

def test_kill_group_kills_the_group_and_reaps_its_leader(tmp_path):
    script = write_script(tmp_path / "spawner", SPAWNER)
    pidfile = str(tmp_path / "pids")
    proc = subprocess.Popen([script, pidfile], process_group=0)
    grandchild, child = read_pids(pidfile)
    assert child == proc.pid and alive(grandchild)
    process.kill_group(proc)
    assert proc.returncode == -signal.SIGKILL  # reaped
    deadline = time.monotonic() + 2
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(grandchild), "the grandchild survived"
    process.kill_group(proc)  # a group already gone: no error


def test_real_bb_starts_no_process_that_outlives_it(bb, crs_dir, tmp_path):
    """bb 5 proves with threads, never child processes: in a child subreaper (which inherits any
    orphan), nothing is left once `bb write_vk` and `bb prove` have exited. This is why the server
    needs no reaper of bb's descendants beyond killing bb's process group."""
    script = f"""
import ctypes, os, subprocess, sys
assert ctypes.CDLL(None).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
crs = {["-c", crs_dir] if crs_dir else []!r}
subprocess.run([{bb!r}, "write_vk", "-b", {CIRCUIT!r}, "-o", {str(tmp_path)!r}] + crs, check=True,
               capture_output=True, start_new_session=True)
subprocess.run([{bb!r}, "prove", "-b", {CIRCUIT!r}, "-w", {os.path.join(FIXTURES, "valid_1.gz")!r},
                "-k", {str(tmp_path / "vk")!r}, "-o", {str(tmp_path)!r}] + crs, check=True, capture_output=True,
               start_new_session=True)
print(open(f"/proc/self/task/{{os.getpid()}}/children").read().split())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert (tmp_path / "proof").stat().st_size > 0
