"""Build the production image from the Dockerfile with buildah, for each architecture asked for.

What `make image-test` runs before it starts the images (tests/packaging/image_engine.py), on a
Debian 12 machine as root with no image registry in reach:

1. installs what is missing with apt: podman, buildah, runc, mmdebstrap,
   qemu-user-static and binfmt-support (`apt-get update` first), and registers
   qemu's binfmt handler for a foreign architecture (mounting binfmt_misc if needed);
2. makes the Dockerfile's base images from Debian's packages (scripts/base_images.py,
   cached outside the clone in $BASE_IMAGE_CACHE);
3. puts the CRS in deploy/crs/ (a copy of ../shared/crs, when there is none yet), the
   offline build the Dockerfile documents, and runs `buildah bud` for each arch with
   the bases as BUILD_IMAGE/RUNTIME_IMAGE and the OCI label values from git. The host's
   CA bundle is mounted for pip and npm (the registries are reached through it here).

Prints each step's time and each image's size; exits non-zero when any step fails.

Usage: python3 scripts/build_image.py [--arch amd64] [--arch arm64] [--dev] [--tag localhost/bb-worker:test]
    The image of arch A is tagged <tag>-A; with --dev, Dockerfile.dev's is <tag>-dev.
"""
import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

import base_images  # beside this script: Python puts the script's own directory on sys.path

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_CRS = os.path.join(os.path.dirname(PROJECT_DIR), "shared", "crs")

APT_PACKAGES = {"podman": "podman", "buildah": "buildah", "runc": "runc", "mmdebstrap": "mmdebstrap",
                "qemu-aarch64-static": "qemu-user-static", "update-binfmts": "binfmt-support"}
NATIVE = {"x86_64": "amd64", "aarch64": "arm64"}[platform.machine()]
QEMU = {"amd64": "qemu-x86_64", "arm64": "qemu-aarch64"}
BINFMT = "/proc/sys/fs/binfmt_misc"


def step(what, argv, quiet=False, **kwargs):
    """Run argv, echoing it; exit non-zero when it fails (quiet: its output only then)."""
    print(f"+ {' '.join(argv)}", flush=True)
    if quiet:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run(argv, **kwargs)
    if proc.returncode != 0:
        if quiet:
            print(proc.stdout[-5000:], file=sys.stderr)
        sys.exit(f"build_image: {what} failed (exit {proc.returncode})")
    return proc


def install_tools():
    missing = sorted({pkg for tool, pkg in APT_PACKAGES.items() if shutil.which(tool) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"build_image: missing {missing}: run as root (apt-get install) or install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    step("apt-get update", ["apt-get", "update", "-qq"], quiet=True, env=env)
    step("apt-get install", ["apt-get", "install", "-y", "-qq", "--no-install-recommends"] + missing, quiet=True, env=env)


def enable_emulation(arch):
    """Register qemu-user-static's binfmt handler for `arch` (a foreign one)."""
    if not os.path.exists(os.path.join(BINFMT, "register")):
        step("mount binfmt_misc", ["mount", "-t", "binfmt_misc", "binfmt_misc", BINFMT])
    entry = os.path.join(BINFMT, QEMU[arch])
    if os.path.exists(entry):
        with open(entry) as f:
            if f.readline().strip() == "enabled":
                return
    step(f"update-binfmts --enable {QEMU[arch]}", ["update-binfmts", "--enable", QEMU[arch]])


def ulimit_args():
    """--ulimit values at the hard limits: raising a limit is refused on some hosts (and nproc
    above the kernel's pid_max too)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    with open("/proc/sys/kernel/pid_max") as f:
        pid_max = int(f.read())
    nproc = pid_max if nproc == resource.RLIM_INFINITY else min(nproc, pid_max)
    nofile = 1048576 if nofile == resource.RLIM_INFINITY else nofile
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


def ca_bundle():
    """The CA bundle pip is configured with on this machine (None: the image's own)."""
    for path in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if path and os.path.isfile(path):
            return path
    return None


def git(*args):
    proc = subprocess.run(["git", "-C", PROJECT_DIR, *args], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def provide_crs():
    """deploy/crs/ gets the shared CRS subset when it has no CRS (deploy/crs/README.md)."""
    dest = os.path.join(PROJECT_DIR, "deploy", "crs")
    if os.path.exists(os.path.join(dest, "bn254_g1.dat")) or not os.path.exists(os.path.join(SHARED_CRS, "bn254_g1.dat")):
        return
    for name in ("bn254_g1.dat", "bn254_g2.dat"):
        shutil.copyfile(os.path.join(SHARED_CRS, name), os.path.join(dest, name))
    print(f"copied {SHARED_CRS}/bn254_g*.dat to deploy/crs/", flush=True)


def buildah_bud(what, args):
    """buildah bud with this machine's settings: chroot isolation, host network, hard ulimits,
    local bases only, docker format (it keeps HEALTHCHECK), the CA bundle pip and npm need."""
    argv = ["buildah", "bud", "--isolation", "chroot", "--network", "host", "--layers", "--format", "docker",
            "--pull=false", *ulimit_args()]  # no registry: buildah would look for an arm64 v8 variant in one
    bundle = ca_bundle()
    if bundle:
        argv += ["-v", f"{bundle}:/etc/ssl/certs/ca-certificates.crt:ro"]
    step(f"buildah bud ({what})", argv + args, cwd=PROJECT_DIR)


def build(arch, tag, build_base, runtime_base):
    """The production image for `arch`, tagged <tag>-<arch>."""
    buildah_bud(arch, [
        "--platform", f"linux/{arch}",
        # BuildKit sets BUILDPLATFORM itself; buildah 1.28 leaves it empty (FROM --platform=
        # would then mean the target's platform).
        "--build-arg", f"BUILDPLATFORM=linux/{NATIVE}",
        "--build-arg", f"BUILD_IMAGE={build_base}", "--build-arg", f"RUNTIME_IMAGE={runtime_base}",
        *label_args(), "-f", "Dockerfile", "-t", f"{tag}-{arch}", "."])


def label_args():
    """The OCI label values from git, as build args (what the Dockerfile reads) and as --label:
    buildah 1.28 reuses a cached LABEL layer when only the build args behind it changed."""
    values = {"VERSION": ("version", git("describe", "--tags", "--always", "--dirty") or "unknown"),
              "REVISION": ("revision", git("rev-parse", "HEAD") or "unknown"),
              "SOURCE": ("source", git("remote", "get-url", "origin"))}
    args = []
    for arg, (label, value) in values.items():
        args += ["--build-arg", f"{arg}={value}", "--label", f"org.opencontainers.image.{label}={value}"]
    return args


def build_dev(tag, build_base):
    """The developer container (Dockerfile.dev), tagged <tag>-dev."""
    buildah_bud("dev", ["--build-arg", f"BUILD_IMAGE={build_base}", "-f", "Dockerfile.dev", "-t", f"{tag}-dev", "."])


def image_size(ref):
    out = subprocess.run(["podman", "image", "inspect", ref], capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]["Size"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", choices=["amd64", "arm64"], help="repeatable (default: amd64)")
    parser.add_argument("--tag", default="localhost/bb-worker:test")
    parser.add_argument("--dev", action="store_true", help="also build Dockerfile.dev (tagged <tag>-dev)")
    args = parser.parse_args(argv)
    arches = args.arch or ["amd64"]
    figures = []
    started = time.monotonic()
    install_tools()
    figures.append(("tools", time.monotonic() - started))
    for arch in arches:
        if arch != NATIVE:
            enable_emulation(arch)
    provide_crs()
    t = time.monotonic()
    try:
        build_base = base_images.ensure("build", NATIVE, log=sys.stdout)  # the build stage runs natively
        runtime = {arch: base_images.ensure("runtime", arch, log=sys.stdout) for arch in arches}
    except (base_images.BaseImageError, OSError, subprocess.SubprocessError) as exc:
        sys.exit(f"build_image: base images: {exc}")
    figures.append(("base images", time.monotonic() - t))
    sizes = {}
    for arch in arches:
        t = time.monotonic()
        build(arch, args.tag, build_base, runtime[arch])
        figures.append((f"buildah bud linux/{arch}", time.monotonic() - t))
        sizes[arch] = image_size(f"{args.tag}-{arch}")
    if args.dev:
        t = time.monotonic()
        build_dev(args.tag, build_base)
        figures.append(("buildah bud Dockerfile.dev", time.monotonic() - t))
        sizes["dev"] = image_size(f"{args.tag}-dev")
    print("\nimage build figures:")
    for what, seconds in figures:
        print(f"  {what:<24} {seconds:6.1f} s")
    print(f"  {'total':<24} {time.monotonic() - started:6.1f} s")
    for arch, size in sizes.items():
        print(f"  image {args.tag}-{arch}: {size / 1e6:.1f} MB")  # uncompressed, as podman images shows
    return 0


if __name__ == "__main__":
    sys.exit(main())
