"""Live server, real bb: a 200 always carries a proof `bb verify` accepts (issue 10).

The inputs and faults that used to get a 200 with a bad proof, or to cost gigabytes:
each gets its documented status, and leaves no files or processes behind.
"""
import base64
import gzip
import os
import re
import shutil
import struct

import msgpack
import pytest

from bbworker import bbrunner

from support import CIRCUIT, FIXTURES, bb_processes, expected, fixture_bytes, request, request_json, tmpfs, wait_for

VALID_MAP = msgpack.unpackb(gzip.decompress(fixture_bytes("valid_1.gz"))[1:], strict_map_key=False)[0][0][1]


def bb_exit_code_logged(server, request_id):
    """bb's exit code in the request's access line: None when bb was not started."""
    for line in server.output().splitlines():
        found = re.search(r" bb=(-?\d+|-)(\s|$)", line) if request_id in line else None
        if found:
            return None if found.group(1) == "-" else int(found.group(1))
    raise AssertionError(f"no access line for {request_id}")


def post(server, body):
    status, headers, payload = request_json(server.port, "POST", "/api/prove", body)
    return status, headers, payload


def served_vk(server, tmp_path, name="served-vk"):
    """Write the VK /api/vk serves to tmp_path/name; return its path (str)."""
    status, _, payload = request_json(server.port, "GET", "/api/vk")
    assert status == 200
    path = tmp_path / name
    path.write_bytes(base64.b64decode(payload["vk"]))
    return str(path)


def assert_clean(server, bb):
    assert server.leftovers() == []
    assert bb_processes(bb, under=server.proc.pid) == []


def bincode_witness(witness_map):
    """A gzipped bincode witness stack, as Noir wrote before msgpack-compact."""
    out = struct.pack("<QIQ", 1, 0, len(witness_map))
    for index, value in sorted(witness_map.items()):
        out += struct.pack("<IQ", index, 64) + value.hex().encode()
    return gzip.compress(out)


@pytest.mark.parametrize("body, status, words", [
    (gzip.compress(b""), 400, "the witness is empty"),
    (gzip.compress(b"\x03\x91\x91\x92\x00\x81\xce\x10\x00\x00\x00\xc4\x20" + bytes(32)), 422,
     "witness index 268435456 is not in this circuit"),
    (bincode_witness(VALID_MAP), 400, "bincode"),
    (gzip.compress(b"\x03" + msgpack.packb([[[0, {}]]])), 400, "witness map is empty"),
    (gzip.compress(b"\x02" + msgpack.packb({"stack": [{"index": 0, "witness": VALID_MAP}]})), 400, "0x02"),
    (fixture_bytes("other_circuit.gz"), 422, "bb prove failed"),
], ids=["empty", "huge-index", "bincode", "empty-map", "named-msgpack", "other-circuit"])
def test_bad_witnesses_get_their_status_and_no_proof(server, bb, body, status, words):
    code, headers, payload = post(server, body)
    assert code == status, payload
    assert words in payload["message"]
    if status == 400 or "not in this circuit" in payload["message"]:
        assert bb_exit_code_logged(server, dict(headers)["x-request-id"]) is None  # bb never started
    assert_clean(server, bb)


def test_a_witness_after_an_empty_gzip_member_is_proved_whole(server, bb, verify):
    """bb reads only the first gzip member (here: nothing); the server hands it the witness as one member."""
    code, _, payload = post(server, gzip.compress(b"") + fixture_bytes("valid_1.gz"))
    assert code == 200
    assert payload["publicInputs"] == expected()["valid_1.gz"]["public_inputs"]
    assert verify(base64.b64decode(payload["proof"]), payload["publicInputs"])
    assert_clean(server, bb)


def test_bincode_message_names_the_noir_version(server):
    _, _, payload = post(server, bincode_witness(VALID_MAP))
    assert "Noir 1.0.0-beta.26" in payload["message"]


def test_circuit_file_replaced_while_serving_never_pairs_with_another_vk(start_server, bb, tmp_path, verify):
    path = tmp_path / "circuit.json"
    shutil.copyfile(CIRCUIT, path)
    srv = start_server(CIRCUIT_PATH=path)
    code, _, first = post(srv, fixture_bytes("valid_1.gz"))
    assert code == 200
    vk = served_vk(srv, tmp_path)
    shutil.copyfile(os.path.join(FIXTURES, "other_circuit.json"), path)  # edited on disk
    code, _, again = post(srv, fixture_bytes("valid_2.gz"))
    assert code == 200
    assert again["publicInputs"] == expected()["valid_2.gz"]["public_inputs"]
    assert verify(base64.b64decode(again["proof"]), again["publicInputs"], vk=vk)
    with open(vk, "rb") as before, open(served_vk(srv, tmp_path, "served-vk-after"), "rb") as after:
        assert before.read() == after.read()  # the VK served did not change either
    code, _, _ = post(srv, fixture_bytes("other_circuit.gz"))  # the new file's witness: still the old circuit
    assert code == 422
    assert_clean(srv, bb)


def test_memory_limit_below_a_proofs_need_is_500_then_not_ready_and_the_worker_stays_up(start_server, bb, crs_dir, tmp_path):
    vk_cache = tmp_path / "vk"  # computed without the limit: under it, bb write_vk fails too (not ready, 503)
    bbrunner.Circuit(bbrunner.BB(bb, crs_dir=crs_dir), CIRCUIT, str(vk_cache)).vk.ensure()
    srv = start_server(BB_MEMORY_LIMIT_MB=12, VK_CACHE_DIR=vk_cache)
    code, _, payload = post(srv, fixture_bytes("valid_1.gz"))
    assert code == 500
    assert payload["message"] == "bb ran out of memory (limit 12 MiB)"
    # the server's own runs fail the same way (the self-check): no proof can succeed, and readiness says so
    status, _, health = request_json(srv.port, "GET", "/api/health")
    assert status == 503 and health["reasons"] == ["self-check failed: bb ran out of memory (limit 12 MiB)"]
    code, _, payload = post(srv, fixture_bytes("valid_1.gz"))  # the slot was freed: refused for readiness, not busy
    assert code == 503 and payload["message"] == "self-check failed: bb ran out of memory (limit 12 MiB)"
    _, _, metrics = request(srv.port, "GET", "/api/metrics")
    assert re.search(rb'bb_worker_proofs_total\{circuit="default",outcome="out_of_memory"\} 1\.0', metrics)
    assert re.search(rb'bb_worker_proofs_total\{circuit="default",outcome="not_ready"\} 1\.0', metrics)
    assert_clean(srv, bb)


def test_verification_is_on_by_default_and_can_be_turned_off(start_server, bb, verify):
    srv = start_server(VERIFY_PROOFS="0")
    code, _, payload = post(srv, fixture_bytes("valid_3.gz"))
    assert code == 200 and payload["publicInputs"] == expected()["valid_3.gz"]["public_inputs"]
    assert_clean(srv, bb)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 48 KiB tmpfs (needs root): the demo witness (29 KiB) fits, its 14.3 KiB proof does not.

    (Readiness also wants 1 MiB free: the server answers 503 before bb. bb's own failing write
    and a short proof on a full disk are tested in tests/bbrunner.)"""
    with tmpfs(tmp_path / "tmpfs", "48k") as mount:
        yield mount


def test_tmpdir_filling_while_bb_writes_is_503_never_200_nor_422(start_server, bb, tmp_path, small_tmpfs):
    srv = start_server(TMPDIR=small_tmpfs, VK_CACHE_DIR=tmp_path / "vk")
    (small_tmpfs / "filler").write_bytes(b"x" * 8192)  # what other uploads take meanwhile
    code, headers, payload = post(srv, fixture_bytes("valid_1.gz"))
    assert code == 503, payload
    assert "retry-after" in dict(headers)
    # The readiness check may see the full disk first (before bb); bb's own write is tested in tests/bbrunner.
    assert "space" in payload["message"] or "file system is full" in payload["message"]
    assert srv.leftovers() == []
    assert wait_for(lambda: bb_processes(bb, under=srv.proc.pid) == [], timeout=20)  # a VK warm-up may still run
