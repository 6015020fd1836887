"""Soak (issues 12 and 19): 32 hostile and 8 honest clients for 60 s against one live server.

The clients are tests/programs/hostile.py, run as a separate process; /api/health is polled
from a process of its own, as a load balancer would. The hostile clients mix every kind of
both issues: crafted verify proofs (zeros, random bytes, a real proof with a field changed),
idle and zero-byte connections, 1 MB verify bodies, requests gunicorn's parser refuses (long
headers and paths, bad framing and request lines), SCRIPT_NAME headers, trickles, half-closes,
gzip bombs, disconnects. Every honest request must get a 200 whose proof `bb verify` accepts;
/api/health never 503 and fast; no bb beyond the slots; the server's memory flat; nothing left
in TMPDIR; nothing a client sent counted as a server fault.
"""
import glob
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time

import pytest

from support import (FIXTURES, PROGRAMS, TESTS, CommandSampler, Sampler, bb_processes, crs_args, percentile,
                     probe_health, wait_for)

pytestmark = pytest.mark.stress

SECONDS = 60
HEALTH_P99_MS = 50  # issue 19's goal
SERVER_RSS_LIMIT = 150 * 1024 * 1024
PROOF_SLOTS, VERIFY_PLACES = 2, 2  # MAX_CONCURRENT_PROOFS, VERIFY_CONCURRENCY below
# Two `idle` clients hold this many silent connections each, more than the worker's places
# (WORKER_CONNECTIONS, gunicorn's worker_connections): the worker is full of idle connections
# time and again while honest clients prove. tests/live/test_connections.py has the 1,500.
IDLE_CONNECTIONS, WORKER_CONNECTIONS = 100, 150
# What each hostile kind may get (hostile.py's outcomes; "unfinished": cut by the end of the run).
ALLOWED = {
    "zero_proof": {"invalid"},  # bb cannot aggregate pairing points at infinity: the proof's fault
    "random_proof": {"invalid"},
    "flipped_proof": {"invalid"},
    "large_verify": {"413"},  # bounded by what the circuit's proofs need, before it is read
    "idle": {"dropped"},  # HEADER_TIMEOUT_SECONDS below, or the oldest dropped when all places are taken
    "zero_byte": {"closed"},
    "long_header": {"431"},
    "long_path": {"414"},
    "bad_coding": {"501"},
    "bad_request_line": {"400"},
    "script_name": {"200/404"},
    "trickle_upload": {"408", "unfinished"},  # UPLOAD_DEADLINE_SECONDS below
    "trickle_headers": {"dropped", "unfinished"},  # HEADER_TIMEOUT_SECONDS below
    "half_close": {"200"},
    "gzip_members": {"400"},
    "endless_name": {"413"},  # bounded by what the circuit's witnesses need gzipped
    "oversized_expect": {"413"},
    "bad_framing": {"400"},
    "disconnect": {"closed"},
}


def probe(port, seconds):
    """Poll /api/health every 20 ms for `seconds` from a process of its own: hostile.py's report["health"] shape."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    prober = context.Process(target=probe_health, args=(port, time.monotonic() + seconds, 0.02, results))
    prober.start()
    latencies, statuses = results.get(timeout=seconds + 60)
    prober.join(timeout=10)
    return {"count": len(latencies), "statuses": statuses, "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99), "max_ms": max(latencies)}


def _drops(log):
    """How many connections the worker dropped to make room, by its warnings (int)."""
    first = log.count("to accept the next")
    return first + sum(int(n) for n in re.findall(r"dropped (\d+) more waiting", log))


def test_soak_hostile_and_honest_clients(start_server, bb, crs_dir, reference_vk, tmp_path, capsys):
    # Queue places for every client that sends complete requests (8 honest, 2 half-closers,
    # 2 disconnects, the crafted proofs): the soak checks the defences, not the capacity
    # (test_hostile.py does).
    srv = start_server(MAX_QUEUED_REQUESTS=32, MAX_UPLOADING_REQUESTS=64, UPLOAD_DEADLINE_SECONDS=10,
                       UPLOAD_TIMEOUT_SECONDS=5, HEADER_TIMEOUT_SECONDS=3, MAX_CONCURRENT_PROOFS=PROOF_SLOTS,
                       VERIFY_CONCURRENCY=VERIFY_PLACES,
                       GUNICORN_CMD_ARGS=f"--worker-connections {WORKER_CONNECTIONS}")
    idle = probe(srv.port, 5)  # this machine's own noise, with nothing else to serve
    sampler = Sampler(srv.proc.pid, bb, interval=0.2)
    sampler.start()
    commands = CommandSampler(srv.proc.pid, bb)
    commands.start()
    proofs = tmp_path / "proofs"
    # The clients stand for machines elsewhere: a lower CPU priority than the server. The
    # health probes (the load balancer's) run here, at the server's priority.
    clients = subprocess.Popen([sys.executable, os.path.join(PROGRAMS, "hostile.py"), "--port", str(srv.port),
                                "--seconds", str(SECONDS), "--hostile", "32", "--honest", "8", "--health-interval", "0",
                                "--idle-connections", str(IDLE_CONNECTIONS),
                                "--witness", os.path.join(FIXTURES, "valid_1.gz"), "--proofs", str(proofs)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONPATH=TESTS), preexec_fn=lambda: os.nice(10))
    health = probe(srv.port, SECONDS)
    out, err = clients.communicate(timeout=240)
    for thread in (sampler, commands):
        thread.stop.set()
        thread.join()
    assert clients.returncode == 0, err
    report = json.loads(out.splitlines()[-1])

    verified = 0
    for proof in sorted(glob.glob(str(proofs / "*.proof"))):
        check = subprocess.run([bb, "verify", "-k", reference_vk, "-p", proof,
                                "-i", proof[:-len(".proof")] + ".public_inputs"] + crs_args(crs_dir),
                               capture_output=True, timeout=120)
        verified += check.returncode == 0
    assert wait_for(lambda: srv.leftovers() == [], timeout=10)
    left = sorted(os.path.relpath(path, srv.tmpdir) for path in glob.glob(os.path.join(srv.tmpdir, "**"), recursive=True)
                  if os.path.isfile(path) and not path.startswith(os.path.join(srv.tmpdir, "bb-worker-")))
    # The goal is HEALTH_P99_MS; a machine busy with other work (as a developer's may be) adds its
    # own delays, measured above with the server idle, which the limit allows for.
    limit = max(HEALTH_P99_MS, 4 * idle["p99_ms"])
    with capsys.disabled():  # the figures are the point of a soak: show them in every run
        print(f"\nsoak {SECONDS:g} s: honest {report['honest']} ({report['proofs']} proofs, {verified} verified, "
              f"p50 {report['honest_seconds']['p50']:.2f} s, max {report['honest_seconds']['max']:.2f} s)")
        for kind, outcomes in sorted(report["hostile"].items()):
            print(f"  hostile {kind}: {outcomes}")
        print(f"  health: {health['count']} probes {health['statuses']}, p50 {health['p50_ms']:.1f} ms, "
              f"p99 {health['p99_ms']:.1f} ms (limit {limit:.1f}; idle server: p50 {idle['p50_ms']:.1f} ms, "
              f"p99 {idle['p99_ms']:.1f} ms), max {health['max_ms']:.1f} ms; "
              f"server peak RSS {sampler.peak_rss / 2**20:.1f} MiB; 499s in the log: {srv.output().count(' 499 ')}")
        print(f"  bb processes at once: at most {commands.peak} (by command {dict(commands.peak_by)}; "
              f"{PROOF_SLOTS} proof slots, {VERIFY_PLACES} verification places, 1 self-check); "
              f"idle connections dropped for room: "
              f"{_drops(srv.output())} ({WORKER_CONNECTIONS} places)")

    assert report["unfinished_threads"] == 0
    assert set(report["honest"]) == {"200"} and report["proofs"] >= 8, report["honest"]
    assert verified == report["proofs"]
    for kind, outcomes in report["hostile"].items():
        assert set(outcomes) <= ALLOWED[kind], (kind, outcomes)
    assert report["hostile"]["half_close"].get("200", 0) > 0
    assert health["statuses"] == {"200": health["count"]} and health["count"] > SECONDS * 10
    assert health["p99_ms"] < limit
    # bb runs in a proof slot (prove, its verify, write_vk), a verification place, or for the
    # self-check of a failed verification, one at a time (selfcheck.SelfCheck), outside both.
    assert 0 < commands.peak <= PROOF_SLOTS + VERIFY_PLACES + 1
    assert commands.peak_by["prove"] + commands.peak_by["write_vk"] <= PROOF_SLOTS
    assert " fault=server " not in srv.output(), "something a client sent counted as a server fault"
    assert _drops(srv.output()) > 0, "the worker never was full: the soak does not test the drops"
    assert 0 < sampler.peak_rss < SERVER_RSS_LIMIT
    assert " 499 " in srv.output()  # the disconnects' proofs were stopped
    assert bb_processes(bb, under=srv.proc.pid) == []
    assert left == [], "files left in TMPDIR"
    assert "Traceback" not in srv.output()
