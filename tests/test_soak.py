"""Soak (issue 12): 32 hostile and 8 honest clients for 60 s against one live server.

The clients are tests/hostile.py, run as a separate process; /api/health is
polled from a process of its own. Every honest request must get a 200 whose
proof `bb verify` accepts, health must stay fast, the server's memory flat, and
nothing may be left in TMPDIR.
"""
import glob
import json
import multiprocessing
import os
import subprocess
import sys
import time

import pytest

from conftest import FIXTURES, crs_args
from hostile import percentile, probe_health
from support import ROOT, Sampler, bb_processes, wait_for

pytestmark = pytest.mark.stress

SECONDS = 60
HEALTH_P99_MS = 20
SERVER_RSS_LIMIT = 150 * 1024 * 1024
# What each hostile kind may get (hostile.py's outcomes; "unfinished": cut by the end of the run).
ALLOWED = {
    "trickle_upload": {"408", "unfinished"},  # UPLOAD_DEADLINE_SECONDS below
    "trickle_headers": {"dropped", "unfinished"},  # HEADER_TIMEOUT_SECONDS below
    "half_close": {"200"},
    "gzip_members": {"400"},
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


def test_soak_hostile_and_honest_clients(start_server, bb, crs_dir, reference_vk, tmp_path, capsys):
    # Queue places for every client that sends complete requests (8 honest, 5 half-closers,
    # 4 disconnects): the soak checks the defences, not the capacity (test_hostile.py does).
    srv = start_server(MAX_QUEUED_REQUESTS=32, MAX_UPLOADING_REQUESTS=64, UPLOAD_DEADLINE_SECONDS=10,
                       UPLOAD_TIMEOUT_SECONDS=5, HEADER_TIMEOUT_SECONDS=3)
    idle = probe(srv.port, 5)  # this machine's own noise, with nothing else to serve
    sampler = Sampler(srv.proc.pid, bb, interval=0.2)
    sampler.start()
    proofs = tmp_path / "proofs"
    # The clients stand for machines elsewhere: a lower CPU priority than the server. The
    # health probes (the load balancer's) run here, at the server's priority.
    clients = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "hostile.py"), "--port", str(srv.port),
                                "--seconds", str(SECONDS), "--hostile", "32", "--honest", "8", "--health-interval", "0",
                                "--witness", os.path.join(FIXTURES, "valid_1.gz"), "--proofs", str(proofs)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: os.nice(10))
    health = probe(srv.port, SECONDS)
    out, err = clients.communicate(timeout=240)
    sampler.stop.set()
    sampler.join()
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

    assert report["unfinished_threads"] == 0
    assert set(report["honest"]) == {"200"} and report["proofs"] >= 8, report["honest"]
    assert verified == report["proofs"]
    for kind, outcomes in report["hostile"].items():
        assert set(outcomes) <= ALLOWED[kind], (kind, outcomes)
    assert report["hostile"]["half_close"].get("200", 0) > 0
    assert health["statuses"] == {"200": health["count"]} and health["count"] > SECONDS * 10
    assert health["p99_ms"] < limit
    assert 0 < sampler.peak_rss < SERVER_RSS_LIMIT
    assert " 499 " in srv.output()  # the disconnects' proofs were stopped
    assert bb_processes(bb, under=srv.proc.pid) == []
    assert left == [], "files left in TMPDIR"
    assert "Traceback" not in srv.output()
