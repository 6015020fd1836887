"""Compute the circuit's verification key ahead of time, and give bb the CRS it needs.

Used by the Dockerfile's build stage (so the image's first request is as fast as
the rest and the server never writes its VK cache) and by tests/packaging/test_image.py.

    python3 scripts/precompute_vk.py
        Compute the VK of the configured circuit (bbworker.settings: CIRCUIT_PATH, and
        every *.json in CIRCUITS_DIR if set; BB_BINARY, BB_CRS_PATH, VERIFIER_TARGET,
        VK_CACHE_DIR) into VK_CACHE_DIR with the server's own VerificationKey.ensure():
        the same cache key the server computes, so a server with the same circuit, bb
        and target finds it without writing. Needs the package `bbworker` importable
        (the venv has it installed; the image build sets PYTHONPATH).

    python3 scripts/precompute_vk.py crs --bb BB --circuit CIRCUIT [--circuit ...] --crs DIR [--points N] [--target T]
        Make DIR a CRS that covers the circuits: run `bb write_vk` once per circuit into a
        scratch dir, so bb downloads (and checks) the G1 points it lacks when
        it has internet access. With --points (the image build), then keep only the
        first N points of bn254_g1.dat (0: just what the largest circuit needs) and remove
        the files that are not *.dat (bb's crs.lock, a README): this changes DIR, so
        give it a copy. Standard library only, so the image's CRS layer does not
        depend on the app's code.

Sizes: a circuit of dyadic size 2^k (bb's VK starts with k) needs 2^k + 1 G1
points of 64 bytes in bn254_g1.dat, e.g. 2^15 rows -> 32,769 points, 2,097,216
bytes; 2^20 -> 64 MiB. (bb 5.0.0 reads 2^k of them; the extra point matches
Aztec's own CRS scripts.) Exits non-zero with a one-line reason on failure.
"""
import argparse
import os
import subprocess
import sys
import tempfile

G1_FILE = "bn254_g1.dat"
POINT_BYTES = 64
FIELD_BYTES = 32
BB_TIMEOUT_SECONDS = 1800  # a large CRS download on a slow link


class PrecomputeError(Exception):
    """A reason to stop, printed as one line."""


# ---------------------------------------------------------------- CRS sizes

def vk_log_size(vk_path):
    """Return k for a circuit of dyadic size 2^k, read from the first field of bb's binary VK."""
    with open(vk_path, "rb") as f:
        head = f.read(FIELD_BYTES)
    if len(head) != FIELD_BYTES:
        raise PrecomputeError(f"{vk_path} is too short to be a bb verification key")
    k = int.from_bytes(head, "big")
    if not 1 <= k <= 30:
        raise PrecomputeError(f"{vk_path} does not start with a circuit size (got {k})")
    return k


def points_needed(k):
    """G1 points to keep for a circuit of dyadic size 2^k (see the module docstring)."""
    return (1 << k) + 1


def crs_points(crs_dir):
    """Number of G1 points in crs_dir/bn254_g1.dat (0 if there is none)."""
    try:
        return os.path.getsize(os.path.join(crs_dir, G1_FILE)) // POINT_BYTES
    except OSError:
        return 0


def describe_size(points):
    return f"{points:,} points ({points * POINT_BYTES:,} bytes of {G1_FILE})"


# ---------------------------------------------------------------- crs step

def fetch_crs(bb, circuit, crs_dir, target=None):
    """Run `bb write_vk` with `-c crs_dir` so bb fills in the points the circuit needs; return k."""
    os.makedirs(crs_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bb-crs-probe-") as scratch:
        argv = [bb, "write_vk", "-b", circuit, "-o", scratch, "-c", crs_dir]
        if target:
            argv += ["-t", target]
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=BB_TIMEOUT_SECONDS)
        except (OSError, subprocess.SubprocessError) as exc:
            raise PrecomputeError(f"cannot run {bb}: {exc}") from None
        if proc.returncode != 0 or not os.path.exists(os.path.join(scratch, "vk")):
            lines = proc.stderr.decode("utf-8", "replace").strip().splitlines() or ["no output"]
            raise PrecomputeError(
                f"bb write_vk failed ({lines[-1].strip()}). bb needs internet access to download "
                f"the CRS, or put a large enough {G1_FILE} (and bn254_g2.dat) in {crs_dir}")
        return vk_log_size(os.path.join(scratch, "vk"))


def fit_crs(crs_dir, k, wanted):
    """Keep the first max(wanted, 2^k + 1) points (fewer if bb gave 2^k) and only *.dat files; return the count.

    wanted: points asked for (0: what this circuit needs). Raises PrecomputeError
    if the CRS has fewer points than bb needs or than were asked for.
    """
    have = crs_points(crs_dir)
    keep = max(wanted, points_needed(k))
    if wanted and have < wanted:
        raise PrecomputeError(f"{crs_dir} has {describe_size(have)}, fewer than the {wanted:,} "
                              f"asked for: supply a larger {G1_FILE}")
    keep = min(keep, have)
    if keep < (1 << k):
        raise PrecomputeError(f"{crs_dir} has {describe_size(have)}; this circuit of 2^{k} rows "
                              f"needs {describe_size(points_needed(k))}")
    if have > keep:
        os.truncate(os.path.join(crs_dir, G1_FILE), keep * POINT_BYTES)
    for name in os.listdir(crs_dir):  # bb's crs.lock, a README: only the CRS goes into the image
        path = os.path.join(crs_dir, name)
        if not name.endswith(".dat") and os.path.isfile(path):
            os.unlink(path)
    return keep


def crs_main(args):
    k = max(fetch_crs(os.path.abspath(args.bb), os.path.abspath(circuit), os.path.abspath(args.crs),
                      args.target or None) for circuit in args.circuit)
    if args.points is None:
        kept = crs_points(args.crs)
    else:
        kept = fit_crs(args.crs, k, args.points)
    print(f"CRS at {args.crs}: {describe_size(kept)}; the largest circuit (2^{k} rows) needs "
          f"{describe_size(points_needed(k))}")


# ---------------------------------------------------------------- vk step

def vk_main():
    from bbworker import bbrunner
    from bbworker.errors import ProverError
    from bbworker.settings import ConfigError, Settings

    try:
        settings = Settings.from_environ(os.environ)
    except ConfigError as exc:
        raise PrecomputeError(f"bad configuration: {exc}") from None
    bb = bbrunner.BB(settings.bb_binary, settings.bb_crs_path, settings.prove_timeout_seconds,
                     settings.verifier_target, settings.bb_memory_limit_mb)
    status = bb.status()
    if not status.available:
        raise PrecomputeError(f"bb is not available: {status.detail}")
    largest = 0
    for circuit in settings.circuits.values():  # what the server serves
        try:
            vk = bbrunner.Circuit(bb, circuit, settings.vk_cache_dir).vk.ensure()
        except (ProverError, OSError) as exc:
            raise PrecomputeError(f"could not compute the verification key of {circuit}: "
                                  f"{getattr(exc, 'detail', exc)}") from None
        k = vk_log_size(vk)
        largest = max(largest, k)
        print(f"VK of {circuit} (bb {status.version}, target {settings.verifier_target or 'default'}) "
              f"at {vk}; the circuit has 2^{k} rows")
    crs = settings.bb_crs_path
    if crs:
        lock = os.path.join(crs, "crs.lock")
        if os.path.isfile(lock) and os.path.getsize(lock) == 0:
            os.unlink(lock)  # bb's (empty) lock file: only the CRS goes into the image
        have = crs_points(crs)
        if have < (1 << largest):
            raise PrecomputeError(f"{crs} has {describe_size(have)}; the circuits "
                                  f"need {describe_size(points_needed(largest))}")
        print(f"CRS at {crs}: {describe_size(have)}")


# ---------------------------------------------------------------- main

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["crs"]:
            parser = argparse.ArgumentParser(prog="precompute_vk.py crs",
                                             description="Give bb the CRS the circuit needs.")
            parser.add_argument("--bb", required=True, help="path of bb")
            parser.add_argument("--circuit", required=True, action="append", help="path of a circuit JSON")
            parser.add_argument("--crs", required=True, help="CRS directory to fill")
            parser.add_argument("--points", type=int, help="G1 points to keep (0: what the circuit needs)")
            parser.add_argument("--target", default="", help="bb verifier target (-t), empty for the default")
            args = parser.parse_args(argv[1:])
            if args.points is not None and args.points < 0:
                parser.error("--points must be 0 or more")
            crs_main(args)
        else:
            parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
            parser.add_argument("step", nargs="?", choices=["vk"], default="vk")
            parser.parse_args(argv)
            vk_main()
    except (PrecomputeError, OSError) as exc:
        print(f"precompute_vk: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
