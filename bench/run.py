"""The benchmark: our worker against bare `bb prove` and against the Rust worker's way of calling bb.

Per circuit size, in one run and interleaved round by round (the machine is
shared and noisy, so only same-run medians and their ratios mean anything):

  floor       bare `bb prove -k vk` on the same files: what no wrapper can beat
  rust call   `bb prove --write_vk` (no precomputed VK), the command the Rust worker runs
  worker      POST /api/prove to our worker on 127.0.0.1, one client: upload + prove + JSON
  upload      POST of the same witness minus its last byte: the worker reads and
              inflates it all, then answers 400 without running bb (its overhead before bb)
  no verify   (real CRS only) the worker with VERIFY_PROOFS=0: worker − this is what `bb verify`
              before every 200 costs. On the dev CRS proofs cannot verify, so there the
              worker runs with VERIFY_PROOFS=0 and this step is skipped.

then concurrency 1, 2, 4, 8 clients at one size with MAX_CONCURRENT_PROOFS at its
default and set high, sampling the total RSS of bb processes. See bench/README.md.

Usage: python -m bench [--quick] [--sizes 10,12] [--repeats N] [--out DIR]
       python -m bench --render bench/results.json   (redraw RESULTS.md and the PNG only)
"""
import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

from bbworker.bbrunner import formats
from bbworker.settings import Settings
from bench import dev_crs, measure, report
from tests import support
from bench.measure import BenchError

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
OUT = os.path.join(BENCH, "out")
FIXTURES = os.path.join(BENCH, "fixtures")   # committed: the small sizes
GENERATED = os.path.join(OUT, "circuits")    # generated on demand: the big ones
SHARED_CRS = os.path.join(os.path.dirname(ROOT), "shared", "crs")

# log2(dyadic size) -> chain length N of bench/circuits/hashchain (~98 rows per step, ~75% full).
SIZES = {10: 7, 11: 15, 12: 31, 13: 62, 14: 125, 15: 250, 16: 501, 17: 1003, 18: 2006}
COMMITTED = (10, 11, 12, 13)
REAL_CRS_LOG = 15  # ../shared/crs holds 2^15 + 1 points
# The policies side by side in the concurrency phase: the scheduler at its defaults (a lone proof gets
# every core, queued ones split them) within a memory budget, and the old policy pinned.
BUDGET_BYTES = 1 << 30
POLICIES = (("today", {"MAX_CONCURRENT_PROOFS": "1"}),
            ("scheduler", {"PROOF_MEMORY_BUDGET_BYTES": str(BUDGET_BYTES)}))
# A round (or batch) during which other processes kept more than this many cores busy on average
# is re-run (up to twice as many rounds in all): on 2 cores such a round times the neighbours.
NOISY_CORES = 0.3


@dataclasses.dataclass(frozen=True)
class Options:
    """One benchmark run's settings: a mode's defaults, then the command line's overrides.

    bb: path of bb. sizes: log2 sizes of the latency phase. repeats: {log: rounds},
    default_repeats for the others. conc_logs: sizes of the concurrency phase (empty: skip it);
    clients, per_client, min_batch, passes: its batches (halved from 2^16 rows up, one pass). crs_check_log/_repeats: the real
    vs dev CRS check. max_wait, reruns: how patient to be with the neighbours (the full run
    waits for quiet and re-runs noisy rounds; the quick run, CI's, barely waits and never re-runs).
    """
    mode: str
    sizes: tuple
    repeats: dict
    default_repeats: int
    conc_logs: tuple
    clients: tuple
    per_client: int
    min_batch: int
    passes: int
    crs_check_log: int
    crs_check_repeats: int
    max_wait: float
    reruns: bool
    bb: str = ""
    big_passes: int = 1

    def rounds(self, log):
        """Rounds of the latency phase at size 2^log."""
        return self.repeats.get(log, self.default_repeats)

    def batches(self, log):
        """(passes, per_client, min_batch) of the concurrency phase at 2^log: big circuits get fewer."""
        if log >= 16:
            return self.big_passes, self.per_client, max(4, self.min_batch // 2)
        return self.passes, self.per_client, self.min_batch

    @property
    def patience(self):
        return {"max_wait": self.max_wait, "reruns": self.reruns}


MODES = {
    "full": Options("full", sizes=tuple(range(10, 19)), repeats={16: 11, 17: 9, 18: 7}, default_repeats=15,
                    conc_logs=(12, 15, 18), clients=(1, 2, 4, 8), per_client=3, min_batch=8, passes=3,
                    crs_check_log=15, crs_check_repeats=9, max_wait=20.0, reruns=True),
    "quick": Options("quick", sizes=(10, 11, 12, 13), repeats={}, default_repeats=5,
                     conc_logs=(12,), clients=(1, 2, 4, 8), per_client=2, min_batch=6, passes=1,
                     crs_check_log=12, crs_check_repeats=3, max_wait=2.0, reruns=False),
}

_started = time.monotonic()


def progress(text):
    """One progress line on stderr, with the minutes elapsed."""
    elapsed = time.monotonic() - _started
    print(f"[bench {int(elapsed // 60):02d}:{elapsed % 60:04.1f}] {text}", file=sys.stderr, flush=True)


def summary(values):
    """Median, quartiles, p95 (linear interpolation), min, max and count of a list of numbers."""
    xs = sorted(values)
    if not xs:
        return None

    def q(p):
        pos = (len(xs) - 1) * p
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
    return {"p50": q(0.5), "p25": q(0.25), "p75": q(0.75), "p95": q(0.95),
            "min": xs[0], "max": xs[-1], "n": len(xs)}


# ---------------------------------------------------------------- inputs

def circuit_dir(log):
    """Directory (str) holding circuit.json, witness.gz and meta.json for size 2^log."""
    base = FIXTURES if log in COMMITTED else GENERATED
    return os.path.join(base, f"hashchain-{SIZES[log]}")


def ensure_circuits(logs):
    """Generate the circuits and witnesses missing for `logs` with tools/noir/bench.mjs (needs Node)."""
    missing = [log for log in logs if not os.path.exists(os.path.join(circuit_dir(log), "meta.json"))]
    if not missing:
        return
    if any(log in COMMITTED for log in missing):
        raise BenchError(f"committed fixtures missing under {FIXTURES}: regenerate with "
                         f"node tools/noir/bench.mjs bench/fixtures {' '.join(str(SIZES[k]) for k in COMMITTED)}")
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise BenchError(f"sizes 2^{', 2^'.join(map(str, missing))} must be generated with Node.js + npm "
                         "(not found); `--quick` needs only the committed sizes")
    noir = os.path.join(ROOT, "tools", "noir")
    if not os.path.isdir(os.path.join(noir, "node_modules")):
        progress("installing the pinned Noir toolchain (npm ci in tools/noir)")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=noir, check=True, timeout=600)
    progress(f"generating circuits and witnesses for 2^{', 2^'.join(map(str, missing))}")
    proc = subprocess.run(["node", os.path.join(noir, "bench.mjs"), GENERATED] + [str(SIZES[k]) for k in missing],
                          capture_output=True, timeout=900)
    if proc.returncode != 0:
        raise BenchError("tools/noir/bench.mjs failed:\n" + proc.stderr.decode("utf-8", "replace")[-2000:])


def load_size(log):
    """Paths and metadata of size 2^log: dict with circuit, witness (paths), witness_bytes, meta."""
    d = circuit_dir(log)
    with open(os.path.join(d, "meta.json")) as f:
        meta = json.load(f)
    with open(os.path.join(d, "witness.gz"), "rb") as f:
        witness = f.read()
    return {"circuit": os.path.join(d, "circuit.json"), "witness_path": os.path.join(d, "witness.gz"),
            "witness": witness, "meta": meta}


def prepare_crs(logs, extra_dev_log=None):
    """Return {log: crs dir}: a writable copy of the real CRS up to 2^15, the dev CRS above.

    The dev CRS (bench/out/dev-crs, INSECURE) is made only when some size needs it
    or `extra_dev_log` asks for it (the CRS check). Returns (crs_for, real_dir or None, dev_dir or None).
    """
    real = None
    if os.path.exists(os.path.join(SHARED_CRS, "bn254_g1.dat")):
        real = os.path.join(OUT, "crs-real")
        os.makedirs(real, exist_ok=True)
        for name in ("bn254_g1.dat", "bn254_g2.dat"):
            target = os.path.join(real, name)
            if not os.path.exists(target) or os.path.getsize(target) != os.path.getsize(os.path.join(SHARED_CRS, name)):
                shutil.copyfile(os.path.join(SHARED_CRS, name), target)
                os.chmod(target, 0o644)
    real_log = REAL_CRS_LOG if real else -1
    dev_logs = [log for log in logs if log > real_log] + ([extra_dev_log] if extra_dev_log else [])
    dev = None
    if dev_logs:
        dev = os.path.join(OUT, "dev-crs")
        points = (1 << max(dev_logs)) + 1
        progress(f"dev CRS: {points} points (INSECURE, timing only) in {dev}")
        seconds = dev_crs.write_dev_crs(dev, points, real_crs=SHARED_CRS)
        progress(f"dev CRS ready ({seconds:.1f} s)" if seconds else "dev CRS ready (cached)")
    return {log: (real if log <= real_log else dev) for log in logs}, real, dev


# ---------------------------------------------------------------- phases

def bb_argv(bb, size, out_dir, crs, vk=None):
    """The argv of `bb prove`: with `-k vk` as our worker runs it, else `--write_vk` as the Rust worker does."""
    argv = [bb, "prove", "-b", size["circuit"], "-w", size["witness_path"]]
    argv += ["-k", vk] if vk else ["--write_vk"]
    return argv + ["-o", out_dir, "-c", crs]


def fresh_dir(path):
    """Empty directory `path` (created or emptied); returns it."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def check_reply(reply, size, what):
    """Raise BenchError unless `reply` is a proof with the expected public inputs."""
    if reply.status != 200:
        raise BenchError(f"{what}: POST /api/prove answered {reply.status}: {reply.error}")
    if reply.public_inputs != size["meta"]["public_inputs"] or not reply.proof:
        raise BenchError(f"{what}: unexpected publicInputs {reply.public_inputs}")


def latency_phase(opts, log, crs, crs_kind, work):
    """Time floor / rust call / worker / upload-only for size 2^log, interleaved; return its record."""
    bb, repeats = opts.bb, opts.rounds(log)
    size = load_size(log)
    acir, rows = measure.gates(bb, size["circuit"])
    vk_dir = fresh_dir(os.path.join(work, "vk"))
    dyadic_log = measure.write_vk(bb, size["circuit"], vk_dir, crs)
    vk = os.path.join(vk_dir, "vk")
    progress(f"2^{log}: N={SIZES[log]}, {rows} rows (dyadic 2^{dyadic_log}), "
             f"witness {len(size['witness'])} bytes, {crs_kind} CRS, {repeats} rounds")
    if dyadic_log != log:
        progress(f"  warning: the circuit for 2^{log} pads to 2^{dyadic_log}")
    truncated = size["witness"][:-1]
    rec = {"log": log, "n": SIZES[log], "acir_opcodes": acir, "rows": rows, "dyadic_log": dyadic_log,
           "witness_bytes": len(size["witness"]), "crs": crs_kind, "repeats": repeats}
    verifies = crs_kind == "real"  # dev-CRS proofs never verify: the worker must not check them there
    env = {"CIRCUIT_PATH": size["circuit"], "BB_BINARY": bb, "BB_CRS_PATH": crs,
           "VERIFY_PROOFS": "1" if verifies else "0"}
    meter = measure.CpuMeter().start()
    with measure.Server(fresh_dir(os.path.join(work, "server")), env) as server, \
            measure.Server(fresh_dir(os.path.join(work, "server-nv")), {**env, "VERIFY_PROOFS": "0"}) as unverified:
        server.wait_ready()
        unverified.wait_ready()

        def floor(sample_rss=False):
            run = measure.run_bb(bb_argv(bb, size, fresh_dir(os.path.join(work, "floor")), crs, vk),
                                 sample_rss=sample_rss)
            return run.seconds, run.max_rss_bytes

        def rust(sample_rss=False):
            run = measure.run_bb(bb_argv(bb, size, fresh_dir(os.path.join(work, "rust")), crs),
                                 sample_rss=sample_rss)
            return run.seconds, run.max_rss_bytes

        def worker():
            reply = measure.prove(server.port, size["witness"])
            try:
                check_reply(reply, size, f"2^{log}")
            except BenchError as exc:
                raise BenchError(f"{exc}\nserver log:\n{server.output_tail()}") from None
            return reply

        def no_verify():
            reply = measure.prove(unverified.port, size["witness"])
            check_reply(reply, size, f"2^{log} (VERIFY_PROOFS=0)")
            return reply.seconds

        def upload():
            reply = measure.prove(server.port, truncated)
            if reply.status != 400:
                raise BenchError(f"2^{log}: truncated witness answered {reply.status}, not 400: {reply.error}")
            return reply.seconds

        # Warm-up (page cache, the worker's first request), not counted; checks the proof and
        # measures bb's peak RSS (the timed runs do not sample it: that would slow them).
        rec["floor_rss"] = [floor(sample_rss=True)[1]]
        rec["rust_rss"] = [rust(sample_rss=True)[1]]
        reply = worker()
        upload()
        if verifies:
            no_verify()
        rec["proof_bytes"] = len(reply.proof)
        if crs_kind == "real":
            if not measure.verify(bb, vk, reply.proof, reply.public_inputs, crs):
                raise BenchError(f"2^{log}: bb verify rejected the worker's proof")
            rec["verified"] = True
        steps = ["floor", "rust", "worker", "upload"] + (["no_verify"] if verifies else [])
        rounds = []
        most = 2 * repeats if opts.reruns else repeats
        while sum(r["load"] <= NOISY_CORES for r in rounds) < repeats and len(rounds) < most:
            waited = measure.wait_quiet(max_wait=opts.max_wait)
            before = measure.Load.snap()
            one = {"waited": waited}
            i = len(rounds)
            for step in steps[i % len(steps):] + steps[:i % len(steps)]:
                if step == "floor":
                    one["floor"] = floor()[0]
                elif step == "rust":
                    one["rust"] = rust()[0]
                elif step == "worker":
                    # The worker's own count of its bb time (metrics), read around the timed request.
                    bb_before = measure.bb_seconds_in_worker(server.port)
                    reply = worker()
                    bb_after = measure.bb_seconds_in_worker(server.port)
                    one["worker"], one["request_id"] = reply.seconds, reply.request_id
                    if bb_before is not None and bb_after is not None:
                        one["bb_in_worker"] = bb_after - bb_before
                elif step == "no_verify":
                    one["no_verify"] = no_verify()
                else:
                    one["upload"] = upload()
            one["load"] = measure.Load.between(before, measure.Load.snap())["other_cores"]
            rounds.append(one)
        handler = measure.handler_seconds(server.output())
        for one in rounds:
            if one.get("request_id") in handler:
                one["handler"] = handler[one["request_id"]]
    rec["background"] = meter.stop()
    rec["all_rounds"] = rounds
    kept = [r for r in rounds if r["load"] <= NOISY_CORES]
    if len(kept) < max(3, repeats // 2):  # never quiet enough: keep everything, and say so
        kept = rounds
    rec["rounds_discarded"] = len(rounds) - len(kept)
    rec["round_load"] = [r["load"] for r in kept]
    rec["waited"] = sum(r["waited"] for r in rounds)
    for key in ("floor", "rust", "worker", "upload") + (("no_verify",) if verifies else ()):
        rec[key] = [r[key] for r in kept]
    if all("handler" in r and "bb_in_worker" in r for r in kept):  # where the worker's time goes
        rec["handler"] = [r["handler"] for r in kept]
        rec["bb_in_worker"] = [r["bb_in_worker"] for r in kept]
    rec["repeats"] = len(kept)
    f, r, w = (statistics.median(rec[k]) for k in ("floor", "rust", "worker"))
    progress(f"  floor {f * 1000:.0f} ms, rust call {r * 1000:.0f} ms, worker {w * 1000:.0f} ms: "
             f"worker/floor {w / f:.3f}, rust/worker {r / w:.3f}; {len(kept)} rounds kept, "
             f"{rec['rounds_discarded']} discarded (other processes > {NOISY_CORES} cores)")
    return rec


def concurrency_phase(opts, log, crs, crs_kind, work):
    """Clients 1..8 against two live workers, the old policy and the scheduler (POLICIES); return records.

    Both servers run side by side (idle when not under test) and the batches
    alternate between them (A, B, B, A, ...), so background noise hits both
    alike. A batch is `clients` threads sending max(per_client x clients,
    min_batch) requests, closed loop. Records aggregate the passes per (policy, clients).
    On the real CRS every proof is checked with `bb verify` (outside the timing).
    """
    bb, clients_list = opts.bb, list(opts.clients)
    passes, per_client, min_batch = opts.batches(log)
    one_client = [] if 1 not in clients_list else [1]
    clients_list = [c for c in clients_list if c != 1]
    size = load_size(log)
    vk = None
    if crs_kind == "real":
        vk_dir = fresh_dir(os.path.join(work, "vk"))
        measure.write_vk(bb, size["circuit"], vk_dir, crs)
        vk = os.path.join(vk_dir, "vk")
    acc = {}
    servers = {}
    meter = measure.CpuMeter().start()
    try:
        for label, extra in POLICIES:
            env = {"CIRCUIT_PATH": size["circuit"], "BB_BINARY": bb, "BB_CRS_PATH": crs,
                   "QUEUE_TIMEOUT_SECONDS": "900",  # throughput, not 503s, is compared here
                   "VERIFY_PROOFS": "1" if crs_kind == "real" else "0", **extra}  # dev-CRS proofs never verify
            servers[label] = measure.Server(fresh_dir(os.path.join(work, f"server-{label}")), env)
        for label, server in servers.items():
            server.wait_ready()
            check_reply(measure.prove(server.port, size["witness"]), size, f"warm-up ({label})")
        for p in range(passes):  # one client: single requests alternate between the servers (A B B A ...)
            for i in range(max(per_client, min_batch) if one_client else 0):
                measure.wait_quiet(max_wait=opts.max_wait)  # once per pair
                for label, _ in (POLICIES if (p + i) % 2 == 0 else POLICIES[::-1]):
                    add(acc, label, 1, run_batch(opts, servers[label], size, 1, 1, vk, crs, quiet=False))
            if one_client:
                progress(f"  2^{log} pass {p + 1}/{passes}, 1 client: " + ", ".join(
                    f"{label} p50 {statistics.median(acc[(label, 1)]['latencies']):.3f} s"
                    for label, _ in POLICIES if acc.get((label, 1), {}).get("latencies")))
        turn = 0
        for p in range(passes):
            for clients in clients_list:
                turn += 1
                order = POLICIES if turn % 2 else POLICIES[::-1]
                for label, _ in order:
                    for attempt in range(3):  # a batch the neighbours disturbed is re-run, twice at most
                        batch = run_batch(opts, servers[label], size, clients,
                                          max(clients * per_client, min_batch), vk, crs)
                        bad = sum(batch["failed"].values())
                        progress(f"  2^{log} pass {p + 1}/{passes}, {label}, {clients} clients: "
                                 f"{len(batch['ok'])} proofs in {batch['elapsed']:.1f} s, peak bb RSS "
                                 f"{batch['peak_bytes'] / 2**20:.0f} MiB in {batch['peak_count']} bb, threads "
                                 f"{batch['threads']}; other processes {batch['load']:.2f} cores"
                                 + (f", {bad} FAILED" if bad else ""))
                        if bad:
                            progress("  server log:\n" + servers[label].output_tail())
                        if batch["load"] <= NOISY_CORES or attempt == 2 or not opts.reruns:
                            break
                        add(acc, label, clients, batch, discarded=True)
                    add(acc, label, clients, batch)
    finally:
        for server in servers.values():
            server.stop()
    background = meter.stop()
    records = []
    for label, _ in POLICIES:
        for clients in one_client + clients_list:
            rec = acc[(label, clients)]
            rec["proofs_per_min"] = rec["ok"] / rec["elapsed"] * 60 if rec["elapsed"] else 0.0
            steady = rec["steady_latencies"]  # clients / mean latency under sustained load
            rec["steady_per_min"] = clients / statistics.fmean(steady) * 60 if steady else None
            rec["latency"] = summary(rec["latencies"])
            records.append(rec)
    return {"log": log, "crs": crs_kind, "runs": records, "passes": passes, "per_client": per_client,
            "min_batch": min_batch, "budget_bytes": BUDGET_BYTES, "background": background}


def add(acc, label, clients, batch, discarded=False):
    """Add one batch to the record of (label, clients) in `acc` (only its failures if `discarded`)."""
    rec = acc.setdefault((label, clients), {
        "limit": label, "clients": clients, "requests": 0, "ok": 0, "failed": {}, "elapsed": 0.0,
        "latencies": [], "peak_rss_bytes": 0, "peak_bb": 0, "rss_samples": 0, "batches": 0, "batch_load": [],
        "waited": 0.0, "batches_discarded": 0, "verified": 0, "threads": {}, "bb_seconds": 0.0,
        "worker_cpu": 0.0, "bench_cpu": 0.0, "steady_latencies": []})
    rec["waited"] += batch["waited"]
    for key, count in batch["failed"].items():  # failures always count
        rec["failed"][key] = rec["failed"].get(key, 0) + count
    rec["requests"] += sum(batch["failed"].values())
    if discarded:
        rec["batches_discarded"] += 1
        return
    rec["requests"] += len(batch["ok"])
    rec["ok"] += len(batch["ok"])
    rec["latencies"] += batch["ok"]
    rec["steady_latencies"] += batch["steady"]
    rec["elapsed"] += batch["elapsed"]
    rec["batches"] += 1
    rec["rss_samples"] += batch["samples"]
    rec["peak_rss_bytes"] = max(rec["peak_rss_bytes"], batch["peak_bytes"])
    rec["peak_bb"] = max(rec["peak_bb"], batch["peak_count"])
    rec["batch_load"].append(batch["load"])
    rec["verified"] += batch["verified"]
    for threads, count in batch["threads"].items():
        rec["threads"][threads] = rec["threads"].get(threads, 0) + count
    for key in ("bb_seconds", "worker_cpu", "bench_cpu"):
        rec[key] += batch[key]


def run_batch(opts, server, size, clients, total, vk=None, crs=None, quiet=True):
    """One closed-loop batch against `server` once the machine is quiet, sampling bb's RSS and threads.

    Returns a dict: elapsed (s), ok (list of latencies in s), failed ({reason: count}),
    peak_bytes, peak_count, samples, threads ({HARDWARE_CONCURRENCY: bb runs}) from the sampler,
    load (other processes' cores), waited (s), verified (proofs `bb verify` accepted, with `vk`),
    steady (latencies in s of the requests made under sustained load: measure.closed_loop; none
    when a request failed), bb_seconds (the worker's time in Circuit.prove), worker_cpu (CPU seconds of the gunicorn
    processes, bb excluded), bench_cpu (CPU seconds of this process: clients and samplers).
    """
    waited = measure.wait_quiet(max_wait=opts.max_wait) if quiet else 0.0
    before = measure.Load.snap()
    bb_before = measure.bb_seconds_in_worker(server.port) or 0.0
    gunicorns = [server.proc.pid] + [pid for pid, _ in support.descendants(server.proc.pid)]
    cpu_before = measure.own_cpu_seconds(gunicorns)
    me_before = time.process_time()
    sampler = measure.RSSSampler(opts.bb, server.proc.pid).start()
    try:
        elapsed, replies, steady = measure.closed_loop(server.port, size["witness"], clients, total,
                                                       size["meta"]["public_inputs"])
    finally:
        sampler.stop()
    bench_cpu = time.process_time() - me_before
    worker_cpu = measure.own_cpu_seconds(gunicorns) - cpu_before
    bb_seconds = (measure.bb_seconds_in_worker(server.port) or 0.0) - bb_before
    load = measure.Load.between(before, measure.Load.snap())["other_cores"]
    failed, ok, verified = {}, [], 0
    for r in replies:
        if r.status == 200 and vk is not None:
            if measure.verify(opts.bb, vk, r.proof, r.public_inputs, crs):
                verified += 1
            else:
                r = r._replace(status=0, error="bb verify rejected the proof")
        if r.status == 200:
            ok.append(r.seconds)
        else:
            key = f"{r.status} {r.error}"[:160]
            failed[key] = failed.get(key, 0) + 1
    return {"elapsed": elapsed, "ok": ok, "failed": failed, "steady": steady if not failed else [],
            "peak_bytes": sampler.peak_bytes, "peak_count": sampler.peak_count, "samples": sampler.samples,
            "threads": sampler.threads, "load": load, "waited": waited, "verified": verified,
            "bb_seconds": bb_seconds, "worker_cpu": worker_cpu, "bench_cpu": bench_cpu}


def crs_check(opts, real, dev, work):
    """Floor at 2^log with the real and the dev CRS, interleaved; and bb verify on a dev-CRS proof."""
    bb, log, repeats = opts.bb, opts.crs_check_log, opts.crs_check_repeats
    size = load_size(log)
    vk_real = os.path.join(fresh_dir(os.path.join(work, "vk-real")), "vk")
    vk_dev = os.path.join(fresh_dir(os.path.join(work, "vk-dev")), "vk")
    measure.write_vk(bb, size["circuit"], os.path.dirname(vk_real), real)
    measure.write_vk(bb, size["circuit"], os.path.dirname(vk_dev), dev)
    times = {"real": [], "dev": []}
    out = os.path.join(work, "crs-check")
    for i in range(repeats + 1):
        measure.wait_quiet(max_wait=opts.max_wait)
        for kind in (("real", "dev") if i % 2 == 0 else ("dev", "real")):
            crs, vk = (real, vk_real) if kind == "real" else (dev, vk_dev)
            run = measure.run_bb(bb_argv(bb, size, fresh_dir(out), crs, vk))
            if i:  # round 0 is a warm-up
                times[kind].append(run.seconds)
    # The last proof in `out` was made with whichever CRS ran last; make one with the dev CRS on purpose.
    measure.run_bb(bb_argv(bb, size, fresh_dir(out), dev, vk_dev))
    with open(os.path.join(out, "proof"), "rb") as f:
        proof = f.read()
    with open(os.path.join(out, "public_inputs"), "rb") as f:
        pis = formats.parse_public_inputs(f.read())
    rejected = not measure.verify(bb, vk_dev, proof, pis, dev)
    rec = {"log": log, "real": times["real"], "dev": times["dev"], "dev_proof_rejected": rejected}
    progress(f"CRS check 2^{log}: real {statistics.median(times['real']) * 1000:.0f} ms, "
             f"dev {statistics.median(times['dev']) * 1000:.0f} ms; dev proof rejected by bb verify: {rejected}")
    return rec


# ---------------------------------------------------------------- environment

def default_limit():
    """MAX_CONCURRENT_PROOFS as the server sets it when the variable is unset (int)."""
    env = {k: v for k, v in os.environ.items() if k not in measure.SERVER_SETTINGS}
    return Settings.from_environ(env).max_concurrent_proofs


def machine_info(bb):
    """Facts about this machine and the software measured (dict of str)."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
            mem = f"{kib / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass

    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu, "cores": str(os.cpu_count()), "memory": mem,
        "kernel": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "bb": measure.bb_output([bb, "--version"]).strip(),
        "gunicorn": version("gunicorn"), "gevent": version("gevent"),
        "worker_commit": commit,
    }


# ---------------------------------------------------------------- main

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small committed sizes only, ~1 min (CI)")
    parser.add_argument("--sizes", help="comma-separated log2 sizes from 10 to 18 (default: by mode)")
    parser.add_argument("--repeats", type=int, help="rounds per size (default: by mode and size)")
    parser.add_argument("--conc-sizes", help="comma-separated log2 sizes of the concurrency runs, e.g. 12,15,18")
    parser.add_argument("--no-concurrency", action="store_true")
    parser.add_argument("--passes", type=int, help="passes of the concurrency phase (every size)")
    parser.add_argument("--clients", help="comma-separated client counts of the concurrency phase (default 1,2,4,8)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    parser.add_argument("--out", help="where RESULTS.md, results.json and latency.png go")
    parser.add_argument("--render", metavar="RESULTS_JSON",
                        help="only rewrite RESULTS.md and latency.png beside a results.json from an earlier run")
    args = parser.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            results = json.load(f)
        out_dir = os.path.dirname(os.path.abspath(args.render))
        with open(os.path.join(out_dir, "RESULTS.md"), "w") as f:
            f.write(report.markdown(results))
        if not args.no_plot:
            report.plot(results, os.path.join(out_dir, "latency.png"))
        print(report.markdown(results))
        return 0

    mode_name = "quick" if args.quick else "full"
    opts = MODES[mode_name]
    custom = bool(args.sizes or args.repeats or args.conc_sizes or args.no_concurrency or args.passes
                  or args.clients)
    if args.sizes:
        sizes = tuple(sorted({int(x) for x in args.sizes.split(",")}))
        if not set(sizes) <= set(SIZES):
            parser.error(f"--sizes must be among {min(SIZES)}..{max(SIZES)}")
        opts = dataclasses.replace(opts, sizes=sizes)
    if args.repeats:
        opts = dataclasses.replace(opts, repeats={}, default_repeats=args.repeats)
    if args.conc_sizes:
        logs = tuple(sorted({int(x) for x in args.conc_sizes.split(",")}))
        if not set(logs) <= set(SIZES):
            parser.error(f"--conc-sizes must be among {min(SIZES)}..{max(SIZES)}")
        opts = dataclasses.replace(opts, conc_logs=logs)
    if args.no_concurrency:
        opts = dataclasses.replace(opts, conc_logs=())
    if args.passes:
        opts = dataclasses.replace(opts, passes=args.passes, big_passes=args.passes)
    if args.clients:
        opts = dataclasses.replace(opts, clients=tuple(sorted({int(x) for x in args.clients.split(",")})))
    out_dir = args.out or (BENCH if mode_name == "full" and not custom
                           else os.path.join(OUT, mode_name if not custom else "custom"))
    bb = os.path.abspath(os.environ.get("BB_BINARY") or os.path.join(ROOT, ".bb", "bb"))
    if not os.access(bb, os.X_OK):
        print(f"bench: bb not found at {bb}: run `make setup`", file=sys.stderr)
        return 2
    opts = dataclasses.replace(opts, bb=bb)

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    work = os.path.join(OUT, f"work-{mode_name}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    results = {"mode": mode_name, "custom": custom, "patience": opts.patience, "noisy_cores": NOISY_CORES}
    meter = measure.CpuMeter().start()
    try:
        results["machine"] = machine_info(bb)
        if mode_name == "quick":
            dev_crs.self_test()  # point 1 = s*G, on the curve, ~/.bb-crs refused
        limit = default_limit()
        results["default_limit"] = limit
        needed = sorted(set(opts.sizes) | set(opts.conc_logs) | {opts.crs_check_log})
        ensure_circuits(needed)
        results["noir"] = load_size(needed[0])["meta"]["noir_version"]
        crs_for, real, dev = prepare_crs(needed, extra_dev_log=opts.crs_check_log)
        if real is None:
            progress("warning: ../shared/crs not found: every size uses the INSECURE dev CRS")
        results["sizes"] = []
        for log in opts.sizes:
            kind = "real" if crs_for[log] == real else "dev"
            results["sizes"].append(latency_phase(opts, log, crs_for[log], kind,
                                                  fresh_dir(os.path.join(work, f"2^{log}"))))
        results["concurrency"] = []
        for log in opts.conc_logs:
            progress(f"concurrency at 2^{log}: " + " vs ".join(label for label, _ in POLICIES))
            kind = "real" if crs_for[log] == real else "dev"
            results["concurrency"].append(concurrency_phase(opts, log, crs_for[log], kind,
                                                            fresh_dir(os.path.join(work, f"conc-2^{log}"))))
        if real and dev:
            results["crs_check"] = crs_check(opts, real, dev, fresh_dir(os.path.join(work, "crs")))
    except (BenchError, support.ServerError) as exc:
        print(f"bench: FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    results["elapsed_seconds"] = time.monotonic() - _started
    results["background"] = meter.stop()

    os.makedirs(out_dir, exist_ok=True)
    text = report.markdown(results)
    with open(os.path.join(out_dir, "RESULTS.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    if not args.no_plot:
        report.plot(results, os.path.join(out_dir, "latency.png"))
    print(text)
    failures = report.failures(results)
    progress(f"wrote {os.path.relpath(out_dir, ROOT)}/RESULTS.md in {results['elapsed_seconds'] / 60:.1f} min")
    if failures:
        print("bench: FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    shutil.rmtree(work, ignore_errors=True)
    return 0
