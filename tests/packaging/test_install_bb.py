"""scripts/install_bb.py: skips a good bb, needs npm only to download, checks what it installs."""
import importlib.util
import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile

import pytest

from support import ROOT, write_script

SCRIPT = os.path.join(ROOT, "scripts", "install_bb.py")


def load_install_bb():
    spec = importlib.util.spec_from_file_location("install_bb", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


install_bb = load_install_bb()
ARCH = install_bb.ARCHES.get(platform.machine())


def run_install(dest, path, *args):
    """Run the script with PATH=`path` (plus nothing else); return the CompletedProcess."""
    env = {k: v for k, v in os.environ.items() if k != "BB_BINARY"}
    env["PATH"] = str(path)
    return subprocess.run([sys.executable, SCRIPT, "--dest", str(dest)] + list(args), env=env,
                          capture_output=True, text=True, timeout=300)


def make_tarball(path, members):
    """A .tgz like npm pack's, with `members` {name: (bytes, mode)}."""
    with tarfile.open(path, "w:gz") as tar:
        for name, (data, mode) in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def fake_npm(bin_dir, log, tarball=None, fail=None):
    """An `npm` that logs its arguments, then copies `tarball` into the cwd or fails with `fail`."""
    bin_dir.mkdir(exist_ok=True)
    action = f'echo "{fail}" >&2; exit 1' if fail else f'/bin/cp "{tarball}" ./aztec-bb.js-5.0.0.tgz'
    return write_script(bin_dir / "npm", f'#!/bin/sh\necho "$@" >> "{log}"\n{action}\n')


def fake_bb(version):
    return f"#!/bin/sh\necho {version}\n".encode()


@pytest.fixture
def empty_path(tmp_path):
    path = tmp_path / "empty-bin"
    path.mkdir()
    return path


# ---------------------------------------------------------------- version_matches

@pytest.mark.parametrize("found, wanted, result", [
    ("5.0.0-nightly.20260710", "5.0.0", True), ("5.0.0", "5.0.0", True),
    ("5.0.1", "5.0.0", False), ("5.0.00", "5.0.0", False), ("5.0.0.1", "5.0.0", False),
    ("15.0.0", "5.0.0", False), ("4.9.9-nightly", "5.0.0", False), (None, "5.0.0", False), ("", "5.0.0", False),
])
def test_version_matches(found, wanted, result):
    assert install_bb.version_matches(found, wanted) is result


# ---------------------------------------------------------------- no download needed

def test_an_installed_bb_is_kept_without_npm(bb, tmp_path):
    dest = tmp_path / "bb"
    shutil.copy2(bb, dest)
    before = os.stat(dest)
    log = tmp_path / "npm.log"
    bin_dir = tmp_path / "bin"
    fake_npm(bin_dir, log, fail="must not be called")
    proc = run_install(dest, bin_dir)
    assert proc.returncode == 0, proc.stderr
    assert "already" in proc.stdout
    assert not log.exists(), "npm was called"
    assert os.stat(dest).st_mtime_ns == before.st_mtime_ns


def test_without_npm_a_missing_bb_is_a_clear_error(tmp_path, empty_path):
    dest = tmp_path / "sub" / "bb"
    proc = run_install(dest, empty_path)
    assert proc.returncode == 1
    assert "npm" in proc.stderr
    assert proc.stderr.startswith("install_bb: ") and proc.stderr.count("\n") == 1
    assert not dest.exists()


# ---------------------------------------------------------------- with a fake npm

def test_npm_failure_is_reported(tmp_path):
    log = tmp_path / "npm.log"
    fake_npm(tmp_path / "bin", log, fail="npm error 404 Not Found")
    proc = run_install(tmp_path / "bb", tmp_path / "bin")
    assert proc.returncode == 1
    assert "npm pack @aztec/bb.js@5.0.0 failed: npm error 404 Not Found" in proc.stderr
    assert log.read_text().split() == ["pack", "--silent", "@aztec/bb.js@5.0.0"]


@pytest.mark.skipif(ARCH is None, reason=f"no bb build for {platform.machine()}")
def test_a_tarball_without_the_binary_is_reported(tmp_path):
    other = "arm64" if ARCH == "amd64" else "amd64"
    tarball = make_tarball(tmp_path / "pkg.tgz", {f"package/build/{other}-linux/bb": (fake_bb("5.0.0"), 0o755),
                                                  "package/package.json": (b"{}", 0o644)})
    fake_npm(tmp_path / "bin", tmp_path / "npm.log", tarball)
    dest_dir = tmp_path / "dest"
    proc = run_install(dest_dir / "bb", tmp_path / "bin")
    assert proc.returncode == 1
    assert f"has no package/build/{ARCH}-linux/bb" in proc.stderr
    assert not (dest_dir / "bb").exists()
    assert not dest_dir.exists() or os.listdir(dest_dir) == []


@pytest.mark.skipif(ARCH is None, reason=f"no bb build for {platform.machine()}")
def test_a_binary_of_the_wrong_version_is_reported(tmp_path):
    tarball = make_tarball(tmp_path / "pkg.tgz", {f"package/build/{ARCH}-linux/bb": (fake_bb("4.2.0"), 0o644)})
    fake_npm(tmp_path / "bin", tmp_path / "npm.log", tarball)
    proc = run_install(tmp_path / "bb", tmp_path / "bin")
    assert proc.returncode == 1
    assert "reports version '4.2.0', expected 5.0.0" in proc.stderr


@pytest.mark.skipif(ARCH is None, reason=f"no bb build for {platform.machine()}")
def test_the_binary_is_extracted_executable_and_checked(tmp_path):
    tarball = make_tarball(tmp_path / "pkg.tgz", {f"package/build/{ARCH}-linux/bb": (fake_bb("5.0.0-nightly.1"), 0o644)})
    log = tmp_path / "npm.log"
    fake_npm(tmp_path / "bin", log, tarball)
    dest = tmp_path / "deep" / "dir" / "bb"
    proc = run_install(dest, tmp_path / "bin")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"bb 5.0.0-nightly.1 installed at {dest}"
    assert dest.stat().st_mode & 0o777 == 0o755
    assert os.listdir(dest.parent) == ["bb"], "no temp file left beside it"
    proc = run_install(dest, tmp_path / "bin")
    assert "already" in proc.stdout
    assert len(log.read_text().splitlines()) == 1


# ---------------------------------------------------------------- the real download

@pytest.mark.skipif(ARCH is None, reason=f"no bb build for {platform.machine()}")
def test_real_install_from_npm(tmp_path):
    assert shutil.which("npm"), "npm is needed to install bb (as `make setup` does)"
    dest = tmp_path / "bb"
    proc = run_install(dest, os.environ["PATH"])
    assert proc.returncode == 0, proc.stderr
    assert "installed at" in proc.stdout
    version = subprocess.run([str(dest), "--version"], capture_output=True, text=True, timeout=30).stdout
    assert install_bb.version_matches(version.strip(), install_bb.BB_VERSION), version


def test_users_own_bb_binary_is_checked_never_replaced(tmp_path):
    own = tmp_path / "my-bb"
    own.write_text("#!/bin/sh\necho 4.2.0\n")
    own.chmod(0o755)
    env = dict(os.environ, BB_BINARY=str(own), PATH="/nonexistent")  # no npm: nothing may be fetched
    proc = subprocess.run([sys.executable, SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "not replaced" in proc.stdout and "4.2.0" in proc.stderr
    assert own.read_text() == "#!/bin/sh\necho 4.2.0\n"
