"""Hostile and honest clients against a live bb-worker, for the soak test (tests/load/test_soak.py).

    PYTHONPATH=tests python tests/programs/hostile.py --port 8080 --seconds 60 --hostile 32 --honest 8 \
        --witness tests/fixtures/valid_1.gz --proofs DIR

Runs for --seconds: --hostile clients cycle through the kinds in HOSTILE (crafted verify
proofs, idle and zero-byte connections, large verify bodies, requests gunicorn's parser refuses,
SCRIPT_NAME headers; trickled uploads and headers, half-closers, many-member gzip, oversized
Expect, bad chunk framing, disconnects), --honest clients send valid witnesses one after the
other, and with --health-interval a separate process polls /api/health. Each honest 200's proof
and public inputs go to DIR/<n>.proof and DIR/<n>.public_inputs (bb's binary formats) for `bb
verify`. The crafted proofs start from one real proof of --witness, taken before the clients
start. Prints one JSON object: outcomes per client kind, honest statuses, health latencies.
Standard library and tests/support.py only; each client is a thread with its own connections.
"""
import argparse
import base64
import gzip
import json
import multiprocessing
import os
import random
import selectors
import socket
import sys
import threading
import time
from collections import Counter

from support import Replies, connect, percentile, probe_health, read_reply, request_head, silent_connections

PUBLIC_INPUTS_FOR_1_MB = 14_500  # a JSON verify body of about 1 MB (issue 19)


# ---------------------------------------------------------------- clients

class Client:
    """A thread that repeats one behaviour until `stop_at`, `pause` seconds apart, counting the outcomes.

    Hostile clients pause: they probe the server's defences; a flood of requests is
    volume, which a load balancer's rate limits are for. reference: (proof bytes, public
    inputs list of 0x-hex) of a real proof, for the crafted verify kinds.
    """

    def __init__(self, kind, port, witness, stop_at, pause=0.5, reference=None, idle_count=100):
        self.kind, self.port, self.witness, self.stop_at, self.pause = kind, port, witness, stop_at, pause
        self.reference, self.idle_count = reference, idle_count
        self.outcomes = Counter()
        self.random = random.Random()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        behaviour = getattr(self, self.kind)
        while time.monotonic() < self.stop_at:
            try:
                outcome = behaviour()
            except OSError as exc:
                outcome = type(exc).__name__
            self.outcomes[str(outcome)] += 1
            time.sleep(self.pause)

    def send_whole(self, body, headers=None, shut_wr=False, path="/api/prove"):
        with connect(self.port) as sock:
            sock.sendall(request_head(path, {"Content-Length": len(body), **(headers or {})}) + body)
            if shut_wr:
                sock.shutdown(socket.SHUT_WR)
            return read_reply(sock)[0]

    def send_raw(self, data):
        """Send `data` as is on a new connection: the reply's status."""
        with connect(self.port) as sock:
            sock.sendall(data)
            return read_reply(sock)[0]

    def verify(self, proof, public_inputs):
        """POST /api/verify {"proof", "publicInputs"}: "valid" or "invalid" for a 200, else the status."""
        body = json.dumps({"proof": base64.b64encode(proof).decode(), "publicInputs": public_inputs}).encode()
        with connect(self.port, timeout=120) as sock:
            sock.sendall(request_head("/api/verify", {"Content-Length": len(body),
                                                      "Content-Type": "application/json"}) + body)
            status, _, reply = read_reply(sock)
        if status == 200:
            return "valid" if json.loads(reply)["valid"] else "invalid"
        return status

    # -- hostile kinds of issue 19

    def zero_proof(self):
        """The issue's 14,656 zero bytes with a valid public input: bb cannot aggregate; {"valid": false}."""
        proof, public_inputs = self.reference
        return self.verify(bytes(len(proof)), public_inputs)

    def random_proof(self):
        """A proof of random bytes, of the right length: {"valid": false}."""
        proof, public_inputs = self.reference
        return self.verify(self.random.randbytes(len(proof)), public_inputs)

    def flipped_proof(self):
        """A real proof with one field element changed: {"valid": false}."""
        proof, public_inputs = self.reference
        fields = len(proof) // 32
        at = self.random.randrange(fields) * 32
        changed = bytearray(proof)
        changed[at + 31] ^= 1 + self.random.randrange(255)
        return self.verify(bytes(changed), public_inputs)

    def large_verify(self):
        """A 1 MB JSON verify body (14,500 public inputs): 413 before any of it is parsed."""
        proof, public_inputs = self.reference
        body = json.dumps({"proof": base64.b64encode(proof).decode(),
                           "publicInputs": [public_inputs[0]] * PUBLIC_INPUTS_FOR_1_MB}).encode()
        return self.send_whole(body, {"Content-Type": "application/json"}, path="/api/verify")

    def idle(self):
        """`idle_count` connections that send nothing, held until the server drops them all."""
        selector = selectors.DefaultSelector()
        for sock in silent_connections(self.port, self.idle_count):
            selector.register(sock, selectors.EVENT_READ)
        try:
            while selector.get_map() and time.monotonic() < self.stop_at + 30:
                for key, _ in selector.select(0.5):
                    selector.unregister(key.fileobj)
                    key.fileobj.close()
            return "dropped" if not selector.get_map() else "held"
        finally:
            for key in list(selector.get_map().values()):
                key.fileobj.close()
            selector.close()

    def zero_byte(self):
        """20 connections opened and closed again without a byte: nothing to answer."""
        for sock in silent_connections(self.port, 20):
            sock.close()
        return "closed"

    def long_header(self):
        """A 9 KB header: gunicorn refuses it, 431 in our JSON."""
        return self.send_raw(request_head("/api/prove", {"X-Big": "b" * 9000}))

    def long_path(self):
        """A 10 KB path: gunicorn refuses it, 414 in our JSON."""
        return self.send_raw(request_head("/api/" + "p" * 10240, {}, method="GET"))

    def bad_coding(self):
        """Transfer-Encoding: ,chunked: gunicorn refuses it, 501 in our JSON."""
        return self.send_raw(request_head("/api/verify", {"Transfer-Encoding": ",chunked"}))

    def bad_request_line(self):
        """A request line without a version: 400 in our JSON."""
        return self.send_raw(b"GET /api/health\r\n\r\n")

    def script_name(self):
        """SCRIPT_NAME: /x changes no route: /api/metrics is 200, /x/api/metrics 404."""
        first = self.send_raw(request_head("/api/metrics", {"SCRIPT_NAME": "/x"}, method="GET"))
        second = self.send_raw(request_head("/x/api/metrics", {"SCRIPT_NAME": "/x"}, method="GET"))
        return f"{first}/{second}"

    # -- hostile kinds of issue 12

    def trickle_upload(self):
        """A valid witness, one byte every 0.5 s: cut by the upload deadline (408)."""
        with connect(self.port, timeout=120) as sock:
            sock.sendall(request_head("/api/prove", {"Content-Length": len(self.witness)}))
            for i in range(len(self.witness)):
                if time.monotonic() > self.stop_at:
                    return "unfinished"
                try:
                    sock.sendall(self.witness[i:i + 1])
                except OSError:
                    break  # the server answered and closed
                time.sleep(0.5)
            return read_reply(sock)[0]

    def trickle_headers(self):
        """A request line and headers one byte every 0.5 s: dropped without a reply."""
        head = request_head("/api/health", {"X-Padding": "p" * 200}, method="GET")
        with connect(self.port, timeout=120) as sock:
            for i in range(len(head)):
                if time.monotonic() > self.stop_at:
                    return "unfinished"
                try:
                    sock.sendall(head[i:i + 1])
                except OSError:
                    return "dropped"
                time.sleep(0.5)
            status = read_reply(sock)[0]
            return "dropped" if status is None else status

    def half_close(self):
        """A valid witness, then shutdown(SHUT_WR): the proof still comes back (200)."""
        return self.send_whole(self.witness, shut_wr=True)

    def gzip_members(self):
        """A body of 1,000 empty gzip members (20 KB, under what the circuit's witnesses need): 400 early."""
        return self.send_whole(gzip.compress(b"", mtime=0) * 1000)

    def endless_name(self):
        """A gzip header whose file name never ends (256 KiB of it), chunked: 413 once the body passes
        what the circuit's witnesses can need gzipped, so it cannot fill the temp dir."""
        data = b"\x1f\x8b\x08\x08" + bytes(6) + b"a" * (256 * 1024)
        with connect(self.port) as sock:
            try:
                sock.sendall(request_head("/api/prove", {"Transfer-Encoding": "chunked"})
                             + f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n")
            except OSError:  # the server refused it before the rest was sent: its reply is there
                pass
            return read_reply(sock)[0]

    def oversized_expect(self):
        """Expect: 100-continue with a Content-Length of 1 TB: 413 and no "100 Continue"."""
        with connect(self.port) as sock:
            sock.sendall(request_head("/api/prove", {"Content-Length": 10 ** 12, "Expect": "100-continue"}))
            replies = Replies(sock)
            status = replies.next()[0]
            return "sent 100 Continue" if replies.interim else status

    def bad_framing(self):
        """A chunked body whose chunk-size line is "zz": 400."""
        with connect(self.port) as sock:
            sock.sendall(request_head("/api/prove", {"Transfer-Encoding": "chunked"}) + b"zz\r\n")
            return read_reply(sock)[0]

    def disconnect(self):
        """A valid witness, then close after 50 ms: the server stops its proof (it logs 499)."""
        with connect(self.port) as sock:
            sock.sendall(request_head("/api/prove", {"Content-Length": len(self.witness)}) + self.witness)
            time.sleep(0.05)
        return "closed"


# Client i does kinds[i % len(kinds)] (--kinds, default HOSTILE): with 32 clients the first 13 get two each.
HOSTILE = ("zero_proof", "random_proof", "flipped_proof", "large_verify", "idle", "zero_byte", "long_header",
           "long_path", "bad_coding", "bad_request_line", "script_name",
           "half_close", "disconnect", "bad_framing",
           "trickle_upload", "trickle_headers", "gzip_members", "endless_name", "oversized_expect")


class Honest(Client):
    """Sends valid witnesses one after the other; keeps every 200's proof."""

    def __init__(self, port, witness, stop_at, proofs_dir, number):
        super().__init__("honest", port, witness, stop_at, pause=0)
        self.proofs_dir, self.number, self.count = proofs_dir, number, 0
        self.seconds = []

    def honest(self):
        started = time.monotonic()
        status, body = prove(self.port, self.witness)
        self.seconds.append(time.monotonic() - started)
        if status == 200:
            reply = json.loads(body)
            name = os.path.join(self.proofs_dir, f"{self.number}-{self.count}")
            with open(name + ".proof", "wb") as f:
                f.write(base64.b64decode(reply["proof"]))
            with open(name + ".public_inputs", "wb") as f:
                f.write(b"".join(bytes.fromhex(x[2:]) for x in reply["publicInputs"]))
            self.count += 1
        return status


def prove(port, witness):
    """POST /api/prove `witness` asking for JSON: (status, body bytes)."""
    with connect(port, timeout=300) as sock:
        sock.sendall(request_head("/api/prove", {"Content-Length": len(witness),
                                                 "Accept": "application/json"}) + witness)
        status, _, body = read_reply(sock)
    return status, body


def reference_proof(port, witness):
    """One real proof of `witness` from the server: (proof bytes, public inputs list of 0x-hex)."""
    status, body = prove(port, witness)
    if status != 200:
        raise SystemExit(f"hostile.py: the reference proof failed: {status} {body[:300]!r}")
    reply = json.loads(body)
    return base64.b64decode(reply["proof"]), reply["publicInputs"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--hostile", type=int, default=32)
    parser.add_argument("--honest", type=int, default=8)
    parser.add_argument("--witness", required=True, help="a valid gzipped witness for the served circuit")
    parser.add_argument("--proofs", required=True, help="directory for the honest clients' proofs")
    parser.add_argument("--idle-connections", type=int, default=100,
                        help="silent connections an `idle` client opens at a time")
    parser.add_argument("--kinds", default=",".join(HOSTILE),
                        help="comma-separated hostile kinds to cycle through (default: all of HOSTILE)")
    parser.add_argument("--health-interval", type=float, default=0.02,
                        help="seconds between /api/health probes; 0: no probes")
    args = parser.parse_args(argv)
    kinds = [kind for kind in args.kinds.split(",") if kind]
    unknown = sorted(set(kinds) - set(HOSTILE))
    if unknown:
        parser.error(f"unknown kinds: {', '.join(unknown)}")
    with open(args.witness, "rb") as f:
        witness = f.read()
    os.makedirs(args.proofs, exist_ok=True)
    reference = reference_proof(args.port, witness)
    stop_at = time.monotonic() + args.seconds

    results = multiprocessing.get_context("spawn").Queue()
    prober = multiprocessing.get_context("spawn").Process(
        target=probe_health, args=(args.port, stop_at, args.health_interval, results))
    if args.health_interval:
        prober.start()
    clients = [Client(kinds[i % len(kinds)], args.port, witness, stop_at, reference=reference,
                      idle_count=args.idle_connections) for i in range(args.hostile)]
    honest = [Honest(args.port, witness, stop_at, args.proofs, i) for i in range(args.honest)]
    for client in clients + honest:
        client.thread.start()
    for client in clients + honest:
        client.thread.join(timeout=max(0, stop_at - time.monotonic()) + 150)
    latencies, health_statuses = results.get(timeout=60) if args.health_interval else ([], {})
    if args.health_interval:
        prober.join(timeout=10)

    hostile = {}
    for client in clients:
        hostile.setdefault(client.kind, Counter()).update(client.outcomes)
    honest_statuses = Counter()
    for client in honest:
        honest_statuses.update(client.outcomes)
    seconds = [s for client in honest for s in client.seconds]
    report = {
        "seconds": args.seconds,
        "hostile": {kind: dict(counts) for kind, counts in hostile.items()},
        "honest": dict(honest_statuses),
        "honest_seconds": {"p50": percentile(seconds, 50), "max": max(seconds, default=None)},
        "proofs": sum(client.count for client in honest),
        "health": {"count": len(latencies), "statuses": health_statuses,
                   "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
                   "max_ms": max(latencies, default=None)},
        "unfinished_threads": sum(client.thread.is_alive() for client in clients + honest),
    }
    json.dump(report, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
