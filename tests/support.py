"""Helpers shared by the tests and the benchmark (bench/): live servers, HTTP, /proc.

Standard library only. The tests import it as `support` (pytest puts tests/ on
sys.path), the benchmark as `tests.support`.
"""
import contextlib
import glob
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_BB = os.path.join(ROOT, "tests", "fakebb", "bb")  # see its docstring for the FAKE_BB_* variables


# ---------------------------------------------------------------- HTTP

def free_port():
    """A TCP port free on 127.0.0.1 right now (int)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port, method, path, body=None, headers=None, timeout=120):
    """One HTTP request to 127.0.0.1:`port` on a new connection.

    Returns (status int, headers dict with lower-case names, body bytes).
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def request_json(port, method, path, body=None, headers=None, timeout=120):
    """request() with the body decoded as JSON."""
    status, headers, data = request(port, method, path, body, headers, timeout)
    return status, headers, json.loads(data)


def wait_for(predicate, timeout=10.0):
    """Call predicate() every 20 ms until it is true (then True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def pids_in(path):
    """The pids listed one per line in the file at `path` (FAKE_BB_PIDFILE); [] if it does not exist."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [int(line) for line in f if line.strip()]


# ---------------------------------------------------------------- /proc

def proc_stat(pid):
    """The fields of /proc/<pid>/stat after the command name (list of str), or None if it is gone.

    Index 0 is the state, 1 the parent pid, 19 the start time (proc(5) fields 3, 4, 22).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].decode().split()
    except (OSError, IndexError):
        return None


def alive(pid):
    """True if `pid` exists and is not a zombie."""
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z"


def parent_pid(pid):
    """Parent pid (int) of `pid`, 0 if it is gone."""
    fields = proc_stat(pid)
    return int(fields[1]) if fields else 0


def start_time(pid):
    """Start time of `pid` in clock ticks after boot (int), None if it is gone: tells reused pids apart."""
    fields = proc_stat(pid)
    return int(fields[19]) if fields else None


def cpu_ticks(pid):
    """utime + stime + cutime + cstime of `pid` in clock ticks (int), None if it is gone."""
    fields = proc_stat(pid)
    return sum(int(x) for x in fields[11:15]) if fields else None


def status_bytes(pid, field):
    """A kB field of /proc/<pid>/status ("VmRSS", "VmHWM") in bytes (int), None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(field.encode() + b":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_bytes(pid):
    """Resident memory of `pid` in bytes (0 if it is gone)."""
    return status_bytes(pid, "VmRSS") or 0


def argv_head(pid, count=2):
    """The first `count` arguments (list of bytes) of `pid`'s command line, None if it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[:count]
    except OSError:
        return None


def pids():
    """Every pid (int) in /proc now."""
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def descendants(root_pid):
    """[(pid, start time)] of every live process below `root_pid` (ints)."""
    parent = {}
    for pid in pids():
        ppid = parent_pid(pid)
        if ppid:
            parent[pid] = ppid
    found, frontier = [], {root_pid}
    while frontier:
        frontier = {pid for pid, pp in parent.items() if pp in frontier}
        found += [(pid, start_time(pid)) for pid in frontier]
    return found


def descends_from(pid, root_pid, depth=64):
    """True if `root_pid` is an ancestor of `pid` (within `depth` generations)."""
    for _ in range(depth):
        pid = parent_pid(pid)
        if pid <= 1:
            return False
        if pid == root_pid:
            return True
    return False


def children(pid):
    """The pids (ints) of `pid`'s direct children; [] if it is gone."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class Sampler(threading.Thread):
    """Every `interval` s: live bb processes, and the RSS of the gunicorn master plus workers.

    master: the server's pid; bb: the bb binary's path. Call stop.set(), then join().
    peak_bb, peak_rss (bytes) and samples (count) are read afterwards.
    """

    def __init__(self, master, bb, interval=0.01):
        super().__init__(daemon=True)
        self.master, self.bb, self.interval = master, bb, interval
        self.stop = threading.Event()
        self.peak_bb = self.peak_rss = self.samples = 0

    def run(self):
        while not self.stop.is_set():
            bbs = set(bb_processes(self.bb, under=self.master))
            server = [self.master] + [p for p in children(self.master) if p not in bbs]
            self.peak_bb = max(self.peak_bb, len(bbs))
            self.peak_rss = max(self.peak_rss, sum(rss_bytes(p) for p in server))
            self.samples += 1
            time.sleep(self.interval)


def bb_processes(binary, under=None):
    """PIDs of live (non-zombie) processes with `binary` as argv[0] or argv[1] (a script).

    With `under` (a pid), only its descendants: other tests or benchmarks may run bb too.
    """
    found = []
    for pid in pids():
        argv = argv_head(pid)
        if argv is None or binary.encode() not in argv or not alive(pid):
            continue
        if under is None or descends_from(pid, under):
            found.append(pid)
    return found


def kill_quietly(pid, sig=signal.SIGKILL, group=False):
    """Send `sig` to `pid` (its process group with `group`), ignoring processes already gone."""
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------- a live server

class ServerError(Exception):
    """The server exited or did not answer in time; the message ends with its log."""


class Server:
    """A real bb-worker (`python -m gunicorn -c gunicorn.conf.py`) in its own session.

    run_dir: gets the server's TMPDIR (run_dir/tmpdir) and log (run_dir/server.log).
    env: settings for settings.py (str values) on top of this process's environment,
    less the names in `clear`. Requests go to 127.0.0.1 only. kill_leftovers: stop()
    also kills what the server left running (the benchmark's safety net; tests leave
    it off so that a leak stays visible).
    """

    def __init__(self, run_dir, env, clear=(), kill_leftovers=False):
        self.kill_leftovers = kill_leftovers
        self.port = free_port()
        self.tmpdir = os.path.join(run_dir, "tmpdir")
        os.makedirs(self.tmpdir, exist_ok=True)
        self.log_path = os.path.join(run_dir, "server.log")
        self.env = {k: v for k, v in os.environ.items() if k not in clear}
        self.env.update(PORT=str(self.port), TMPDIR=self.tmpdir, PYTHONUNBUFFERED="1")
        self.env.update(env)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"],
                                     cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout=60, healthy=False):
        """Poll GET /api/health until it answers other than 503 "starting" (the VKs being
        computed); with `healthy`, until it answers 200. Returns self.

        Raises ServerError if the server exits, answers non-200 with `healthy`, or times out.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"server exited {self.proc.returncode}:\n{self.output()}")
            try:
                status, _, body = request(self.port, "GET", "/api/health", timeout=5)
            except OSError:
                time.sleep(0.1)
                continue
            if status == 503 and b'"status":"starting"' in body:
                time.sleep(0.1)
                continue
            if healthy and status != 200:
                raise ServerError(f"/api/health answered {status}:\n{self.output_tail()}")
            return self
        raise ServerError(f"server not ready in {timeout:g} s:\n{self.output()}")

    def output(self):
        """The server's whole log (str)."""
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def output_tail(self, lines=20):
        """The last `lines` lines of the server's log (str)."""
        return "\n".join(self.output().splitlines()[-lines:])

    def worker_dirs(self):
        """The workers' private directories for request files (sorted list of str).

        ownership.ServerDir: TMPDIR/bb-worker-run-<master pid>-<random>/w<worker pid>.
        """
        return sorted(glob.glob(os.path.join(self.tmpdir, "bb-worker-run-*", "w*")))

    @property
    def work_dir(self):
        """The first worker's directory for request files (made at its first health check)."""
        dirs = self.worker_dirs()
        return dirs[0] if dirs else os.path.join(self.tmpdir, "bb-worker-run-none", "w0")

    def leftovers(self):
        """Files left in the workers' directories for request files (sorted names)."""
        return sorted(name for d in self.worker_dirs() if os.path.isdir(d) for name in os.listdir(d))

    def stop(self):
        """SIGTERM the server's process group, SIGKILL it after 20 s; always reaps.

        bb runs in a process group of its own (bbrunner), outside the server's: with
        kill_leftovers, any bb still running under the server is killed once it is gone.
        """
        leftovers = descendants(self.proc.pid) if self.kill_leftovers else []
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        if self.kill_leftovers:
            kill_quietly(self.proc.pid, group=True)  # anything left in the group goes too
        for pid, started in leftovers:
            if start_time(pid) == started:  # the same process, not a reused pid
                kill_quietly(pid, group=True)  # bb leads its own process group
                kill_quietly(pid)
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


@contextlib.contextmanager
def tmpfs(path, size):
    """Mount a tmpfs of `size` (mount's syntax: "16k", "4m") at `path` (created) for the `with` body.

    For disk-full tests; needs root: pytest.skip() where it cannot be mounted. Unmounted lazily
    at the end, so a server still holding a file there cannot keep it mounted.
    """
    import pytest

    os.makedirs(path, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
