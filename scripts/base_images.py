"""Build the Dockerfile's two base images from Debian 12 packages with mmdebstrap, cached.

No image registry is needed: the bases are made from Debian's own packages and
`podman import`ed as local images, for the Dockerfile's build args
BUILD_IMAGE and RUNTIME_IMAGE (make image-test uses this; so can you):

    build    mmdebstrap --variant=apt + deploy/base-images/build.packages
             (python3, pip, nodejs, npm): what node:20-bookworm-slim plus the
             Dockerfile's apt line give the build stage.
    runtime  deploy/base-images/runtime.packages unpacked the way distroless
             python3-debian12 is made: only those packages' files, no maintainer
             scripts, no shell, no package manager; users root and nonroot
             (65532), /tmp mode 1777, /etc/ssl/certs/ca-certificates.crt built
             from the ca-certificates package, /usr/bin/python3 -> python3.11.

Each base is cached as a tarball in $BASE_IMAGE_CACHE (default
/var/cache/bb-worker-images), named by a key over its package list, the
recipe (RECIPE below, the image config) and the architecture; a local podman image of that name is reused as it
is. Delete the cache directory to take Debian's newer package versions.

Usage: python3 scripts/base_images.py [--arch amd64|arm64] build|runtime
    Prints the image reference (localhost/bb-worker-base-<kind>:<key>-<arch>).
Exits non-zero with a one-line reason on failure.
"""
import argparse
import glob
import hashlib
import os
import subprocess
import sys
import tempfile
import time

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LISTS = os.path.join(PROJECT_DIR, "deploy", "base-images")
CACHE = os.environ.get("BASE_IMAGE_CACHE", "/var/cache/bb-worker-images")
SUITE = "bookworm"
MIRRORS = ["deb http://deb.debian.org/debian bookworm main",
           "deb http://deb.debian.org/debian bookworm-updates main",
           "deb http://deb.debian.org/debian-security bookworm-security main"]
RECIPE = 1  # bump when mmdebstrap's options or finish_runtime() change: the cached bases are rebuilt
NONROOT = 65532  # distroless `nonroot`
# What distroless python3-debian12:nonroot puts in its image config.
RUNTIME_CONFIG = ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                  "ENV LANG=C.UTF-8", "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
                  f"USER {NONROOT}:{NONROOT}", "WORKDIR /home/nonroot", 'ENTRYPOINT ["/usr/bin/python3.11"]']
BUILD_CONFIG = ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "ENV LANG=C.UTF-8",
                'CMD ["/bin/bash"]']


class BaseImageError(Exception):
    """A reason to stop, printed as one line."""


def packages(kind):
    """The package names listed in deploy/base-images/<kind>.packages (comments and blanks dropped)."""
    with open(os.path.join(LISTS, f"{kind}.packages")) as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


def cache_key(kind, arch):
    """16 hex digits over the package list, the recipe and the architecture."""
    digest = hashlib.sha256()
    with open(os.path.join(LISTS, f"{kind}.packages"), "rb") as f:
        digest.update(f.read())
    digest.update(f"\0{RECIPE}\0{arch}\0{SUITE}\0{MIRRORS}\0{RUNTIME_CONFIG if kind == 'runtime' else BUILD_CONFIG}".encode())
    return digest.hexdigest()[:16]


def run(argv, **kwargs):
    proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise BaseImageError(f"{argv[0]} {argv[1] if len(argv) > 1 else ''} failed ({proc.returncode}): {tail}")
    return proc.stdout


# ---------------------------------------------------------------- runtime: the distroless recipe

def finish_runtime(root):
    """mmdebstrap extract hook (on the host, `root` = the unpacked tree): keep only the listed packages."""
    wanted = set(packages("runtime"))
    debs = glob.glob(os.path.join(root, "var/cache/apt/archives/*.deb"))
    found = {}
    for deb in debs:
        found[run(["dpkg-deb", "-f", deb, "Package"]).strip()] = deb
    missing = wanted - set(found)
    if missing:
        raise BaseImageError(f"packages not downloaded: {sorted(missing)}")
    status = os.path.join(root, "var/lib/dpkg/status.d")
    for name, deb in sorted(found.items()):
        if name in wanted:  # control data for image scanners, as distroless keeps it
            os.makedirs(status, exist_ok=True)
            with open(os.path.join(status, name), "w") as f:
                f.write(run(["dpkg-deb", "-f", deb]))
            continue
        for line in run(["dpkg-deb", "-c", deb]).splitlines():  # a dependency nobody asked for
            path = line.split(None, 5)[5].split(" -> ")[0].split(" link to ")[0]
            target = os.path.join(root, path.lstrip("./"))
            if not line.startswith("d") and os.path.lexists(target):
                os.unlink(target)
    # What the packages' maintainer scripts would have made.
    certs = sorted(glob.glob(os.path.join(root, "usr/share/ca-certificates/*/*.crt")))
    if not certs:
        raise BaseImageError("no certificates in usr/share/ca-certificates")
    os.makedirs(os.path.join(root, "etc/ssl/certs"), exist_ok=True)
    with open(os.path.join(root, "etc/ssl/certs/ca-certificates.crt"), "w") as out:
        for cert in certs:
            with open(cert) as f:
                out.write(f.read().rstrip("\n") + "\n")
    os.unlink(os.path.join(root, "usr/sbin/update-ca-certificates"))  # a shell script, and its job is done
    os.symlink("python3.11", os.path.join(root, "usr/bin/python3"))
    files = {"etc/passwd": f"root:x:0:0:root:/root:/sbin/nologin\n"
                           f"nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
                           f"nonroot:x:{NONROOT}:{NONROOT}:nonroot:/home/nonroot:/sbin/nologin\n",
             "etc/group": f"root:x:0:\nnogroup:x:65534:\nnonroot:x:{NONROOT}:\n",
             "etc/nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n"}
    for path, text in files.items():
        with open(os.path.join(root, path), "w") as f:
            f.write(text)
    for path, mode, owner in (("tmp", 0o1777, 0), ("root", 0o700, 0), ("home/nonroot", 0o700, NONROOT)):
        full = os.path.join(root, path)
        os.makedirs(full, exist_ok=True)
        os.chown(full, owner, owner)
        os.chmod(full, mode)
    shells = [p for p in ("bin/sh", "usr/bin/sh", "bin/bash", "usr/bin/dpkg", "usr/bin/apt", "usr/bin/perl")
              if os.path.lexists(os.path.join(root, p))]
    if shells:
        raise BaseImageError(f"the runtime base still has {shells}")


# ---------------------------------------------------------------- building and caching

def mmdebstrap(kind, arch, dest):
    common = ["mmdebstrap", f"--arch={arch}", "--format=tar", "--mode=root", "--dpkgopt=force-unsafe-io"]
    if kind == "build":
        argv = common + ["--variant=apt", "--include=" + ",".join(packages("build"))]
    else:
        argv = common + ["--variant=extract", "--skip=chroot/start-stop-daemon,chroot/policy-rc.d", "--include=" + ",".join(packages("runtime")),
                         f'--extract-hook={sys.executable} {os.path.abspath(__file__)} finish-runtime "$1"']
    run(argv + [SUITE, dest] + MIRRORS, timeout=1800)


def ensure(kind, arch, log=sys.stderr):
    """Return the local image reference of the base `kind` for `arch`, building it if not cached."""
    key = cache_key(kind, arch)
    ref = f"localhost/bb-worker-base-{kind}:{key}-{arch}"
    if subprocess.run(["podman", "image", "exists", ref]).returncode == 0:
        print(f"base {ref}: cached image", file=log)
        return ref
    os.makedirs(CACHE, exist_ok=True)
    tarball = os.path.join(CACHE, f"{kind}-{key}-{arch}.tar")
    started = time.monotonic()
    if not os.path.exists(tarball):
        fd, tmp = tempfile.mkstemp(dir=CACHE, prefix=f".{kind}-", suffix=".tar")
        os.close(fd)
        try:
            mmdebstrap(kind, arch, tmp)
            os.replace(tmp, tarball)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        for old in glob.glob(os.path.join(CACHE, f"{kind}-*-{arch}.tar")):  # superseded keys
            if old != tarball:
                os.unlink(old)
        how = "mmdebstrap"
    else:
        how = "cached tarball"
    config = RUNTIME_CONFIG if kind == "runtime" else BUILD_CONFIG
    argv = ["podman", "import", "--quiet", "--os", "linux", "--arch", arch]
    for change in config:
        argv += ["--change", change]
    run(argv + [tarball, ref], timeout=600)
    print(f"base {ref}: {how} + podman import in {time.monotonic() - started:.0f} s "
          f"({os.path.getsize(tarball) / 1e6:.0f} MB tar)", file=log)
    return ref


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["finish-runtime"]:
            finish_runtime(argv[1])
            return 0
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--arch", default="amd64", choices=["amd64", "arm64"])
        parser.add_argument("kind", choices=["build", "runtime"])
        args = parser.parse_args(argv)
        print(ensure(args.kind, args.arch))
    except (BaseImageError, OSError, subprocess.SubprocessError) as exc:
        print(f"base_images: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
