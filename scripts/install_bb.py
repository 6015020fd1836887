"""Install the Barretenberg CLI (`bb`) from the npm package @aztec/bb.js.

Runs `npm pack @aztec/bb.js@<version>` in a temp dir and extracts the native
binary `package/build/<arch>-linux/bb` for the build machine (x86_64 -> amd64,
aarch64 -> arm64, or --arch) to the target path (--dest, default `.bb/bb` beside
this project's app.py). Does nothing when a bb of the right version is already
there. When $BB_BINARY names an existing file (your own bb) and --dest is not
given, it is only checked, never replaced: a warning if its version differs. Exits non-zero with a one-line reason when npm is missing, the
download fails, or the extracted binary does not report the expected version.

Usage: python scripts/install_bb.py [--version 5.0.0] [--arch amd64|arm64] [--dest PATH]
"""
import argparse
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile

BB_VERSION = "5.0.0"
NPM_PACKAGE = "@aztec/bb.js"
ARCHES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DEST = os.path.join(PROJECT_DIR, ".bb", "bb")


class InstallError(Exception):
    """A reason the install cannot go on, printed as one line."""


def installed_version(path):
    """Return the string `bb --version` prints for `path`, or None if it does not run."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip() or None


def version_matches(found, wanted):
    """bb reports e.g. '5.0.0-nightly.20260710' for the npm release 5.0.0."""
    return found is not None and (found == wanted or found.startswith(wanted + "-"))


def npm_pack(version, workdir):
    """Download the @aztec/bb.js tarball into `workdir`; return its path."""
    npm = shutil.which("npm")
    if npm is None:
        raise InstallError("npm is not installed; it is needed to fetch bb "
                           f"(npm pack {NPM_PACKAGE}@{version}). Install Node.js/npm or set BB_BINARY.")
    proc = subprocess.run([npm, "pack", "--silent", f"{NPM_PACKAGE}@{version}"], cwd=workdir,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise InstallError(f"npm pack {NPM_PACKAGE}@{version} failed: {detail}")
    tarballs = [name for name in os.listdir(workdir) if name.endswith(".tgz")]
    if len(tarballs) != 1:
        raise InstallError(f"npm pack {NPM_PACKAGE}@{version} produced no tarball")
    return os.path.join(workdir, tarballs[0])


def extract_bb(tarball, arch, dest, check_version=None):
    """Copy package/build/<arch>-linux/bb out of `tarball` to `dest` (mode 0755), atomically.

    With check_version, the new binary must report that version before it replaces
    `dest`, so a failed upgrade never overwrites a bb that works.
    """
    member = f"package/build/{arch}-linux/bb"
    with tarfile.open(tarball, "r:gz") as tar:
        try:
            source = tar.extractfile(member)
        except KeyError:
            source = None
        if source is None:
            raise InstallError(f"{os.path.basename(tarball)} has no {member}")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".bb-")
        try:
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(source, out)
            os.chmod(tmp, 0o755)
            if check_version is not None:
                found = installed_version(tmp)
                if not version_matches(found, check_version):
                    raise InstallError(f"the extracted bb reports version {found!r}, expected "
                                       f"{check_version}: it may need a newer glibc than this machine has")
            os.replace(tmp, dest)
        except BaseException:
            os.unlink(tmp)
            raise


def install(version, arch, dest, check=True):
    """Make `dest` a bb of `version` for `arch`; return a status line.

    With check=False the binary is not run (cross-arch installs for an image).
    """
    if check:
        found = installed_version(dest)
        if version_matches(found, version):
            return f"bb {found} already at {dest}"
    with tempfile.TemporaryDirectory(prefix="bb-install-") as workdir:
        extract_bb(npm_pack(version, workdir), arch, dest, check_version=version if check else None)
    if not check:
        return f"bb {version} ({arch}) installed at {dest} (not run)"
    return f"bb {installed_version(dest)} installed at {dest}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=BB_VERSION, help="npm version of @aztec/bb.js")
    parser.add_argument("--arch", choices=sorted(set(ARCHES.values())),
                        help="binary architecture (default: this machine's)")
    parser.add_argument("--dest", help="where to put bb (default: $BB_BINARY or .bb/bb)")
    args = parser.parse_args(argv)
    own = os.environ.get("BB_BINARY")
    if args.dest is None and own and os.path.exists(own):
        found = installed_version(own)
        if not version_matches(found, args.version):
            print(f"install_bb: warning: BB_BINARY={own} reports {found!r}, not {args.version}; "
                  "left as it is", file=sys.stderr)
        print(f"bb {found} at BB_BINARY={own} (not replaced)")
        return 0
    args.dest = args.dest or own or DEFAULT_DEST
    native = ARCHES.get(platform.machine())
    arch = args.arch or native
    if arch is None:
        print(f"install_bb: no bb build for machine {platform.machine()!r}", file=sys.stderr)
        return 1
    try:
        print(install(args.version, arch, os.path.abspath(args.dest), check=(arch == native)))
    except (InstallError, OSError, subprocess.SubprocessError) as exc:
        print(f"install_bb: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
