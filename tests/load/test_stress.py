"""Load test: 32 clients, a few hundred mixed requests against a live server with the real bb.

Afterwards: one well-formed answer per request with the right status, every proof
verifies, no temp files, no bb left, server RSS and bb concurrency within bounds.
"""
import base64
import gzip
import http.client
import json
import os
import queue
import random
import socket
import statistics
import threading
import time
from collections import Counter

import pytest

from support import Sampler, VALID, bb_processes, expected, fixture_bytes, wait_for

pytestmark = pytest.mark.stress

CLIENTS = 32
REQUESTS = 320
MAX_BODY = 256 * 1024
MAX_WITNESS = 8 * 1024 * 1024
SERVER_RSS_LIMIT = 150 * 1024 * 1024


def make_plan(rng):
    """A shuffled list of (kind, body bytes, expected status or None for a disconnect)."""
    bomb = gzip.compress(b"\0" * (MAX_WITNESS * 4), 9)
    kinds = (["valid"] * 40 + ["unsatisfied"] * 8 + ["garbage"] * 12 + ["bomb"] * 8 + ["oversize"] * 8
             + ["truncated"] * 8 + ["gone_upload"] * 8 + ["gone_proving"] * 8)
    plan = []
    for i in range(REQUESTS):
        kind = kinds[i % len(kinds)]
        if kind in ("valid", "gone_proving"):
            name = rng.choice(VALID)
            plan.append((kind, name, fixture_bytes(name), 200 if kind == "valid" else None))
        elif kind == "unsatisfied":
            plan.append((kind, None, fixture_bytes("unsatisfied.gz"), 422))
        elif kind == "garbage":
            plan.append((kind, None, rng.randbytes(rng.randint(1, 4000)), 400))
        elif kind == "bomb":
            plan.append((kind, None, bomb, 413))
        elif kind == "oversize":
            plan.append((kind, None, b"\x1f\x8b" + rng.randbytes(MAX_BODY), 413))
        elif kind == "truncated":
            plan.append((kind, None, fixture_bytes(rng.choice(VALID))[:rng.randint(10, 300)], 400))
        else:
            plan.append((kind, None, fixture_bytes("valid_1.gz"), None))
    rng.shuffle(plan)
    return plan


def send(port, kind, body):
    """Do one request; returns (status, headers, body bytes, seconds) or None for a disconnect."""
    started = time.monotonic()
    if kind == "gone_upload":
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /api/prove HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
                      + body[:len(body) // 2])
        return None
    if kind == "gone_proving":
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /api/prove HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            time.sleep(0.05)
        return None
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/api/prove", body=body, headers={"Content-Type": "application/gzip"})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data, time.monotonic() - started
    except (BrokenPipeError, ConnectionResetError):
        # An early 413 may close before the whole oversize body is sent.
        return "reset", {}, b"", time.monotonic() - started
    finally:
        conn.close()


def test_mixed_load(start_server, bb, verify, capsys):
    srv = start_server(WEB_CONCURRENCY=2, MAX_BODY_BYTES=MAX_BODY, MAX_WITNESS_BYTES=MAX_WITNESS,
                       QUEUE_TIMEOUT_SECONDS=60, MAX_QUEUED_REQUESTS=2 * CLIENTS, PROOF_CORES=2)  # 2 bb at most
    # The queue cap is not under test here: a client that hung up keeps its place until the
    # server notices (a FIN, then a probe), while its thread already sends the next request, so
    # under load more than CLIENTS requests can be queued for a moment.
    rng = random.Random(20261129)
    plan = make_plan(rng)
    work = queue.Queue()
    for item in plan:
        work.put(item)
    results = []
    lock = threading.Lock()

    def client():
        while True:
            try:
                kind, name, body, want = work.get_nowait()
            except queue.Empty:
                return
            got = send(srv.port, kind, body)
            with lock:
                results.append((kind, name, want, got))

    sampler = Sampler(srv.proc.pid, bb)
    sampler.start()
    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    time.sleep(0.5)  # let the server finish with the clients that hung up
    sampler.stop.set()
    sampler.join()

    assert len(results) == REQUESTS
    by_status, latencies, request_ids, wrong = Counter(), [], set(), []
    proofs = []
    for kind, name, want, got in results:
        if want is None:
            by_status["(client gone)"] += 1
            continue
        status, headers, data, seconds = got
        by_status[status] += 1
        if status == "reset" and kind == "oversize":
            continue
        latencies.append(seconds)
        payload = json.loads(data)
        request_ids.add(headers["x-request-id"])
        if status != want:
            wrong.append((kind, status, payload))
        elif status == 200:
            assert payload["publicInputs"] == expected()[name]["public_inputs"]
            proofs.append((base64.b64decode(payload["proof"]), payload["publicInputs"]))
        else:
            assert set(payload) == {"error", "message"} and all(isinstance(v, str) for v in payload.values())
    assert wrong == []
    assert len(request_ids) == sum(1 for *_, want, got in results if want is not None and got[0] != "reset")

    latencies.sort()
    with capsys.disabled():  # the summary is the point of a load test: show it in every run
        print(f"\n{REQUESTS} requests from {CLIENTS} clients in {elapsed:.1f} s")
        print("  by status: " + ", ".join(f"{k}: {v}" for k, v in sorted(by_status.items(), key=str)))
        print(f"  latency p50 {statistics.median(latencies) * 1000:.0f} ms, "
              f"p95 {latencies[int(len(latencies) * 0.95)] * 1000:.0f} ms")
        print(f"  peak bb processes {sampler.peak_bb} (limit 2), peak server RSS "
              f"{sampler.peak_rss / 2**20:.1f} MiB over {sampler.samples} samples")

    assert all(verify(proof, public) for proof, public in proofs)
    assert len(proofs) == sum(1 for *_, want, _ in results if want == 200)
    # A client that hung up last may still be being cleaned up (bb killed, its files removed): allow that.
    assert wait_for(lambda: srv.leftovers() == [] and bb_processes(bb, under=srv.proc.pid) == [], timeout=15), \
        (srv.leftovers(), bb_processes(bb, under=srv.proc.pid))
    assert sampler.peak_bb <= 2
    assert 0 < sampler.peak_rss < SERVER_RSS_LIMIT
    assert "Traceback" not in srv.output()
    assert os.path.isdir(srv.work_dir)
