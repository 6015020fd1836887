"""Shared test fixtures: the real bb, a writable CRS, live gunicorn servers, bb verify."""
import http.client
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
CIRCUIT = os.path.join(ROOT, "circuit.json")
SHARED_CRS = os.path.join(os.path.dirname(ROOT), "shared", "crs")
BB = os.environ.get("BB_BINARY") or os.path.join(ROOT, ".bb", "bb")
VALID = ["valid_1.gz", "valid_2.gz", "valid_3.gz"]

sys.path.insert(0, ROOT)


def fixture_bytes(name):
    with open(os.path.join(FIXTURES, name), "rb") as f:
        return f.read()


def expected():
    with open(os.path.join(FIXTURES, "expected.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------- bb and the CRS

@pytest.fixture(scope="session")
def bb():
    """Path of the real bb. Fails (never skips): `make test` installs it."""
    assert os.access(BB, os.X_OK), f"bb not found at {BB}: run `make setup` (scripts/install_bb.py)"
    return BB


@pytest.fixture(scope="session")
def crs_dir(tmp_path_factory):
    """A CRS dir bb can use offline: a writable copy of ../shared/crs, else $BB_CRS_PATH, else None."""
    if os.path.exists(os.path.join(SHARED_CRS, "bn254_g1.dat")):
        target = tmp_path_factory.mktemp("crs")
        for name in ("bn254_g1.dat", "bn254_g2.dat"):
            shutil.copyfile(os.path.join(SHARED_CRS, name), target / name)
        return str(target)
    return os.environ.get("BB_CRS_PATH") or None  # None: bb's default ~/.bb-crs


def crs_args(crs_dir):
    return ["-c", crs_dir] if crs_dir else []


@pytest.fixture(scope="session")
def reference_vk(bb, crs_dir, tmp_path_factory):
    """The demo circuit's VK, computed here with `bb write_vk` (not taken from the server)."""
    out = tmp_path_factory.mktemp("vk")
    subprocess.run([bb, "write_vk", "-b", CIRCUIT, "-o", str(out)] + crs_args(crs_dir),
                   check=True, capture_output=True, timeout=120)
    return str(out / "vk")


@pytest.fixture(scope="session")
def verify(bb, crs_dir, reference_vk, tmp_path_factory):
    """verify(proof: bytes, public_inputs: list of 0x-hex, vk=reference, extra=[]) -> bool, by `bb verify`."""
    def run(proof, public_inputs, vk=None, extra=()):
        d = tmp_path_factory.mktemp("verify")
        (d / "proof").write_bytes(proof)
        (d / "public_inputs").write_bytes(b"".join(bytes.fromhex(x[2:]) for x in public_inputs))
        proc = subprocess.run([bb, "verify", "-k", vk or reference_vk, "-p", str(d / "proof"),
                               "-i", str(d / "public_inputs")] + list(extra) + crs_args(crs_dir),
                              capture_output=True, timeout=120)
        return proc.returncode == 0
    return run


# ---------------------------------------------------------------- fake bb for fault injection

FAKE_BB = """\
#!{python}
# Fake bb for fault injection: behaves like bb for --version and write_vk, then
# does what FAKE_BB_MODE says for prove.
import os, signal, subprocess, sys, time
args = sys.argv[1:]
if args == ["--version"]:
    print("5.0.0-fake"); sys.exit(0)
out = args[args.index("-o") + 1] if "-o" in args else None
if args[0] == "write_vk":
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "vk"), "wb").write(b"vk"); open(os.path.join(out, "vk_hash"), "wb").write(b"h" * 32)
    sys.exit(0)
mode_file = os.environ.get("FAKE_BB_MODE_FILE")
mode = open(mode_file).read().strip() if mode_file else os.environ.get("FAKE_BB_MODE", "ok")
pidfile = os.environ.get("FAKE_BB_PIDFILE")
if pidfile:
    with open(pidfile, "a") as f:
        f.write(f"{{os.getpid()}}\\n")
log = os.environ.get("FAKE_BB_LOG")  # "start <t>" / "end <t>" lines, to check overlap
if log:
    with open(log, "a") as f:
        f.write(f"start {{time.time()}}\\n")
if mode == "sleep":
    time.sleep(3600)
if mode == "grandchild":
    child = subprocess.Popen(["sleep", "3600"])
    with open(pidfile, "a") as f:
        f.write(f"{{child.pid}}\\n")
    time.sleep(3600)
if mode == "segv":
    os.kill(os.getpid(), signal.SIGSEGV)
if mode == "fail":
    sys.stderr.write("Scheme is: ultra_honk (mem: 5 MiB)\\nAssertion failed: (x)\\n  Reason  : bad witness at " + out + " (mem: 7 MiB)\\n")
    sys.exit(1)
if mode == "nooutput":
    sys.exit(0)
delay = float(os.environ.get("FAKE_BB_DELAY", "0"))
time.sleep(delay)
os.makedirs(out, exist_ok=True)
open(os.path.join(out, "proof"), "wb").write(b"P" * 64)
open(os.path.join(out, "public_inputs"), "wb").write(bytes(31) + b"\\x07")
if log:
    with open(log, "a") as f:
        f.write(f"end {{time.time()}}\\n")
"""


@pytest.fixture
def fake_bb(tmp_path):
    """Path of an executable fake bb (see FAKE_BB); mode via FAKE_BB_MODE in its env."""
    path = tmp_path / "fake-bb"
    path.write_text(FAKE_BB.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


# ---------------------------------------------------------------- live servers

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port, method, path, body=None, headers=None, timeout=120):
    """One HTTP request on a new connection; returns (status, headers dict lower-cased, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def request_json(port, method, path, body=None, headers=None, timeout=120):
    status, headers, data = request(port, method, path, body, headers, timeout)
    return status, headers, json.loads(data)


class Server:
    """A real gunicorn running gunicorn.conf.py in its own session."""

    def __init__(self, tmp, env):
        self.port = free_port()
        self.tmpdir = os.path.join(tmp, "tmpdir")
        os.makedirs(self.tmpdir, exist_ok=True)
        self.work_dir = os.path.join(self.tmpdir, "bb-proofs")
        self.log_path = os.path.join(tmp, "server.log")
        self.env = dict(os.environ, PORT=str(self.port), TMPDIR=self.tmpdir, PYTHONUNBUFFERED="1")
        self.env.update(env)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"],
                                     cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.output()}")
            try:
                request(self.port, "GET", "/api/health", timeout=5)
                return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"server not ready in {timeout} s:\n{self.output()}")

    def output(self):
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def leftovers(self):
        """Files left in the per-request temp area."""
        return sorted(os.listdir(self.work_dir)) if os.path.isdir(self.work_dir) else []

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        self.log.close()


@pytest.fixture
def start_server(tmp_path, crs_dir, bb):
    """start_server(**env) -> a ready Server with the real bb and CRS unless env overrides them."""
    servers = []

    def start(ready=True, **env):
        base = {"BB_BINARY": bb}
        if crs_dir:
            base["BB_CRS_PATH"] = crs_dir
        base.update({k: str(v) for k, v in env.items()})
        server = Server(str(tmp_path / f"server{len(servers)}"), base)
        servers.append(server)
        return server.wait_ready() if ready else server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, crs_dir):
    """One real server shared by a module's tests (real bb, real CRS)."""
    assert os.access(BB, os.X_OK), f"bb not found at {BB}: run `make setup`"
    env = {"BB_BINARY": BB}
    if crs_dir:
        env["BB_CRS_PATH"] = crs_dir
    srv = Server(str(tmp_path_factory.mktemp("server")), env).wait_ready()
    yield srv
    srv.stop()


def alive(pid):
    """True if `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def parent_pid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return 0


def bb_processes(binary, under=None):
    """PIDs of live (non-zombie) processes with `binary` as argv[0] or argv[1] (a script).

    With `under` (a pid), only its descendants: other tests or benchmarks may run bb too.
    """
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")[:2]
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if binary.encode() not in argv or state == "Z":
            continue
        if under is not None:
            ancestor = int(pid)
            while ancestor > 1 and ancestor != under:
                ancestor = parent_pid(ancestor)
            if ancestor != under:
                continue
        pids.append(int(pid))
    return pids


def write_script(path, text):
    path.write_text(textwrap.dedent(text))
    path.chmod(0o755)
    return str(path)
