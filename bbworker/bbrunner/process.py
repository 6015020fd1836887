"""Running bb: one child process with a fixed argument list, that leaves nothing behind.

bb runs through gevent's subprocess module, so a gevent worker keeps serving while it
runs: no stdin, a process group of its own inside the server's session, its output in
unlinked temp files (never pipes: a descendant keeping a pipe open cannot hold a finished
run), and the settings child_setup() makes between fork and exec. Its whole group is
killed when it exits, at the deadline, and on any exception.
"""
import ctypes
import os
import resource
import signal
import tempfile

import gevent
from gevent import subprocess

from bbworker.errors import ProverTimeout, ProverUnavailable, ResourceUnavailable

KILL_WAIT_SECONDS = 5.0
BB_NICE = 10  # bb's CPU priority below the server's (os.nice increment, 0..19)
OUTPUT_KEEP_BYTES = 512 * 1024  # of each of bb's stdout and stderr: the first and the last this many
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_libc = ctypes.CDLL(None, use_errno=True)


def run(argv, timeout, scratch=None, keep_fds=(), memory_limit_mb=None, threads=None):
    """Run `argv` (a list of str, never through a shell); return (returncode, stdout, stderr).

    timeout: seconds. scratch: the directory of the output files, and bb's working directory
    (default: tempfile's, and ours). stdout, stderr: bytes, at most the first and last
    OUTPUT_KEEP_BYTES of each. keep_fds: descriptors the child inherits (the proof slot's
    locks, so the slot stays taken while bb lives). memory_limit_mb: see child_setup().
    threads (int) sets `HARDWARE_CONCURRENCY`, the thread count bb 5 reads at start (None:
    bb's default, every core). Raises ProverUnavailable if the program cannot start,
    ResourceUnavailable if the output files cannot be made, ProverTimeout on expiry.
    """
    parent = os.getpid()
    try:
        out = tempfile.TemporaryFile(dir=scratch)
        err = tempfile.TemporaryFile(dir=scratch)
    except OSError as exc:
        raise ResourceUnavailable(None, f"cannot make bb's output files in {scratch}: {exc.strerror}") from None
    with out, err:
        try:
            proc = _start(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=scratch,
                          process_group=0, close_fds=True, pass_fds=tuple(keep_fds),
                          preexec_fn=lambda: child_setup(parent, memory_limit_mb),
                          env=None if threads is None else dict(os.environ, HARDWARE_CONCURRENCY=str(threads)))
        except (OSError, subprocess.SubprocessError) as exc:
            raise ProverUnavailable(f"cannot run {os.path.basename(argv[0])}: "
                                    f"{getattr(exc, 'strerror', None) or exc}") from None
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            raise ProverTimeout(f"bb did not finish within {timeout:g} s") from None
        except BaseException:
            kill_group(proc)
            raise
        kill_group(proc)  # descendants bb left behind
        return proc.returncode, _read_kept(out), _read_kept(err)


def _start(argv, **popen_args):
    """subprocess.Popen(argv, **popen_args), and the child killed even if the caller is interrupted.

    gevent's Popen waits cooperatively for the child's exec, so an exception raised into
    the calling greenlet meanwhile (a client hang-up, a gevent Timeout) would leave a bb
    running that nobody kills. The start runs in a greenlet of its own; when the caller is
    interrupted, it waits for the start (milliseconds) and kills the child before the
    exception goes on, so the caller's clean-up (removing bb's output directory) runs after
    bb is gone. Interrupted again meanwhile, kill_group() runs as soon as the child exists.
    """
    starter = gevent.spawn(subprocess.Popen, argv, **popen_args)
    try:
        return starter.get()
    except BaseException:
        try:
            child = starter.get()
        except BaseException:  # interrupted again, or the start itself failed
            starter.link_value(lambda done: kill_group(done.value))
        else:
            kill_group(child)
        raise


def _read_kept(f):
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    if size <= 2 * OUTPUT_KEEP_BYTES:
        return f.read()
    head = f.read(OUTPUT_KEEP_BYTES)
    f.seek(size - OUTPUT_KEEP_BYTES)
    return head + b"\n...\n" + f.read()


def child_setup(parent_pid, memory_limit_mb=None):
    """In the child, between fork and exec: the one place bb's process settings are made.

    - bb gets SIGKILL when `parent_pid` (the worker starting it) dies (die_with_parent).
    - nice BB_NICE: the server's own processes come first, so health checks and uploads are
      answered at once while bb saturates the cores; a lone proof loses nothing. run() keeps
      bb in the server's session: where the kernel groups CPU time by session
      (sched_autogroup), a session of bb's own would weigh as much as the server's.
    - no core dumps (RLIMIT_CORE 0): a crash on a big circuit would leave hundreds of MB.
    - memory_limit_mb (int or None) caps bb's data segment (RLIMIT_DATA: heap and private
      writable mappings, what bb fills). RLIMIT_AS would count bb's reserved but unused
      address space too, which grows with its thread count (2^18 rows: 391 MiB of it at 2
      threads, 1.5 GiB at 32).
    """
    die_with_parent(parent_pid)
    os.nice(BB_NICE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if memory_limit_mb:
        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def die_with_parent(parent_pid, sig=signal.SIGKILL):
    """In a child after fork: ask the kernel to send `sig` when the parent dies (PR_SET_PDEATHSIG).

    parent_pid: the pid of the process that forked (read before the fork). If it died
    already, the child kills itself with `sig` now. The signal fires when the parent
    *thread* exits: fork from a thread that lives as long as the process (a gevent worker
    has one). Raises OSError if prctl fails.
    """
    if _libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)


def kill_group(proc):
    """SIGKILL the process group led by `proc` and reap `proc` (bounded wait)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=KILL_WAIT_SECONDS)
    except subprocess.TimeoutExpired:
        pass
