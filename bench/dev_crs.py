"""Make an INSECURE BN254 CRS from a known secret, for timing `bb prove` only.

The real CRS in ../shared/crs covers circuits up to 2^15 rows; bigger circuits
make bb download more points, which fails offline. For timing it is enough to
give bb *some* points in its cached-file layout: the prover's work (MSMs over
the polynomials, FFT-free sumcheck, Gemini/Shplonk/KZG) does the same number
of field and group operations whatever the points are, so proving time does
not depend on the CRS values. bb reads a cached uncompressed `bn254_g1.dat`
without checking it (README of ../shared/crs).

The points are `[s^i]G1` for i = 0..n-1 with a secret `s` that is printed in
the output directory: anyone can forge proofs against this CRS. bb 5's
verifier pins the real G2 point `[x]_2` of the Aztec Ignition ceremony, so
proofs made with this CRS do NOT verify (rightly). Never serve them as real,
never put this file where bb looks for its real CRS: this tool refuses
~/.bb-crs and writes a warning file beside the points.

Layout written (what bb 5 reads from its `-c/--crs_path` directory):
  bn254_g1.dat  n points, 64 bytes each: x then y, 32-byte big-endian, affine,
                point 0 = the generator (1, 2)
  bn254_g2.dat  the 128-byte G2 point, copied from the real CRS (the prover
                only needs G1; bb still opens the file)

Pure Python: fixed-base windowed tables of G (affine), mixed Jacobian
additions, Montgomery batch inversion back to affine, split over processes.

Usage: python -m bench.dev_crs OUT_DIR --points 262145 [--secret HEX] [--jobs N]
       python -m bench.dev_crs --self-test
"""
import argparse
import hashlib
import multiprocessing
import os
import signal
import sys
import time

# BN254 (alt_bn128): y^2 = x^3 + 3 over F_P; the group of G1 has prime order R.
P = 21888242871839275222246405745257275088696311157297823662689037894645226208583
R = 21888242871839275222246405745257275088548364400416034343698204186575808495617
G1 = (1, 2)
POINT_BYTES = 64
# The G2 point [x]_2 of the Aztec Ignition setup, as in ../shared/crs/bn254_g2.dat (sha256 0179...c32f).
REAL_G2 = bytes.fromhex(
    "0118c4d5b837bcc2bc89b5b398b5974e9f5944073b32078b7e231fec938883b0"
    "260e01b251f6f1c7e7ff4e580791dee8ea51d87a358e038b4efe30fac09383c1"
    "22febda3c0c0632a56475b4214e5615e11e6dd3f96e6cea2854a87d4dacc5e55"
    "04fc6369f7110fe3d25156c1bb9a72859cf2a04641f99ba4ee413c80da6a5fe4")
DEFAULT_SECRET = int.from_bytes(hashlib.sha256(b"bb-worker bench: INSECURE dev CRS").digest(), "big") % R
WINDOW_BITS = 12
SCALAR_BITS = R.bit_length()  # 254
WARNING_FILE = "INSECURE-DEV-CRS.txt"


class RefusedPath(ValueError):
    """The output directory is one where bb looks for a real CRS."""


# ---------------------------------------------------------------- group arithmetic

def _double(X, Y, Z):
    """Jacobian doubling on y^2 = x^3 + b (dbl-2009-l); returns (X, Y, Z)."""
    A = X * X % P
    B = Y * Y % P
    C = B * B % P
    D = 2 * ((X + B) ** 2 - A - C) % P
    E = 3 * A % P
    X3 = (E * E - 2 * D) % P
    return X3, (E * (D - X3) - 8 * C) % P, 2 * Y * Z % P


def _add_mixed(X1, Y1, Z1, x2, y2):
    """Jacobian (Z1 != 0) + affine point; returns Jacobian (X, Y, Z), Z == 0 for infinity."""
    Z1Z1 = Z1 * Z1 % P
    H = (x2 * Z1Z1 - X1) % P
    S = (y2 * Z1 * Z1Z1 - Y1) % P
    if H == 0:
        return _double(X1, Y1, Z1) if S == 0 else (1, 1, 0)
    HH = H * H % P
    HHH = H * HH % P
    V = X1 * HH % P
    X3 = (S * S - HHH - 2 * V) % P
    return X3, (S * (V - X3) - Y1 * HHH) % P, Z1 * H % P


def to_affine(points):
    """Jacobian points (list of (X, Y, Z), Z != 0) -> affine (x, y), one inversion for all (Montgomery)."""
    prefix = []
    acc = 1
    for _, _, Z in points:
        prefix.append(acc)
        acc = acc * Z % P
    inv = pow(acc, -1, P)
    out = [None] * len(points)
    for i in range(len(points) - 1, -1, -1):
        X, Y, Z = points[i]
        zinv = inv * prefix[i] % P  # 1/Z_i
        inv = inv * Z % P
        zz = zinv * zinv % P
        out[i] = (X * zz % P, Y * zz * zinv % P)
    return out


def window_tables(base=G1, window=WINDOW_BITS, bits=SCALAR_BITS):
    """Fixed-base tables: tables[j][d - 1] = d * 2^(window*j) * base in affine, d = 1..2^window - 1."""
    windows = -(-bits // window)
    jac = []
    start = (base[0], base[1], 1)
    for _ in range(windows):
        row = [start]
        x, y = to_affine([start])[0]
        for _ in range(2, 1 << window):
            row.append(_add_mixed(*row[-1], x, y))
        jac.append(row)
        start = row[-1]
        start = _add_mixed(*start, x, y)  # 2^window * (2^(window*j) base)
    flat = to_affine([p for row in jac for p in row])
    size = (1 << window) - 1
    return [flat[j * size:(j + 1) * size] for j in range(windows)]


def fixed_base_mul(tables, k, window=WINDOW_BITS):
    """k * base (0 < k < R) as a Jacobian point, with the tables of window_tables()."""
    mask = (1 << window) - 1
    acc = None
    j = 0
    while k:
        d = k & mask
        if d:
            x, y = tables[j][d - 1]
            acc = (x, y, 1) if acc is None else _add_mixed(*acc, x, y)
        k >>= window
        j += 1
    return acc


def on_curve(x, y):
    """True if the affine point (x, y) is on BN254's G1 curve."""
    return (y * y - x * x * x - 3) % P == 0


def scalar_mul(k, point=G1):
    """k * point by plain double-and-add (slow; for checks). Returns affine (x, y), or None for infinity."""
    acc = None
    for bit in bin(k % R)[2:]:
        if acc is not None:
            acc = _double(*acc)
        if bit == "1":
            acc = (point[0], point[1], 1) if acc is None else _add_mixed(*acc, *point)
        if acc is not None and acc[2] == 0:
            acc = None
    return None if acc is None else to_affine([acc])[0]


# ---------------------------------------------------------------- the points

_TABLES = None  # set in the parent before forking; workers inherit it


def _chunk(args):
    start, stop, secret = args
    power = pow(secret, start, R)
    jac = []
    for _ in range(start, stop):
        jac.append(fixed_base_mul(_TABLES, power))
        power = power * secret % R
    return b"".join(x.to_bytes(32, "big") + y.to_bytes(32, "big") for x, y in to_affine(jac))


def g1_points(count, secret=DEFAULT_SECRET, jobs=None):
    """Return `count` points [secret^i]G1, i = 0..count-1, as bytes (64 per point, bb's layout).

    jobs: processes to use (default: the CPU count). 0 < secret < R.
    """
    global _TABLES
    if not 0 < secret < R:
        raise ValueError("the secret must be in 1..R-1")
    jobs = max(1, min(jobs or os.cpu_count() or 1, count // 1024 or 1))
    _TABLES = window_tables()
    step = -(-count // (jobs * 8))  # a few chunks per process
    parts = [(i, min(i + step, count), secret) for i in range(0, count, step)]
    if jobs == 1:
        return b"".join(_chunk(p) for p in parts)
    # Workers get the default SIGTERM action: Pool stops them with SIGTERM, and a caller's handler
    # (bench.run turns SIGTERM into KeyboardInterrupt) must not run in them.
    with multiprocessing.get_context("fork").Pool(jobs, signal.signal, (signal.SIGTERM, signal.SIG_DFL)) as pool:
        return b"".join(pool.map(_chunk, parts))


def check_out_dir(path):
    """Raise RefusedPath if `path` is, or is inside, a directory bb uses for its real CRS (~/.bb-crs)."""
    real = os.path.realpath(path)
    for forbidden in (os.path.expanduser("~/.bb-crs"), "/root/.bb-crs"):
        bad = os.path.realpath(forbidden)
        if real == bad or real.startswith(bad + os.sep):
            raise RefusedPath(f"refusing to write an insecure CRS into {forbidden} (bb's real CRS cache)")


def write_dev_crs(out_dir, points, secret=DEFAULT_SECRET, real_crs=None, jobs=None):
    """Write bn254_g1.dat (`points` points) and bn254_g2.dat into `out_dir`; return seconds spent.

    Does nothing (returns 0.0) when out_dir already holds a dev CRS of at least
    `points` points from the same secret. real_crs: a directory to copy
    bn254_g2.dat from (default: the embedded copy of the real one).
    Raises RefusedPath for ~/.bb-crs.
    """
    check_out_dir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    g1 = os.path.join(out_dir, "bn254_g1.dat")
    stamp = os.path.join(out_dir, WARNING_FILE)
    tag = f"secret: {secret:#066x}\n"
    if (os.path.exists(g1) and os.path.getsize(g1) >= points * POINT_BYTES
            and os.path.exists(stamp) and tag in open(stamp).read()):
        return 0.0
    started = time.monotonic()
    with open(stamp, "w") as f:
        f.write("INSECURE development CRS written by bench/dev_crs.py, for timing bb prove only.\n"
                "The points are [s^i]G1 for the secret s below: anyone can forge proofs for it.\n"
                "Proofs made with it do not verify with bb 5 and must never be used as real.\n" + tag)
    data = g1_points(points, secret, jobs)
    tmp = g1 + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, g1)
    g2 = REAL_G2
    if real_crs and os.path.exists(os.path.join(real_crs, "bn254_g2.dat")):
        with open(os.path.join(real_crs, "bn254_g2.dat"), "rb") as f:
            g2 = f.read()
    with open(os.path.join(out_dir, "bn254_g2.dat"), "wb") as f:
        f.write(g2)
    return time.monotonic() - started


def self_test(count=64, secret=DEFAULT_SECRET):
    """Check the fast path against double-and-add and the curve equation; raise AssertionError."""
    data = g1_points(count, secret, jobs=1)
    assert len(data) == count * POINT_BYTES
    pts = [(int.from_bytes(data[i:i + 32], "big"), int.from_bytes(data[i + 32:i + 64], "big"))
           for i in range(0, len(data), POINT_BYTES)]
    assert pts[0] == G1, "point 0 must be the generator (1, 2)"
    assert pts[1] == scalar_mul(secret), "point 1 must be s*G"
    assert pts[5] == scalar_mul(pow(secret, 5, R)), "point 5 must be s^5*G"
    assert all(on_curve(x, y) for x, y in pts)
    assert scalar_mul(R - 1) == (1, P - 2), "(R-1)*G must be -G"
    try:
        check_out_dir(os.path.expanduser("~/.bb-crs"))
    except RefusedPath:
        pass
    else:
        raise AssertionError("~/.bb-crs was not refused")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?")
    parser.add_argument("--points", type=int, default=(1 << 18) + 1, help="G1 points (dyadic size + 1)")
    parser.add_argument("--secret", type=lambda s: int(s, 16), default=DEFAULT_SECRET, help="hex")
    parser.add_argument("--real-crs", default=os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "..", "shared", "crs"), help="copy bn254_g2.dat from here")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--self-test", action="store_true")
    args = parser.parse_args(argv)
    if args.self_test:
        self_test()
        print("dev_crs self-test: ok")
        return 0
    if not args.out_dir:
        parser.error("OUT_DIR is required")
    try:
        seconds = write_dev_crs(args.out_dir, args.points, args.secret, args.real_crs, args.jobs)
    except RefusedPath as exc:
        print(f"dev_crs: {exc}", file=sys.stderr)
        return 2
    print(f"dev_crs: {args.points} points in {args.out_dir} ({seconds:.1f} s; INSECURE, timing only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
