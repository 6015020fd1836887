"""Limits and faults on a live server: sizes, gzip bombs, slots, stalls, disconnects, SIGTERM, disk."""
import base64
import gzip
import json
import os
import shutil
import signal
import socket
import statistics
import threading
import time

import pytest

from support import alive, bb_processes, fixture_bytes, pids_in, request, request_json, tmpfs, wait_for

WITNESS = fixture_bytes("valid_1.gz")


def raw_exchange(port, head, body=b"", wait=10.0):
    """Send raw bytes, return what the server answers before it closes (bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(head + body)
        chunks = []
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
                if b"\r\n\r\n" in b"".join(chunks):
                    head_end = b"".join(chunks).index(b"\r\n\r\n")
                    length = [int(line.split(b":")[1]) for line in b"".join(chunks)[:head_end].split(b"\r\n")
                              if line.lower().startswith(b"content-length:")]
                    if length and len(b"".join(chunks)) >= head_end + 4 + length[0]:
                        break
        except (socket.timeout, ConnectionResetError):
            pass
    return b"".join(chunks)


# ---------------------------------------------------------------- sizes

def test_content_length_over_limit_is_413_before_reading(start_server):
    srv = start_server(MAX_BODY_BYTES=1000)
    # Announce 10 MB but send nothing: the answer must come without the body.
    head = b"POST /api/prove HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n"
    answer = raw_exchange(srv.port, head, wait=5)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b'"error":"Payload too large"' in answer
    assert srv.leftovers() == []


def test_chunked_body_over_limit_is_cut_off_with_413(start_server):
    import http.client
    srv = start_server(MAX_BODY_BYTES=1000)
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request("POST", "/api/prove", body=iter([WITNESS[:2]] + [b"\0" * 500] * 10), encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413
    assert b"exceeds 1000 bytes" in resp.read()
    conn.close()
    assert srv.leftovers() == []


def test_gzip_bomb_is_413_without_starting_bb(start_server, fake_bb, tmp_path):
    pidfile = tmp_path / "pids"
    srv = start_server(BB_BINARY=fake_bb, FAKE_BB_PIDFILE=pidfile, MAX_WITNESS_BYTES=1024 * 1024)
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), 9)
    assert len(bomb) < 100_000
    status, _, body = request_json(srv.port, "POST", "/api/prove", bomb)
    assert status == 413
    assert "decompressed" in body["message"]
    assert pids_in(pidfile) == []
    assert srv.leftovers() == []


# ---------------------------------------------------------------- the proof slots

def test_slots_bound_bb_across_worker_processes(start_server, fake_bb, tmp_path):
    log = tmp_path / "bb.log"
    srv = start_server(BB_BINARY=fake_bb, FAKE_BB_LOG=log, FAKE_BB_DELAY=0.3,
                       WEB_CONCURRENCY=3, MAX_CONCURRENT_PROOFS=1)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        request(srv.port, "POST", "/api/prove", WITNESS)[0])) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 6
    events = sorted((float(t), kind) for kind, t in (line.split() for line in log.read_text().splitlines()))
    running = peak = 0
    for _, kind in events:
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    assert peak == 1


def test_queue_timeout_is_503_with_retry_after(start_server, fake_bb):
    srv = start_server(BB_BINARY=fake_bb, FAKE_BB_DELAY=4, MAX_CONCURRENT_PROOFS=1, QUEUE_TIMEOUT_SECONDS=1)
    first = []
    t = threading.Thread(target=lambda: first.append(request(srv.port, "POST", "/api/prove", WITNESS)[0]))
    t.start()
    time.sleep(1)
    status, headers, body = request_json(srv.port, "POST", "/api/prove", WITNESS)
    t.join()
    assert first == [200]
    assert status == 503
    assert headers["retry-after"] == "1"
    assert body["error"] == "Service unavailable"
    assert srv.leftovers() == []


def test_stalled_upload_is_408_and_holds_no_slot(start_server, bb):
    srv = start_server(MAX_CONCURRENT_PROOFS=1, UPLOAD_TIMEOUT_SECONDS=2)
    stalled = socket.create_connection(("127.0.0.1", srv.port))
    stalled.sendall(b"POST /api/prove HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + WITNESS[:10])
    time.sleep(0.3)
    # While that upload stalls, a complete request gets the only slot.
    status, _, _ = request_json(srv.port, "POST", "/api/prove", WITNESS)
    assert status == 200
    stalled.settimeout(10)
    answer = stalled.recv(65536)
    stalled.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert srv.leftovers() == []


# ---------------------------------------------------------------- disconnects and bb faults

def test_client_gone_while_bb_runs_stops_bb_and_frees_the_slot(start_server, fake_bb, tmp_path):
    pidfile, mode = tmp_path / "pids", tmp_path / "mode"
    mode.write_text("sleep")
    srv = start_server(BB_BINARY=fake_bb, FAKE_BB_PIDFILE=pidfile, FAKE_BB_MODE_FILE=mode,
                       MAX_CONCURRENT_PROOFS=1, QUEUE_TIMEOUT_SECONDS=2)
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.sendall(b"POST /api/prove HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(WITNESS) + WITNESS)
    assert wait_for(lambda: pids_in(pidfile))
    s.close()
    pid = pids_in(pidfile)[0]
    assert wait_for(lambda: not alive(pid)), "bb still running after the client left"
    assert wait_for(lambda: srv.leftovers() == [])
    mode.write_text("ok")
    status, _, _ = request_json(srv.port, "POST", "/api/prove", WITNESS)
    assert status == 200  # the slot was freed (a held slot would answer 503 after 2 s)


def test_client_gone_mid_upload_leaves_nothing(start_server, fake_bb, tmp_path):
    pidfile = tmp_path / "pids"
    srv = start_server(BB_BINARY=fake_bb, FAKE_BB_PIDFILE=pidfile)
    for chunked in (False, True):
        s = socket.create_connection(("127.0.0.1", srv.port))
        if chunked:
            s.sendall(b"POST /api/prove HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"%x\r\n" % 200 + WITNESS[:200] + b"\r\n")
        else:
            s.sendall(b"POST /api/prove HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + WITNESS[:200])
        time.sleep(0.2)
        s.close()
    assert wait_for(lambda: srv.leftovers() == [])
    assert pids_in(pidfile) == []
    assert request(srv.port, "POST", "/api/prove", WITNESS)[0] == 200
    assert "Traceback" not in srv.output()


def test_timeout_kills_bb_and_its_children(start_server, fake_bb, tmp_path):
    pidfile = tmp_path / "pids"
    srv = start_server(BB_BINARY=fake_bb, FAKE_BB_MODE="grandchild", FAKE_BB_PIDFILE=pidfile,
                       PROVE_TIMEOUT_SECONDS=1)
    status, _, body = request_json(srv.port, "POST", "/api/prove", WITNESS)
    assert status == 504
    pids = pids_in(pidfile)
    assert len(pids) == 2  # bb and the child it started
    assert wait_for(lambda: not any(alive(pid) for pid in pids))
    assert bb_processes(fake_bb) == []
    assert srv.leftovers() == []


@pytest.mark.parametrize("mode, words", [("segv", "SIGSEGV"), ("nooutput", "without usable output")])
def test_bb_crash_is_500_and_next_request_works(start_server, fake_bb, tmp_path, mode, words):
    mode_file = tmp_path / "mode"
    mode_file.write_text(mode)
    srv = start_server(BB_BINARY=fake_bb, FAKE_BB_MODE_FILE=mode_file)
    status, _, body = request_json(srv.port, "POST", "/api/prove", WITNESS)
    assert status == 500
    assert body["error"] == "Internal server error" and words in body["message"]
    # bb fails the server's own witness too (the self-check): ours, so readiness says 503...
    status, _, health = request_json(srv.port, "GET", "/api/health")
    assert status == 503 and any(r.startswith("self-check failed") for r in health["reasons"]), health
    mode_file.write_text("ok")
    # ...until the check, run again in the background, passes: 200 by itself, then proofs again
    assert wait_for(lambda: request(srv.port, "GET", "/api/health")[0] == 200, timeout=20)
    assert request(srv.port, "POST", "/api/prove", WITNESS)[0] == 200
    assert srv.leftovers() == []


def test_bb_failure_reason_hides_temp_paths(start_server, fake_bb):
    srv = start_server(BB_BINARY=fake_bb, FAKE_BB_MODE="fail")
    status, _, body = request_json(srv.port, "POST", "/api/prove", WITNESS)
    assert status == 422
    assert body["message"].startswith("bb prove failed: deserialize_msgpack_compact: expected ARRAY type, got 3, at ")
    assert srv.tmpdir not in body["message"] and "mem:" not in body["message"]


# ---------------------------------------------------------------- shutdown

def test_sigterm_lets_the_proof_in_flight_finish(start_server, fake_bb, tmp_path):
    pidfile = tmp_path / "pids"
    srv = start_server(BB_BINARY=fake_bb, FAKE_BB_PIDFILE=pidfile, FAKE_BB_DELAY=2)
    result = []
    t = threading.Thread(target=lambda: result.append(request_json(srv.port, "POST", "/api/prove", WITNESS)))
    t.start()
    assert wait_for(lambda: pids_in(pidfile))
    stopped_at = time.monotonic()
    os.killpg(srv.proc.pid, signal.SIGTERM)
    time.sleep(0.1)
    try:  # gunicorn's gevent worker closes its listener at its next 1 s tick; until then, not ready
        status, _, body = request_json(srv.port, "GET", "/api/health", timeout=2)
        assert status == 503 and body["reasons"][0].startswith("stopping: SIGTERM"), body
    except OSError:
        pass
    time.sleep(1.5)
    with pytest.raises(OSError):  # then no process listens: new connections are refused
        request(srv.port, "GET", "/api/health", timeout=2)
    t.join()
    srv.proc.wait(timeout=30)
    assert result and result[0][0] == 200 and result[0][2]["success"] is True
    assert time.monotonic() - stopped_at < 15
    assert srv.leftovers() == []
    slots = os.path.join(srv.tmpdir, "bb-worker-slots")  # shared by servers; its lock files stay
    assert [n for n in os.listdir(slots) if n.startswith("waiting-")] == []


# ---------------------------------------------------------------- the temp dir

def test_temp_dir_not_writable_is_503_then_recovers(start_server):
    srv = start_server()
    work_dir = srv.work_dir
    shutil.rmtree(work_dir, ignore_errors=True)
    with open(work_dir, "w") as f:  # a file where the directory should be
        f.write("x")
    status, headers, body = request_json(srv.port, "POST", "/api/prove", WITNESS)
    assert status == 503
    assert body["message"].startswith("temp dir is not writable")
    assert "retry-after" in headers
    os.unlink(work_dir)  # the server makes the directory again itself
    assert request(srv.port, "POST", "/api/prove", WITNESS)[0] == 200
    assert os.stat(work_dir).st_mode & 0o777 == 0o700


def test_temp_dir_full_is_503_then_recovers(start_server, tmp_path):
    with tmpfs(tmp_path / "small", "4m") as small:
        srv = start_server(TMPDIR=small)
        filler = small / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        status, _, body = request_json(srv.port, "POST", "/api/prove", WITNESS)
        assert status == 503, body
        assert "space" in body["message"] or "not writable" in body["message"]
        filler.unlink()
        assert request(srv.port, "POST", "/api/prove", WITNESS)[0] == 200
        assert srv.leftovers() == []
        srv.stop()


# ---------------------------------------------------------------- health under load

def test_health_stays_fast_while_proofs_saturate_the_cpus(start_server, capsys):
    srv = start_server(MAX_CONCURRENT_PROOFS=2)
    stop = threading.Event()

    def prove_loop():
        while not stop.is_set():
            request(srv.port, "POST", "/api/prove", WITNESS)

    workers = [threading.Thread(target=prove_loop) for _ in range(4)]
    for w in workers:
        w.start()
    time.sleep(0.5)
    timings = []
    for _ in range(40):
        started = time.monotonic()
        status, _, _ = request(srv.port, "GET", "/api/health")
        timings.append((time.monotonic() - started) * 1000)
        assert status == 200
        time.sleep(0.05)
    stop.set()
    for w in workers:
        w.join()
    with capsys.disabled():
        print(f"\nhealth under load: median {statistics.median(timings):.1f} ms, max {max(timings):.1f} ms")
    assert statistics.median(timings) < 100


# ---------------------------------------------------------------- the queue

def test_queue_is_bounded_per_worker(start_server, fake_bb):
    srv = start_server(BB_BINARY=fake_bb, FAKE_BB_DELAY=2, MAX_CONCURRENT_PROOFS=1, MAX_QUEUED_REQUESTS=1)
    results = []
    threads = [threading.Thread(target=lambda: results.append(request(srv.port, "POST", "/api/prove", WITNESS)[0]))
               for _ in range(2)]
    for t in threads:  # one proves, one waits for the slot
        t.start()
        time.sleep(0.3)
    started = time.monotonic()
    status, headers, body = request_json(srv.port, "POST", "/api/prove", WITNESS)
    assert status == 503 and time.monotonic() - started < 1  # at once, not after the queue timeout
    assert "already queued" in body["message"] and headers["retry-after"] == "1"
    for t in threads:
        t.join()
    assert sorted(results) == [200, 200]
    assert request(srv.port, "POST", "/api/prove", WITNESS)[0] == 200  # the count went back down


def test_client_gone_while_queued_leaves_the_queue(start_server, fake_bb, tmp_path):
    pidfile = tmp_path / "pids"
    srv = start_server(BB_BINARY=fake_bb, FAKE_BB_PIDFILE=pidfile, FAKE_BB_DELAY=3, MAX_CONCURRENT_PROOFS=1)
    first = []
    t = threading.Thread(target=lambda: first.append(request(srv.port, "POST", "/api/prove", WITNESS)[0]))
    t.start()
    assert wait_for(lambda: pids_in(pidfile))
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.sendall(b"POST /api/prove HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(WITNESS) + WITNESS)
    time.sleep(0.3)
    s.close()
    # It leaves at once (a 499 in the log) while the first proof still runs, and never starts bb.
    assert wait_for(lambda: " 499 " in srv.output(), timeout=2)
    t.join()
    assert first == [200]
    assert len(pids_in(pidfile)) == 1
    assert srv.leftovers() == []


# ---------------------------------------------------------------- core dumps and verify bodies

@pytest.fixture
def unlimited_cores():
    """This process's (and so the server's) core file limit raised to unlimited for the test."""
    import resource

    before = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    yield
    resource.setrlimit(resource.RLIMIT_CORE, before)


def test_bb_leaves_no_core_file_whatever_the_servers_core_limit(start_server, fake_bb, tmp_path, unlimited_cores):
    """Started under `ulimit -c unlimited`, a bb that crashed left an 18 MB `core` in gunicorn's working
    directory (hundreds of MB for a big circuit): bb's core limit is 0 whatever the server's."""
    mode_file = tmp_path / "mode"
    mode_file.write_text("sleep")
    srv = start_server(BB_BINARY=fake_bb, FAKE_BB_MODE_FILE=mode_file, PROVE_TIMEOUT_SECONDS=60)
    answers = []
    t = threading.Thread(target=lambda: answers.append(request(srv.port, "POST", "/api/prove", WITNESS, timeout=60)))
    t.start()
    assert wait_for(lambda: bb_processes(fake_bb))
    bb = bb_processes(fake_bb)
    with open(f"/proc/{bb[0]}/limits") as f:
        core = [line for line in f if line.startswith("Max core file size")]
    assert core and core[0].split()[4:6] == ["0", "0"], core
    with open(f"/proc/{srv.proc.pid}/limits") as f:  # the server's own limit stays what it was given
        assert "unlimited" in [line for line in f if line.startswith("Max core file size")][0]
    mode_file.write_text("segv")  # every run crashes from now on, the self-check's too
    os.kill(bb[0], signal.SIGSEGV)  # a crash mid-proof
    t.join()
    assert answers[0][0] == 500
    cores = [os.path.join(d, n) for d in (os.path.dirname(os.path.dirname(fake_bb)), srv.tmpdir, os.getcwd())
             for n in os.listdir(d) if n.startswith("core")]
    cores += [os.path.join(root, n) for root, _, names in os.walk(srv.tmpdir) for n in names if n.startswith("core")]
    assert cores == []


def test_verify_bodies_larger_than_the_circuit_needs_are_413_unread_and_liveness_stays_fast(server, capsys):
    """1 MB of JSON with 14,500 public inputs was parsed (about 47 ms, without yielding) before anything
    applied: 10 at once stalled /api/live 345 ms. A verify body is now bounded by what the circuit's
    proofs can need (about 40 KB for the demo circuit) before any byte of it is read."""
    inputs = ["0x" + "07" * 32] * 14500
    body = json.dumps({"proof": base64.b64encode(bytes(14656)).decode(), "publicInputs": inputs}).encode()
    assert len(body) > 1_000_000
    results, latencies = [], []

    def send():
        results.append(request_json(server.port, "POST", "/api/verify", body, {"Content-Type": "application/json"}))
    threads = [threading.Thread(target=send) for _ in range(10)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        started = time.perf_counter()
        assert request(server.port, "GET", "/api/live")[0] == 200
        latencies.append((time.perf_counter() - started) * 1000)
    for t in threads:
        t.join()
    assert [(status, payload["error"]) for status, _, payload in results] == [(413, "Payload too large")] * 10
    assert all("this circuit" not in payload["message"] for _, _, payload in results)  # refused by its size alone
    lines = [line for line in server.output().splitlines() if " POST /api/verify 413 " in line]
    assert lines and all(" in=0 " in line for line in lines[-10:]), lines[-10:]  # nothing of the bodies was read
    with capsys.disabled():
        print(f"\n/api/live during 10 oversized verify bodies: {len(latencies)} probes, "
              f"max {max(latencies, default=0):.1f} ms")
    assert max(latencies, default=0) < 1000
