"""Helpers shared by the tests and the benchmark (bench/): fixtures, live servers, HTTP, /proc.

Standard library only. The tests import it as `support` (pyproject.toml puts tests/ on
pytest's path), the benchmark as `tests.support`.
"""
import contextlib
import glob
import gzip
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
PROGRAMS = os.path.join(TESTS, "programs")  # live test apps and fake programs
FAKE_BB = os.path.join(PROGRAMS, "fakebb", "bb")  # see its docstring for the FAKE_BB_* variables
FIXTURES = os.path.join(TESTS, "fixtures")
CIRCUIT = os.path.join(ROOT, "circuit.json")
SHARED_CRS = os.path.join(os.path.dirname(ROOT), "shared", "crs")
BB = os.environ.get("BB_BINARY") or os.path.join(ROOT, ".bb", "bb")
VALID = ["valid_1.gz", "valid_2.gz", "valid_3.gz"]
HOST = "127.0.0.1"


def make_prover(binary, tmp_path, crs_dir=None, verify=True, **options):
    """A bbrunner Circuit of the demo circuit (with its BB) whose VK is cached in tmp_path/vk-cache."""
    from bbworker.bbrunner import BB as Binary, Circuit
    return Circuit(Binary(binary, crs_dir=crs_dir, **options), CIRCUIT, str(tmp_path / "vk-cache"), verify=verify)


def prove_into(prover, tmp_path, witness_path):
    """prover.prove() of `witness_path` into a fresh tmp_path/out: its Proof."""
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    return prover.prove(str(witness_path), str(out))


# ---------------------------------------------------------------- fixtures

def fixture_bytes(name):
    """The bytes of tests/fixtures/`name`."""
    with open(os.path.join(FIXTURES, name), "rb") as f:
        return f.read()


def expected():
    """tests/fixtures/expected.json: what each fixture proves to (dict)."""
    with open(os.path.join(FIXTURES, "expected.json")) as f:
        return json.load(f)


def witness_stack(witness_map, fmt=3, items=None):
    """A witness stack as Noir 1.0.0-beta.26 writes it (format byte, msgpack-compact), decompressed:
    one map `witness_map` ({index: 32 bytes}), or the stack items `items`."""
    import msgpack  # a runtime dependency of the server; the benchmark never calls this

    return bytes([fmt]) + msgpack.packb([items if items is not None else [[0, witness_map]]])


def valid_map():
    """The witness map ({index: 32 bytes}) of tests/fixtures/valid_1.gz."""
    import msgpack

    return msgpack.unpackb(gzip.decompress(fixture_bytes("valid_1.gz"))[1:], strict_map_key=False)[0][0][1]


def crs_args(crs_dir):
    """bb's CRS arguments for `crs_dir` (None: bb's default)."""
    return ["-c", crs_dir] if crs_dir else []


def write_script(path, text):
    """Write an executable script `text` (dedented) at `path` (a pathlib.Path); return its str path."""
    path.write_text(textwrap.dedent(text))
    path.chmod(0o755)
    return str(path)


# ---------------------------------------------------------------- HTTP

def free_port():
    """A TCP port free on 127.0.0.1 right now (int)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port, method, path, body=None, headers=None, timeout=120, source=None):
    """One HTTP request to 127.0.0.1:`port` on a new connection (from address `source`, e.g. "127.0.0.2").

    Returns (status int, headers dict with lower-case names, body bytes).
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def request_json(port, method, path, body=None, headers=None, timeout=120, source=None):
    """request() with the body decoded as JSON."""
    status, headers, data = request(port, method, path, body, headers, timeout, source)
    return status, headers, json.loads(data)


def wait_for(predicate, timeout=10.0):
    """Call predicate() every 20 ms until it returns something true (then that) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    return False


def fd_paths(pid):
    """What process `pid`'s open descriptors name (list of str); one closed while they are read is left out."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass
    return found


def pids_in(path):
    """The pids listed one per line in the file at `path` (FAKE_BB_PIDFILE); [] if it does not exist."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [int(line) for line in f if line.strip()]


# ---------------------------------------------------------------- raw HTTP/1.1, one socket at a time

def connect(port, timeout=30.0):
    """A TCP connection to 127.0.0.1:`port` with Nagle off."""
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def request_head(path, headers, method="POST"):
    """The bytes of a request head for `path` with `headers` (dict)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: bb-worker"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Replies:
    """Reads the replies on one connection in order, keeping bytes that belong to the next one.

    interim: the 1xx statuses seen so far (skipped by next()).
    """

    def __init__(self, sock):
        self.sock, self.buf, self.interim = sock, b"", []

    def _more(self):
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            data = b""
        self.buf += data
        return bool(data)

    def next(self):
        """The next final reply: (status, headers dict with lower-case names, body bytes).

        Returns (None, {}, b"") when the server closed the connection first.
        """
        while True:
            while b"\r\n\r\n" not in self.buf:
                if not self._more():
                    return None, {}, b""
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            if status >= 200:
                break
            self.interim.append(status)
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length and self._more():
            pass
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body


def read_reply(sock):
    """The first final reply on `sock` (see Replies.next), for a connection used once."""
    return Replies(sock).next()


def probe_health(port, stop_at, interval, queue):
    """In its own process: GET /api/health every `interval` s; put (latencies in ms, statuses)."""
    latencies, statuses = [], Counter()
    while time.monotonic() < stop_at:
        started = time.perf_counter()
        try:
            with connect(port, timeout=10) as sock:
                sock.sendall(request_head("/api/health", {}, method="GET"))
                status = read_reply(sock)[0]
        except OSError as exc:
            status = type(exc).__name__
        latencies.append((time.perf_counter() - started) * 1000)
        statuses[str(status)] += 1
        time.sleep(interval)
    queue.put((latencies, dict(statuses)))


def percentile(values, p):
    """The `p`th percentile of `values` (None when empty)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else None


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


# ---------------------------------------------------------------- metrics (autoscaling: tests/live/test_scaling.py)

def metric_values(text):
    """{(sample name, frozenset of (label, value))): value} of a Prometheus text exposition (str)."""
    from prometheus_client.parser import text_string_to_metric_families  # a runtime dependency of the server

    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def read_metrics(port):
    """GET /api/metrics on 127.0.0.1:`port`: its metric_values() (dict); fails unless it answers 200."""
    status, _, body = request(port, "GET", "/api/metrics", timeout=30)
    assert status == 200, body[:500]
    return metric_values(body.decode())


# ---------------------------------------------------------------- packaging (tests/packaging/): images and deploy/

import re  # noqa: E402  (this section's own imports: the file's head belongs to every section)
import shlex  # noqa: E402

IMAGE_UID = 65532  # the production image's USER: distroless `nonroot`
# What the distroless python3-debian12 base adds to the image config (its BUILD
# rules: entrypoint /usr/bin/python3.11, env LANG=C.UTF-8; /tmp is mode 1777).
BASE_ENV = {"LANG": "C.UTF-8"}
DEPLOY = os.path.join(ROOT, "deploy")
K8S = os.path.join(DEPLOY, "k8s")
CLOUDFLARE = os.path.join(DEPLOY, "cloudflare")


class Instruction:
    """One Dockerfile instruction: `cmd` (upper case), `flags` {name: value}, `args` (str)."""

    def __init__(self, cmd, flags, args, line):
        self.cmd, self.flags, self.args, self.line = cmd, flags, args, line

    def json_args(self):
        """The exec-form (JSON array) argument list; fails on shell form."""
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(x, str) for x in value), self.args
        return value

    def __repr__(self):
        return f"<{self.cmd} {self.flags} {self.args!r} line {self.line}>"


class Stage:
    """One FROM and its instructions: `base`, `name` (AS ...), `platform` (--platform)."""

    def __init__(self, base, name, platform):
        self.base, self.name, self.platform = base, name, platform
        self.instructions = []

    def all(self, cmd):
        return [i for i in self.instructions if i.cmd == cmd]

    def one(self, cmd):
        found = self.all(cmd)
        assert len(found) == 1, f"expected one {cmd} in stage {self.name or self.base}, found {found}"
        return found[0]


class Dockerfile:
    """The instructions of a Dockerfile: global ARGs and stages."""

    def __init__(self, path):
        self.path = path
        self.global_args = {}
        self.stages = []
        for inst in parse_instructions(path):
            if inst.cmd == "FROM":
                words = inst.args.split()
                name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
                self.stages.append(Stage(words[0], name, inst.flags.get("platform")))
            elif not self.stages:
                assert inst.cmd == "ARG", f"{path}: only ARG may precede FROM, got {inst}"
                self.global_args.update(parse_assignments(inst.args, allow_bare=True))
            else:
                self.stages[-1].instructions.append(inst)

    def stage(self, name):
        return next(s for s in self.stages if s.name == name)

    @property
    def runtime(self):
        return self.stages[-1]

    def base_image(self, stage):
        """The stage's base image reference, global ARGs substituted."""
        return substitute(stage.base, self.global_args)


def parse_instructions(path):
    """Yield Instructions: continuation lines joined, comments dropped."""
    with open(path) as f:
        lines = f.read().splitlines()
    buf, start = "", 0
    for number, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        cmd, _, rest = buf.partition(" ")
        flags = {}
        rest = rest.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            name, _, value = flag[2:].partition("=")
            flags[name] = value
            rest = rest.strip()
        yield Instruction(cmd.upper(), flags, rest, start)
        buf = ""
    assert not buf, f"{path}: dangling continuation line"


def parse_assignments(text, allow_bare=False):
    """Parse `A=1 B="x y"` (ENV, ARG) into an ordered dict; a bare `NAME` (ARG) maps to None."""
    result = {}
    for word in shlex.split(text):
        name, eq, value = word.partition("=")
        assert eq or allow_bare, f"ENV must use NAME=value: {text!r}"
        result[name] = value if eq else None
    return result


_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def substitute(text, values):
    """Replace $NAME and ${NAME} with values[NAME] (as the Dockerfile does for ENV, ARG, COPY, WORKDIR)."""
    def repl(m):
        name = m.group(1) or m.group(2)
        assert name in values and values[name] is not None, f"undefined variable {name} in {text!r}"
        return values[name]
    return _VAR.sub(repl, text)


def load_dockerfile(name="Dockerfile"):
    """The Dockerfile `name` of the repository, parsed."""
    return Dockerfile(os.path.join(ROOT, name))


def runtime_config(dockerfile, build_args=None):
    """(entrypoint, cmd, env) of the final image: base image env + the runtime stage's ENV."""
    stage = dockerfile.runtime
    values = dict(dockerfile.global_args)
    env = dict(BASE_ENV)
    for inst in stage.instructions:
        if inst.cmd == "ARG":
            for name, default in parse_assignments(inst.args, allow_bare=True).items():
                values[name] = (build_args or {}).get(name, default if default is not None else "")
        elif inst.cmd == "ENV":
            for name, value in parse_assignments(inst.args).items():
                env[name] = values[name] = substitute(value, values)
    return stage.one("ENTRYPOINT").json_args(), stage.one("CMD").json_args(), env


def read_text(path):
    """The text of the file at `path`."""
    with open(path) as f:
        return f.read()


def k8s_objects():
    """{kind: object} of the manifests deploy/k8s/kustomization.yaml lists (one object per kind)."""
    import yaml  # a test dependency (requirements-dev.txt)

    kustomization = yaml.safe_load(read_text(os.path.join(K8S, "kustomization.yaml")))
    objects = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all(read_text(os.path.join(K8S, name))):
            assert doc["kind"] not in objects, f"two {doc['kind']} objects"
            objects[doc["kind"]] = doc
    return objects


def deployment_env():
    """{name: value} of the Deployment's container env (None for a valueFrom)."""
    [container] = k8s_objects()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def settings_for(env, tmp_path):
    """The server's settings for environment `env` (dict of str) and nothing else but a private
    TMPDIR: {attribute of bbworker.settings.Settings: value as JSON}, plus gunicorn.conf.py's
    `graceful_timeout`. Run in a process of its own, as gunicorn reads gunicorn.conf.py."""
    script = ("import dataclasses, json, runpy; ns = runpy.run_path('gunicorn.conf.py'); "
              "print(json.dumps(dict(dataclasses.asdict(ns['settings']), graceful_timeout=ns['graceful_timeout']), "
              "default=str))")
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(keep, TMPDIR=str(tmp_path), **env))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# ---------------------------------------------------------------- crowds, probes, downtime, bb by command
# (tests/live/test_connections.py, tests/programs/hostile.py, tests/load/test_soak.py)

import selectors  # noqa: E402  (this section's own imports)
from collections import namedtuple  # noqa: E402

Probe = namedtuple("Probe", "status ms")
Probe.__doc__ = "One probe: status (int; or the exception's name, or 'None' when the server closed first), ms (float)."


def silent_connections(port, count):
    """`count` TCP connections to 127.0.0.1:`port` that never send a byte (list of sockets, their
    connects in flight: the kernel completes them, accepted or not). The caller closes them."""
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.connect((HOST, port))
        except BlockingIOError:
            pass
        socks.append(sock)
    return socks


def unread_connections(port, count, path, requests):
    """`count` connections to 127.0.0.1:`port`, each sending `requests` pipelined GETs of `path` at
    once and reading none of the replies (a 4 KiB receive buffer): list of sockets, closed by the caller."""
    head = f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode() * requests
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((HOST, port))
        sock.setblocking(False)
        try:
            sock.send(head)
        except BlockingIOError:
            pass
        socks.append(sock)
    return socks


class Reopener(threading.Thread):
    """A client holding `count` silent connections to 127.0.0.1:`port`, opening a new one for each
    the server closes, until stop.set(). reopened: how many it opened again (int)."""

    def __init__(self, port, count):
        super().__init__(daemon=True)
        self.port, self.count = port, count
        self.stop = threading.Event()
        self.reopened = 0

    def run(self):
        selector = selectors.DefaultSelector()
        for sock in silent_connections(self.port, self.count):
            selector.register(sock, selectors.EVENT_READ)
        try:
            while not self.stop.is_set():
                for key, _ in selector.select(0.1):
                    try:
                        data = key.fileobj.recv(4096)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:  # dropped by the server: open another
                        selector.unregister(key.fileobj)
                        key.fileobj.close()
                        selector.register(silent_connections(self.port, 1)[0], selectors.EVENT_READ)
                        self.reopened += 1
        finally:
            for key in list(selector.get_map().values()):
                key.fileobj.close()
            selector.close()


def probe(port, path, timeout=2.0):
    """GET `path` on a new connection, as a load balancer's probe with a `timeout` (s): a Probe."""
    started = time.perf_counter()
    try:
        with connect(port, timeout=timeout) as sock:
            sock.sendall(request_head(path, {}, method="GET"))
            status = read_reply(sock)[0]  # None: closed first, or no reply within the timeout
    except OSError as exc:
        status = type(exc).__name__
    return Probe(status, (time.perf_counter() - started) * 1000)


def probe_series(port, paths, count, interval=0.1, timeout=2.0):
    """`count` probes (probe()) `interval` s apart, cycling through `paths`: a list of Probes."""
    found = []
    for i in range(count):
        found.append(probe(port, paths[i % len(paths)], timeout))
        time.sleep(interval)
    return found


def probe_figures(probes):
    """'n=.. p50=.. ms p99=.. ms max=.. ms, statuses {..}' for a list of Probes (str)."""
    ms = [p.ms for p in probes]
    statuses = Counter(str(p.status) for p in probes)
    return (f"n={len(probes)} p50={percentile(ms, 50):.1f} ms p99={percentile(ms, 99):.1f} ms "
            f"max={max(ms):.1f} ms, statuses {dict(statuses)}")


class Downtime(threading.Thread):
    """Polls GET `path` on 127.0.0.1:`port` every `interval` s (a new connection each, `timeout` s)
    until stop.set(). longest: the longest time (s) without an answer 200, from the start to the
    first one, between two, and from the last to the stop; polls, failures: counts (int)."""

    def __init__(self, port, path="/api/live", interval=0.02, timeout=10.0):
        super().__init__(daemon=True)
        self.port, self.path, self.interval, self.timeout = port, path, interval, timeout
        self.stop = threading.Event()
        self.longest = 0.0
        self.polls = self.failures = 0

    def run(self):
        last = time.monotonic()
        while not self.stop.is_set():
            answer = probe(self.port, self.path, self.timeout)
            now = time.monotonic()
            self.polls += 1
            if answer.status == 200:
                self.longest = max(self.longest, now - last)
                last = now
            else:
                self.failures += 1
            time.sleep(self.interval)
        self.longest = max(self.longest, time.monotonic() - last)


def bb_commands(binary, under):
    """The live bb processes below `under` (a pid) by bb command (argv[1], "prove", "verify", ...): a Counter."""
    found = Counter()
    for pid in bb_processes(binary, under=under):
        argv = argv_head(pid) or []
        found[argv[1].decode("latin-1") if len(argv) > 1 else "?"] += 1  # "?": gone meanwhile
    return found


class CommandSampler(threading.Thread):
    """Every `interval` s: how many bb processes run below `master` (bb: the binary's path), by
    command. peak: the most at once (int); peak_by: {command: the most at once}. stop.set(), join()."""

    def __init__(self, master, bb, interval=0.05):
        super().__init__(daemon=True)
        self.master, self.bb, self.interval = master, bb, interval
        self.stop = threading.Event()
        self.peak = 0
        self.peak_by = Counter()

    def run(self):
        while not self.stop.is_set():
            found = bb_commands(self.bb, self.master)
            self.peak = max(self.peak, sum(found.values()))
            for command, count in found.items():
                self.peak_by[command] = max(self.peak_by[command], count)
            time.sleep(self.interval)
