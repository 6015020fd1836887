"""Issue 11 on live servers: health tells the truth, server faults are 5xx, each server owns its files and bb.

Each test checks a status and the health code, and recovery without a restart where the cause can go away.
"""
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from support import (CIRCUIT, Server, alive, bb_processes, descendants, expected, fd_paths, fixture_bytes, pids_in,
                     request, request_json, wait_for)

WITNESS = fixture_bytes("valid_1.gz")
G1 = "bn254_g1.dat"


def health(srv, path="/api/health"):
    status, _, body = request_json(srv.port, "GET", path)
    return status, body


@pytest.fixture
def own_crs(crs_dir, tmp_path):
    """A CRS directory of this test's own (a copy of the real one): tests break it."""
    target = tmp_path / "crs"
    target.mkdir()
    shutil.copyfile(os.path.join(crs_dir, G1), target / G1)
    return target


# ---------------------------------------------------------------- the CRS

def test_crs_removed_then_restored_health_and_proofs_follow_without_restart(start_server, own_crs):
    srv = start_server(BB_CRS_PATH=own_crs)
    assert health(srv)[0] == 200
    assert request(srv.port, "POST", "/api/prove", WITNESS)[0] == 200
    os.rename(own_crs / G1, own_crs / "away")
    status, body = health(srv)  # the very next check
    assert status == 503 and body["status"] == "unavailable"
    assert any("CRS too small" in r and "holds 0 G1 points" in r for r in body["reasons"]), body
    status, headers, body = request_json(srv.port, "POST", "/api/prove", WITNESS)
    assert status == 503 and headers["retry-after"] == "30" and body["message"].startswith("CRS"), body
    assert request(srv.port, "GET", "/api/live")[0] == 200  # alive all along: no restart wanted
    os.rename(own_crs / "away", own_crs / G1)
    assert health(srv)[0] == 200
    assert request(srv.port, "POST", "/api/prove", WITNESS)[0] == 200


def test_crs_smaller_than_the_circuit_needs_is_503_not_422(start_server, own_crs):
    srv = start_server(BB_CRS_PATH=own_crs)  # the VK gets computed and cached with the full CRS
    assert health(srv)[0] == 200
    with open(own_crs / G1, "r+b") as f:
        f.truncate(2000 * 64)  # the demo circuit is 2^12 rows
    status, body = health(srv)
    assert status == 503
    assert any("holds 2000 G1 points" in r and "needs 4096" in r for r in body["reasons"]), body
    status, headers, body = request_json(srv.port, "POST", "/api/prove", WITNESS)
    assert status == 503 and "retry-after" in headers, body


def test_empty_crs_offline_is_503_and_recovers_when_the_crs_arrives(start_server, crs_dir, tmp_path):
    empty = tmp_path / "empty-crs"
    empty.mkdir()
    srv = start_server(BB_CRS_PATH=empty)  # bb tries to download the CRS for the VK and fails offline
    status, body = health(srv)
    if status == 200:
        pytest.skip("bb downloaded the CRS: this machine has internet access")
    assert status == 503 and body["status"] == "unavailable"
    assert "could not be computed" in body["reasons"][0] and "CRS" in body["reasons"][0], body
    status, headers, body = request_json(srv.port, "POST", "/api/prove", WITNESS)
    assert status == 503 and "retry-after" in headers
    shutil.copyfile(os.path.join(crs_dir, G1), empty / G1)
    assert wait_for(lambda: health(srv)[0] == 200, timeout=60)  # the VK is retried by itself
    assert request(srv.port, "POST", "/api/prove", WITNESS)[0] == 200


def test_verify_and_vk_follow_readiness_like_prove(start_server, own_crs, bb, tmp_path):
    binary = tmp_path / "bb-copy"
    shutil.copy(bb, binary)
    srv = start_server(BB_CRS_PATH=own_crs, BB_BINARY=binary)
    status, _, proof = request_json(srv.port, "POST", "/api/prove", WITNESS)
    assert status == 200
    body = json.dumps({"proof": proof["proof"], "publicInputs": proof["publicInputs"]})
    json_type = {"Content-Type": "application/json"}
    os.rename(own_crs / G1, own_crs / "away")  # the VK is cached: bb verify would try to download the CRS
    started = time.monotonic()
    for method, path, data in (("POST", "/api/verify", body), ("GET", "/api/vk", None)):
        status, headers, reply = request_json(srv.port, method, path, data, json_type)
        assert status == 503 and headers["retry-after"] == "30" and reply["message"].startswith("CRS"), reply
    assert time.monotonic() - started < 3  # refused by readiness: bb never ran
    os.rename(own_crs / "away", own_crs / G1)
    assert request_json(srv.port, "POST", "/api/verify", body, json_type)[2] == {"valid": True}
    os.unlink(binary)
    for method, path, data in (("POST", "/api/verify", body), ("GET", "/api/vk", None)):
        status, headers, reply = request_json(srv.port, method, path, data, json_type)
        assert status == 503 and "retry-after" in headers and "bb is not usable" in reply["message"], reply


# ---------------------------------------------------------------- the circuit, the VK, bb's configuration

def test_unreadable_bytecode_is_503_with_the_reason(start_server, tmp_path):
    circuit = tmp_path / "broken.json"
    circuit.write_text('{"noir_version": "1.0.0-beta.26", "bytecode": "H4sIAAAA"}')
    srv = start_server(CIRCUIT_PATH=circuit)
    status, body = health(srv)
    assert status == 503 and "Invalid gzip data" in body["reasons"][0], body
    status, _, body = request_json(srv.port, "POST", "/api/prove", WITNESS)
    assert status == 503 and "Invalid gzip data" in body["message"]
    for _ in range(2):  # readiness answers: the failed VK is not computed again per call
        status, _, body = request_json(srv.port, "GET", "/api/vk")
        assert status == 503 and "Invalid gzip data" in body["message"], body


def test_a_verifier_target_bb_rejects_is_503_naming_it(start_server):
    srv = start_server(VERIFIER_TARGET="starknet")
    status, body = health(srv)
    assert status == 503
    assert "-t starknet" in body["reasons"][0] and "Invalid proof system settings" in body["reasons"][0], body


def test_listens_at_once_and_answers_starting_while_the_vk_is_computed(start_server, fake_bb):
    srv = start_server(ready=False, BB_BINARY=fake_bb, FAKE_BB_VK_DELAY=3)
    status, body = wait_for(lambda: _answer(srv), timeout=10)
    assert status == 503 and body["status"] == "starting", body
    assert request(srv.port, "GET", "/api/live")[0] == 200
    status, headers, body = request_json(srv.port, "POST", "/api/prove", WITNESS)
    assert status == 503 and body["message"].startswith("starting") and "retry-after" in headers
    assert wait_for(lambda: health(srv)[0] == 200, timeout=20)
    assert request(srv.port, "POST", "/api/prove", WITNESS)[0] == 200


def _answer(srv):
    try:
        return health(srv)
    except OSError:
        return None


def test_per_circuit_readiness(start_server, tmp_path):
    circuits = tmp_path / "circuits"
    circuits.mkdir()
    shutil.copyfile(CIRCUIT, circuits / "good.json")
    (circuits / "bad.json").write_text('{"bytecode": "H4sIAAAA"}')
    srv = start_server(CIRCUITS_DIR=circuits)
    status, body = wait_for(lambda: (lambda a: a if a[1]["circuits"]["good"]["ready"] else None)(health(srv)),
                            timeout=15)
    assert status == 503
    assert body["circuits"]["good"] == {"ready": True, "reasons": []}
    assert body["circuits"]["bad"]["ready"] is False and "Invalid gzip data" in body["circuits"]["bad"]["reasons"][0]
    assert any(r.startswith("circuit bad: ") for r in body["reasons"])
    assert health(srv, "/api/health/good")[0] == 200
    assert health(srv, "/api/health/bad")[0] == 503
    assert request(srv.port, "POST", "/api/prove/good", WITNESS)[0] == 200
    assert request(srv.port, "POST", "/api/prove/bad", WITNESS)[0] == 503


# ---------------------------------------------------------------- faults classified; the breaker

@pytest.mark.parametrize("mode, code, outcome", [
    ("fail", 422, "rejected"), ("crs", 503, "crs_unavailable"), ("nospace", 503, "unavailable"),
    ("unknown", 500, "server_error"), ("segv", 500, "crashed"),
])
def test_bb_failures_are_told_apart(start_server, fake_bb, tmp_path, mode, code, outcome):
    mode_file = tmp_path / "mode"
    mode_file.write_text(mode)
    srv = start_server(BB_BINARY=fake_bb, FAKE_BB_MODE_FILE=mode_file)
    status, headers, body = request_json(srv.port, "POST", "/api/prove", WITNESS)
    assert status == code, body
    assert ("retry-after" in headers) == (code == 503)
    if mode == "crs":
        assert headers["retry-after"] == "30"
        assert health(srv)[0] == 503  # a failure that points at the CRS takes the instance out at once
    rid = headers["x-request-id"]
    line = wait_for(lambda: [x for x in srv.output().splitlines() if rid in x and "bb_worker.access" in x],
                    timeout=15)
    fault = "client" if code == 422 else "server"
    assert re.search(rf" {code} .* outcome={outcome} fault={fault} client=", line[0]), line
    metrics = request(srv.port, "GET", "/api/metrics")[2].decode()
    assert f'bb_worker_proofs_total{{circuit="default",outcome="{outcome}"}} 1.0' in metrics
    assert srv.leftovers() == []


def test_a_fault_the_self_check_confirms_takes_the_instance_out_until_it_passes(start_server, fake_bb, tmp_path):
    mode_file = tmp_path / "mode"
    mode_file.write_text("unknown")  # every proof fails, the server's own witness's too: ours
    srv = start_server(BB_BINARY=fake_bb, FAKE_BB_MODE_FILE=mode_file)
    status, _, body = request_json(srv.port, "POST", "/api/prove", WITNESS)
    assert status == 500 and body["message"] == "bb failed: something bb-worker has never seen"
    status, body = health(srv)
    assert status == 503 and body["reasons"] == ["self-check failed: bb failed: something bb-worker has never seen"]
    status, headers, _ = request_json(srv.port, "POST", "/api/prove", WITNESS)
    assert status == 503 and 1 <= int(headers["retry-after"]) <= 5
    mode_file.write_text("ok")
    assert wait_for(lambda: health(srv)[0] == 200, timeout=20)  # the check again, in the background
    assert request(srv.port, "POST", "/api/prove", WITNESS)[0] == 200


@pytest.mark.parametrize("mode", ["unknown", "segv", "nooutput", "shortproof"])
def test_a_failure_only_the_clients_witness_causes_is_422_and_never_takes_the_instance_out(
        start_server, fake_bb, mode):
    """bb failing on one witness while it proves the server's own is the witness's fault, however it
    fails: a crafted witness cannot take the server out (it could when three of them opened a breaker)."""
    srv = start_server(BB_BINARY=fake_bb, FAKE_BB_MODE=mode, FAKE_BB_SPARE_OWN_WITNESS="1")
    for _ in range(5):
        status, _, body = request_json(srv.port, "POST", "/api/prove", WITNESS)
        assert status == 422 and body["message"].startswith("bb prove failed on this witness: "), body
        assert health(srv)[0] == 200


# ---------------------------------------------------------------- nothing a client sends moves readiness

def verify_body(proof, public_inputs):
    return json.dumps({"proof": base64.b64encode(proof).decode(), "publicInputs": public_inputs}).encode()


def test_crafted_proofs_are_invalid_and_never_take_the_instance_out(start_server):
    """The issue's 14 KB request (14,656 zero bytes and a valid public input) made bb verify exit 1 with
    "Cannot aggregate: incoming pairing points are at infinity", answered 500 and fed a breaker: three
    of them and every honest proof got 503. Now bb's failure is confirmed by the self-check (a fresh
    server knows no proof yet: it proves its own witness and verifies that), and it is a verdict."""
    srv = start_server()
    good = expected()["valid_1.gz"]["public_inputs"]
    json_type = {"Content-Type": "application/json"}
    for proof in (bytes(14656), bytes(14656), bytes(14656), os.urandom(14656), b"\xff" * 14656):
        status, _, body = request_json(srv.port, "POST", "/api/verify", verify_body(proof, good), json_type)
        assert (status, body) == (200, {"valid": False})
        assert health(srv)[0] == 200
    assert "self-check failed" not in srv.output()
    status, _, proved = request_json(srv.port, "POST", "/api/prove", WITNESS)
    assert status == 200
    status, _, body = request_json(srv.port, "POST", "/api/verify", json.dumps(proved).encode(), json_type)
    assert (status, body) == (200, {"valid": True})


def test_a_crs_changed_under_the_server_is_ours_and_readiness_says_so_until_restored(start_server, own_crs):
    """A CRS whose points changed after the VK was computed makes proofs of the right shape that bb verify
    rejects: 500 "Proof failed verification", and the self-check (the VK computed again differs) takes
    the instance out until the CRS is right again."""
    srv = start_server(BB_CRS_PATH=own_crs)
    assert request(srv.port, "POST", "/api/prove", WITNESS)[0] == 200
    original = (own_crs / G1).read_bytes()
    changed = bytearray(original)
    changed[128:192], changed[192:256] = changed[192:256], changed[128:192]  # points 2 and 3 swapped
    (own_crs / G1).write_bytes(bytes(changed))
    status, _, body = request_json(srv.port, "POST", "/api/prove", WITNESS)
    assert (status, body["error"]) == (500, "Proof failed verification"), body
    status, body = health(srv)
    assert status == 503 and "another verification key" in body["reasons"][0], body
    (own_crs / G1).write_bytes(original)
    assert wait_for(lambda: health(srv)[0] == 200, timeout=20)
    assert request(srv.port, "POST", "/api/prove", WITNESS)[0] == 200


def test_a_crs_that_is_not_the_ignition_ceremonys_is_not_ready_unless_proofs_go_unverified(start_server, own_crs):
    """A development CRS (a known secret, bench/dev_crs.py) or another ceremony's: bb proves with it, but
    bb verify pins the Ignition G2 point, so no proof would ever verify. Readiness says so at once."""
    g1 = bytearray((own_crs / G1).read_bytes())
    g1[64:128], g1[128:192] = g1[128:192], g1[64:128]  # point 1 is no longer Ignition's [x]_1
    (own_crs / G1).write_bytes(bytes(g1))
    srv = start_server(BB_CRS_PATH=own_crs, ready=False).wait_ready()
    status, body = health(srv)
    assert status == 503 and body["reasons"][0].startswith("CRS not the Aztec Ignition ceremony's"), body
    status, _, body = request_json(srv.port, "POST", "/api/prove", WITNESS)
    assert status == 503 and body["message"].startswith("CRS not the Aztec Ignition"), body
    srv.stop()
    unverified = start_server(BB_CRS_PATH=own_crs, VERIFY_PROOFS="0")  # the benchmark's way with a dev CRS
    assert health(unverified)[0] == 200


def test_a_slot_file_open_to_others_is_503_and_readiness_follows_both_ways(start_server, fake_bb):
    """The issue's sequence: `chmod 666` slot-1.lock, prove (503), `chmod 600` it back. The failed scan
    had kept slot 0: every later proof waited QUEUE_TIMEOUT_SECONDS for a 503 while health said 200."""
    srv = start_server(BB_BINARY=fake_bb, PROOF_CORES=2, MAX_CONCURRENT_PROOFS=2, QUEUE_TIMEOUT_SECONDS=20)
    assert request(srv.port, "POST", "/api/prove", WITNESS)[0] == 200  # the slot files exist
    slot = Path(srv.tmpdir) / "bb-worker-slots" / "slot-1.lock"
    slot.chmod(0o666)
    status, _, body = request_json(srv.port, "POST", "/api/prove", WITNESS)
    assert status == 503 and "writable by other users" in body["message"], body
    status, body = health(srv)
    assert status == 503 and "proof slots unusable" in body["reasons"][0], body
    slot.chmod(0o600)
    assert health(srv)[0] == 200
    started = time.monotonic()
    assert [request(srv.port, "POST", "/api/prove", WITNESS)[0] for _ in range(3)] == [200] * 3
    assert time.monotonic() - started < 10, "a proof waited for a slot nobody held"


def test_a_proof_bb_verify_rejects_is_the_witnesss_once_bb_verify_accepts_a_known_proof(start_server, fake_bb,
                                                                                         tmp_path):
    mode_file = tmp_path / "mode"
    mode_file.write_text("unverified")  # bb proves a proof that bb verify rejects, without a builder failure
    srv = start_server(BB_BINARY=fake_bb, FAKE_BB_MODE_FILE=mode_file, FAKE_BB_SPARE_OWN_WITNESS="1")
    status, _, body = request_json(srv.port, "POST", "/api/prove", WITNESS)
    assert (status, body["error"]) == (500, "Proof failed verification")  # no proof ever verified here: ours
    assert health(srv)[0] == 200  # ...but nothing says the server is broken either: readiness stays
    mode_file.write_text("ok")
    assert request(srv.port, "POST", "/api/prove", WITNESS)[0] == 200  # a proof bb verify accepts
    mode_file.write_text("unverified")
    for _ in range(3):  # bb verify accepts the known proof still: this witness's proofs are at fault
        status, _, body = request_json(srv.port, "POST", "/api/prove", WITNESS)
        assert status == 422 and "proof failed verification" in body["message"], body
        assert health(srv)[0] == 200


def test_rejected_witnesses_never_take_the_instance_out(start_server, fake_bb):
    srv = start_server(BB_BINARY=fake_bb, FAKE_BB_MODE="fail")
    for _ in range(5):
        assert request(srv.port, "POST", "/api/prove", WITNESS)[0] == 422
    assert health(srv)[0] == 200


# ---------------------------------------------------------------- files: each server its own

def test_two_servers_sharing_tmpdir_lose_no_proof(tmp_path, fake_bb, crs_dir):
    tmpdir = tmp_path / "shared-tmp"
    tmpdir.mkdir()
    env = {"BB_BINARY": fake_bb, "BB_CRS_PATH": crs_dir, "TMPDIR": str(tmpdir), "FAKE_BB_DELAY": "0.3",
           "MAX_CONCURRENT_PROOFS": "2", "QUEUE_TIMEOUT_SECONDS": "60"}
    first = Server(str(tmp_path / "a"), env).wait_ready()
    second = None
    try:
        results = []

        def load(srv, n):
            for _ in range(n):
                results.append(request(srv.port, "POST", "/api/prove", WITNESS)[0])
        threads = [threading.Thread(target=load, args=(first, 6)) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # proofs of the first server are queued and in flight now
        second = Server(str(tmp_path / "b"), env).wait_ready()  # its start-up must not touch them
        threads += [threading.Thread(target=load, args=(second, 6)) for _ in range(2)]
        for t in threads[3:]:
            t.start()
        for t in threads:
            t.join()
        assert results == [200] * 30
        runs = sorted(os.listdir(tmpdir))
        assert len([r for r in runs if r.startswith("bb-worker-run-")]) == 2, runs
        assert first.leftovers() == [] and second.leftovers() == []
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert not [r for r in os.listdir(tmpdir) if r.startswith("bb-worker-run-")]  # each removed its own


def test_a_killed_servers_files_are_removed_by_the_next_one_only(tmp_path, fake_bb, crs_dir):
    tmpdir = tmp_path / "shared-tmp"
    tmpdir.mkdir()
    env = {"BB_BINARY": fake_bb, "BB_CRS_PATH": crs_dir, "TMPDIR": str(tmpdir)}
    dead = Server(str(tmp_path / "dead"), env).wait_ready()
    dead_run = [r for r in os.listdir(tmpdir) if r.startswith("bb-worker-run-")]
    os.killpg(dead.proc.pid, signal.SIGKILL)
    dead.stop()
    assert [r for r in os.listdir(tmpdir) if r.startswith("bb-worker-run-")] == dead_run  # no finally ran
    with Server(str(tmp_path / "next"), env).wait_ready():
        runs = [r for r in os.listdir(tmpdir) if r.startswith("bb-worker-run-")]
        assert len(runs) == 1 and runs != dead_run


def test_kill_9_of_a_worker_mid_proof_leaves_no_bb_and_no_files(start_server, fake_bb, tmp_path):
    """bb dies with its worker (PR_SET_PDEATHSIG); the master removes the worker's files and scheduler
    state. (bb 5 starts no processes of its own: tests/bbrunner/test_process.py.)"""
    pidfile = tmp_path / "pids"
    srv = start_server(BB_BINARY=fake_bb, FAKE_BB_MODE="sleep", FAKE_BB_PIDFILE=pidfile, MAX_CONCURRENT_PROOFS=1,
                       PROVE_TIMEOUT_SECONDS=60)
    worker_dir = srv.work_dir
    worker = int(os.path.basename(worker_dir)[1:])
    t = threading.Thread(target=lambda: _try(lambda: request(srv.port, "POST", "/api/prove", WITNESS, timeout=30)))
    t.start()
    bb = wait_for(lambda: bb_processes(fake_bb), timeout=15)
    assert len(bb) == 1 and os.listdir(worker_dir)  # bb runs; the witness is on disk
    assert any(path.endswith("slot-0.lock") for path in fd_paths(bb[0])), fd_paths(bb[0])  # bb holds the slot too
    started = pids_in(pidfile)
    os.kill(worker, signal.SIGKILL)
    t.join()
    assert wait_for(lambda: not bb_processes(fake_bb), timeout=5), "bb outlived its worker"
    assert wait_for(lambda: not any(alive(pid) for pid in started), timeout=5)
    assert wait_for(lambda: not os.path.exists(worker_dir), timeout=10), os.listdir(worker_dir)
    slots = os.path.join(srv.tmpdir, "bb-worker-slots")
    assert not [n for n in os.listdir(slots) if n.startswith(f"waiting-{worker}-")]  # the master forgot it
    # gunicorn starts a new worker; the slot is free again and no more than one bb ever runs
    srv.wait_ready()
    new_dirs = wait_for(lambda: srv.worker_dirs(), timeout=15)
    assert new_dirs and new_dirs != [worker_dir]
    assert not alive(worker) or worker not in descendants(srv.proc.pid)


def test_removing_the_slot_directory_mid_proof_never_lets_a_second_bb_start(start_server, fake_bb, tmp_path):
    log = tmp_path / "bb.log"
    srv = start_server(BB_BINARY=fake_bb, FAKE_BB_DELAY=1.5, FAKE_BB_LOG=log, MAX_CONCURRENT_PROOFS=1)
    results = []
    first = threading.Thread(target=lambda: results.append(request(srv.port, "POST", "/api/prove", WITNESS)[0]))
    first.start()
    assert wait_for(lambda: log.exists() and "start" in log.read_text(), timeout=15)
    shutil.rmtree(os.path.join(srv.tmpdir, "bb-worker-slots"))
    assert request(srv.port, "POST", "/api/prove", WITNESS)[0] == 200  # waits for the first one's slot
    first.join()
    assert results == [200]
    events = [line.split() for line in log.read_text().splitlines()]
    assert [e[0] for e in events] == ["start", "end", "start", "end"], events  # never two at once


# ---------------------------------------------------------------- processes and signals

def test_a_descendant_holding_bbs_output_cannot_hold_a_finished_proof(start_server, fake_bb, tmp_path):
    """FAKE_BB_MODE=grandchild... with a prove that finishes: the grandchild keeps stdout/stderr open."""
    bb = tmp_path / "bb-with-grandchild"
    bb.write_text(Path(fake_bb).read_text().replace(
        'time.sleep(float(os.environ.get("FAKE_BB_DELAY", "0")))',
        'subprocess.Popen(["sleep", "60"]); time.sleep(float(os.environ.get("FAKE_BB_DELAY", "0")))'))
    bb.chmod(0o755)
    srv = start_server(BB_BINARY=bb, PROVE_TIMEOUT_SECONDS=20)
    started = time.monotonic()
    assert request(srv.port, "POST", "/api/prove", WITNESS)[0] == 200
    assert time.monotonic() - started < 5
    assert not [p for p in descendants(srv.proc.pid) if _comm(p[0]) == "sleep"]  # its group was killed


def _comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def test_sigint_is_a_quick_stop_that_leaves_nothing(start_server, fake_bb, tmp_path):
    pidfile = tmp_path / "pids"
    srv = start_server(BB_BINARY=fake_bb, FAKE_BB_MODE="sleep", FAKE_BB_PIDFILE=pidfile)
    result = []
    t = threading.Thread(target=lambda: result.append(_try(lambda: request(srv.port, "POST", "/api/prove",
                                                                            WITNESS, timeout=30))))
    t.start()
    assert wait_for(lambda: bb_processes(fake_bb), timeout=15)
    os.kill(srv.proc.pid, signal.SIGINT)
    srv.proc.wait(timeout=15)  # quick: no waiting for the proof in flight
    t.join()
    assert result and (isinstance(result[0], OSError) or result[0][0] >= 500), result
    assert wait_for(lambda: not bb_processes(fake_bb), timeout=5)
    assert not [r for r in os.listdir(srv.tmpdir) if r.startswith("bb-worker-run-")]


def test_ctrl_c_on_an_idle_server_exits_quietly(start_server, fake_bb):
    srv = start_server(BB_BINARY=fake_bb)
    os.killpg(srv.proc.pid, signal.SIGINT)  # what Ctrl-C on `make run` does: master and workers at once
    srv.proc.wait(timeout=15)
    output = srv.output()
    assert "SystemExit" not in output and "Traceback" not in output, output
    assert not [r for r in os.listdir(srv.tmpdir) if r.startswith("bb-worker-run-")]


def _try(call):
    try:
        return call()
    except OSError as exc:
        return exc


# ---------------------------------------------------------------- configuration at start

def test_prometheus_multiproc_dir_is_emptied_and_owned(start_server, tmp_path):
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "counter_999.db").write_bytes(b"stale")
    srv = start_server(PROMETHEUS_MULTIPROC_DIR=metrics, WEB_CONCURRENCY=2)
    assert not (metrics / "counter_999.db").exists()
    assert request(srv.port, "GET", "/api/metrics")[0] == 200
    other = start_server(ready=False, PROMETHEUS_MULTIPROC_DIR=metrics)
    assert other.proc.wait(timeout=30) != 0
    assert "PROMETHEUS_MULTIPROC_DIR" in other.output() and "in use by another running server" in other.output()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_dev_shm_present_but_not_writable_stops_the_server(tmp_path):
    # A fresh read-only tmpfs over /dev/shm in a private mount namespace. Never `mount -o remount,ro
    # /dev/shm`: a remount changes the tmpfs superblock, which the host shares, and leaves the
    # machine's /dev/shm read-only for every later server (CI failed so).
    code = "mount -t tmpfs -o ro tmpfs /dev/shm || exit 77; exec python3 -c 'import os; from bbworker.settings import Settings; Settings.from_environ(os.environ)'"
    env = dict(os.environ, TMPDIR=str(tmp_path), PATH=os.path.dirname(os.sys.executable) + ":" + os.environ["PATH"])
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", code],
                          cwd=os.path.dirname(CIRCUIT), env=env, capture_output=True, text=True, timeout=60)
    if proc.returncode == 77:
        pytest.skip("cannot remount /dev/shm read-only here")
    assert os.access("/dev/shm", os.W_OK), "the test left the host's /dev/shm read-only"
    assert proc.returncode != 0
    assert "/dev/shm is present but not writable" in proc.stderr, proc.stderr
