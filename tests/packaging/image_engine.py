"""The images built by scripts/build_image.py, run with podman: as production runs them, and plainly.

Not collected by `make test` (the file name has no test_ prefix): `make image-test` builds
the images for IMAGE_ARCHES (tag IMAGE_TAG-<arch>) and Dockerfile.dev's (IMAGE_TAG-dev), then
runs this file.

Each image run plainly, as the Rust worker's README runs its own (`docker run -p 8080:8080
worker-v2`: the image's own command, port 8080 published on a free host port, no mount, no
settings; only the host's hard ulimits, which this machine refuses to raise): health 200,
and a fixture witness proved over HTTP whose proof the host's `bb verify` accepts.

Per arch, the production container run read-only with a tmpfs /tmp, as the image's user
65532, on the host's network (PORT set to a free port):

- the image: OCI labels, user, no shell or package manager, /tmp mode 1777, /app read-only;
- health 200 with the image's bb for its arch; the HEALTHCHECK command passes;
- a fixture witness proved over HTTP, and the proof accepted by the host's `bb verify`
  with the VK the server serves (byte-identical to the one computed here);
- SIGTERM while a proof request is in flight: the request completes with a valid
  proof, new connections are refused, the container exits 0 with nothing left in /tmp.

And the developer container runs `make test` on the mounted checkout (a subset: the
HTTP contract with the real bb, and the server's hooks).
"""
import base64
import json
import os
import resource
import socket
import subprocess
import time

import pytest

from support import ROOT, expected, fixture_bytes, free_port, request, request_json

TAG = os.environ.get("IMAGE_TAG", "localhost/bb-worker:test")
ARCHES = os.environ.get("IMAGE_ARCHES", "amd64").split()
MACHINE = {"amd64": "x86_64", "arm64": "aarch64"}
NATIVE = {machine: arch for arch, machine in MACHINE.items()}[os.uname().machine]  # Dockerfile.dev's arch
UID = 65532
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
WITNESS = fixture_bytes("valid_1.gz")
NO_PROGRAMS = ("bin/sh", "usr/bin/sh", "bin/bash", "usr/bin/bash", "bin/dash", "usr/bin/dash", "bin/busybox",
               "usr/bin/dpkg", "usr/bin/apt", "usr/bin/apt-get", "usr/bin/perl", "usr/bin/pip3")


def podman(*args, check=True, timeout=120):
    proc = subprocess.run(PODMAN + list(args), capture_output=True, text=True, timeout=timeout)
    assert not check or proc.returncode == 0, f"podman {' '.join(args)}: {proc.stderr}"
    return proc


def ulimits():
    """Hard limits as they are: the host refuses to raise them (nproc at most pid_max)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with open("/proc/sys/kernel/pid_max") as f:
        nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], int(f.read()))
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


class Container:
    """One container of the image, started the production way: read-only root, a tmpfs /tmp, the
    host's network with PORT a free port. plain: as `docker run -p 8080:8080 <image>` instead (the
    image of `arch`, "dev" for Dockerfile.dev's), with the host port a free one."""

    def __init__(self, arch, plain=False):
        self.arch = arch
        self.image = f"{TAG}-{arch}"
        self.port = free_port()
        if plain:
            args = ["-p", f"127.0.0.1:{self.port}:8080", *ulimits()]
        else:
            args = ["--platform", f"linux/{arch}", "--read-only", "--tmpfs", "/tmp", "--network", "host",
                    "-e", f"PORT={self.port}", *ulimits()]
        self.id = podman("run", "--detach", *args, self.image).stdout.strip()

    def wait_ready(self, timeout=120):
        """The first answer of GET /api/health (status, headers, JSON) other than 503 "starting"."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                reply = request_json(self.port, "GET", "/api/health", timeout=10)
                if reply[0] == 503 and reply[2].get("status") == "starting":  # the dev image computes its VK
                    time.sleep(0.2)
                    continue
                return reply
            except OSError:
                assert self.running(), f"the container exited:\n{self.logs()}"
                time.sleep(0.2)
        raise AssertionError(f"not ready in {timeout} s:\n{self.logs()}")

    def running(self):
        return podman("inspect", "--format", "{{.State.Running}}", self.id).stdout.strip() == "true"

    def logs(self):
        proc = podman("logs", self.id, check=False)
        return proc.stdout + proc.stderr

    def python(self, code):
        """Run python3 in the container (it has no shell), as the image's user; returns stdout."""
        return podman("exec", self.id, "/usr/bin/python3", "-c", code, timeout=60).stdout

    def pid(self):
        return int(podman("inspect", "--format", "{{.State.Pid}}", self.id).stdout)

    def remove(self):
        podman("rm", "--force", "--time", "0", self.id, check=False)


@pytest.fixture(scope="module", params=ARCHES)
def container(request):
    started = time.monotonic()
    box = Container(request.param)
    try:
        box.health = box.wait_ready()
        box.start_seconds = time.monotonic() - started
        yield box
    finally:
        box.remove()


@pytest.fixture(scope="module")
def image_config(container):
    return json.loads(podman("image", "inspect", container.image).stdout)[0]


def test_image_config(container, image_config):
    config = image_config["Config"]
    labels = config["Labels"]
    revision = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert labels["org.opencontainers.image.revision"] == revision
    assert labels["org.opencontainers.image.version"] and labels["org.opencontainers.image.title"] == "bb-worker"
    assert "org.opencontainers.image.source" in labels
    assert labels["bb-worker.bb.version"] == "5.0.0"
    assert config["User"] == f"{UID}:{UID}"
    assert image_config["Architecture"] == container.arch
    print(f"\n{container.image}: {image_config['Size'] / 1e6:.1f} MB, ready in {container.start_seconds:.1f} s")


def test_no_shell_and_no_package_manager(container):
    mount = podman("image", "mount", container.image).stdout.strip()
    try:
        present = [p for p in NO_PROGRAMS if os.path.lexists(os.path.join(mount, p))]
        assert present == [], f"the image has {present}"
        assert os.stat(os.path.join(mount, "tmp")).st_mode & 0o7777 == 0o1777
        for dirpath, dirnames, filenames in os.walk(os.path.join(mount, "app")):
            for name in dirnames + filenames:
                st = os.lstat(os.path.join(dirpath, name))
                assert st.st_uid == 0 and not st.st_mode & 0o022, f"{dirpath}/{name} is writable by the server"
    finally:
        podman("image", "unmount", container.image, check=False)
    proc = podman("exec", container.id, "/bin/sh", "-c", "true", check=False)
    assert proc.returncode != 0


def test_runs_as_nonroot_on_a_read_only_root(container):
    with open(f"/proc/{container.pid()}/status") as f:
        uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
    assert set(uids) == {str(UID)}
    out = container.python("import os\nfor p in ('/app/x', '/x', '/tmp/x'):\n"
                           "    try:\n        open(p, 'w').close(); print(p, 'ok')\n"
                           "    except OSError as e:\n        print(p, e.errno)")
    assert out.split("\n")[:3] == ["/app/x 30", "/x 30", "/tmp/x ok"]  # EROFS but on /tmp


def test_health_reports_the_image_bb(container):
    status, _, body = container.health
    assert status == 200, body
    assert body["architecture"] == MACHINE[container.arch]
    assert body["bb"]["available"] is True and body["bb"]["version"].startswith("5.0.0")
    assert body["bb"]["binary_arch"].startswith("/app/bin/bb: ELF 64-bit")


def test_healthcheck_command_passes(container, image_config):
    check = image_config["Healthcheck"]["Test"]  # docker format (buildah bud --format docker)
    assert check[0] == "CMD"
    podman("exec", container.id, *check[1:])


def test_proves_a_witness_that_bb_verifies(container, reference_vk, verify, tmp_path):
    started = time.monotonic()
    status, _, body = request_json(container.port, "POST", "/api/prove", WITNESS,
                                   {"Content-Type": "application/gzip"}, timeout=300)
    seconds = time.monotonic() - started
    assert status == 200, (body, container.logs())
    assert body["publicInputs"] == expected()["valid_1.gz"]["public_inputs"]
    status, _, served = request_json(container.port, "GET", "/api/vk")
    assert status == 200
    vk = tmp_path / "vk"
    vk.write_bytes(base64.b64decode(served["vk"]))
    with open(reference_vk, "rb") as f:
        assert vk.read_bytes() == f.read(), "the baked VK differs from the one the host's bb computes"
    assert verify(base64.b64decode(body["proof"]), body["publicInputs"], vk=str(vk))
    leftovers = ("import glob, os, json; print(json.dumps([n for d in glob.glob('/tmp/bb-worker-run-*/w*') "
                 "for n in os.listdir(d)]))")  # each worker's request files (bbworker.server.rundir.ServerDir)
    assert json.loads(container.python(leftovers)) == []
    print(f"\n{container.arch}: one proof over HTTP in {seconds:.2f} s")


def test_sigterm_drains_the_request_in_flight(container):
    """Last test of the module: the container stops."""
    head = (f"POST /api/prove HTTP/1.1\r\nHost: x\r\nContent-Type: application/gzip\r\n"
            f"Content-Length: {len(WITNESS)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", container.port), timeout=120) as s:
        s.sendall(head + WITNESS[:-1])  # in flight: the server is reading its body
        time.sleep(0.5)
        podman("kill", "--signal", "TERM", container.id)
        stopped = time.monotonic()
        deadline = stopped + 30
        while time.monotonic() < deadline:  # the listener closes, the worker keeps the request
            try:
                request(container.port, "GET", "/api/health", timeout=2)
                time.sleep(0.2)
            except OSError:
                break
        else:
            raise AssertionError("still accepting connections 30 s after SIGTERM")
        s.sendall(WITNESS[-1:])
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.split()[1] == b"200", reply[:500]
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert body["success"] is True and body["publicInputs"] == expected()["valid_1.gz"]["public_inputs"]
    code = podman("wait", container.id, timeout=180).stdout.strip()
    assert code == "0", container.logs()
    assert time.monotonic() - stopped < 60


# ---------------------------------------------------------------- run plainly, as the Rust worker's README does

@pytest.mark.parametrize("arch", ARCHES + ["dev"])
def test_runs_plainly_and_proves(arch, verify):
    """`docker run -p 8080:8080 <image>`, then `curl .../api/health` and `curl -X POST .../api/prove
    --data-binary @witness.gz -H 'Content-Type: application/gzip'`, for each image."""
    started = time.monotonic()
    box = Container(arch, plain=True)
    try:
        status, _, health = box.wait_ready()
        ready = time.monotonic() - started
        assert status == 200, (health, box.logs())
        native = MACHINE[NATIVE] if arch == "dev" else MACHINE[arch]
        assert health["architecture"] == native and health["bb"]["version"].startswith("5.0.0")
        status, _, body = request_json(box.port, "POST", "/api/prove", WITNESS,
                                       {"Content-Type": "application/gzip"}, timeout=300)
        assert status == 200, (body, box.logs())
        assert body["success"] is True and body["publicInputs"] == expected()["valid_1.gz"]["public_inputs"]
        assert verify(base64.b64decode(body["proof"]), body["publicInputs"])  # the VK the host's bb computes
        print(f"\n{box.image} run plainly: ready in {ready:.1f} s, a proof in {time.monotonic() - started - ready:.2f} s")
    finally:
        box.remove()


# ---------------------------------------------------------------- the developer container

DEV_TESTS = "tests/live/test_api.py tests/server/test_hooks.py"


def test_dev_container_runs_make_test_on_the_mounted_checkout():
    shared = os.path.join(os.path.dirname(ROOT), "shared")
    for name in ("requirements.txt", "requirements-dev.txt"):  # newer than the image's venv, as in any fresh clone
        os.utime(os.path.join(ROOT, name))
    started = time.monotonic()
    proc = podman("run", "--rm", "--network", "host", *ulimits(), "-v", f"{ROOT}:/work/bb-worker",
                  "-v", f"{shared}:/work/shared:ro", f"{TAG}-dev",
                  "make", "test", f"PYTEST_ARGS=-p no:cacheprovider -q {DEV_TESTS}", check=False, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout.splitlines()[-1] and "skipped" not in proc.stdout.splitlines()[-1]
    assert "pip install" not in proc.stdout, "the image's venv was installed again"
    print(f"\ndev container: make test ({DEV_TESTS}) in {time.monotonic() - started:.0f} s: "
          f"{proc.stdout.splitlines()[-1]}")
