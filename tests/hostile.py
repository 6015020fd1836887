"""Hostile and honest clients against a live bb-worker, for the soak test (issue 12).

    python tests/hostile.py --port 8080 --seconds 60 --hostile 32 --honest 8 \
        --witness tests/fixtures/valid_1.gz --proofs DIR

Runs for --seconds: --hostile clients cycle through the kinds in HOSTILE (trickled
uploads and headers, half-closers, many-member gzip, oversized Expect, bad chunk
framing, disconnects), --honest clients send valid witnesses one after the other,
and a separate process polls /api/health. Each honest 200's proof and public
inputs go to DIR/<n>.proof and DIR/<n>.public_inputs (bb's binary formats) for
`bb verify`. Prints one JSON object: statuses per client kind and health latencies.
Standard library only; each client is a thread with its own connections.
"""
import argparse
import base64
import gzip
import json
import multiprocessing
import os
import socket
import sys
import threading
import time
from collections import Counter

HOST = "127.0.0.1"


# ---------------------------------------------------------------- raw HTTP/1.1

def connect(port, timeout=30.0):
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def request_head(path, headers, method="POST"):
    lines = [f"{method} {path} HTTP/1.1", "Host: bb-worker"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Replies:
    """Reads the replies on one connection in order, keeping bytes that belong to the next one.

    interim: the 1xx statuses seen so far (skipped by next()).
    """

    def __init__(self, sock):
        self.sock, self.buf, self.interim = sock, b"", []

    def _more(self):
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            data = b""
        self.buf += data
        return bool(data)

    def next(self):
        """The next final reply: (status, headers dict with lower-case names, body bytes).

        Returns (None, {}, b"") when the server closed the connection first.
        """
        while True:
            while b"\r\n\r\n" not in self.buf:
                if not self._more():
                    return None, {}, b""
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            if status >= 200:
                break
            self.interim.append(status)
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length and self._more():
            pass
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body


def read_reply(sock):
    """The first final reply on `sock` (see Replies.next), for a connection used once."""
    return Replies(sock).next()


# ---------------------------------------------------------------- clients

class Client:
    """A thread that repeats one behaviour until `stop_at`, `pause` seconds apart, counting the outcomes.

    Hostile clients pause: they probe the server's defences; a flood of requests is
    volume, which a load balancer's rate limits are for.
    """

    def __init__(self, kind, port, witness, stop_at, pause=0.5):
        self.kind, self.port, self.witness, self.stop_at, self.pause = kind, port, witness, stop_at, pause
        self.outcomes = Counter()
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

    def send_whole(self, body, headers=None, shut_wr=False):
        with connect(self.port) as sock:
            sock.sendall(request_head("/api/prove", {"Content-Length": len(body), **(headers or {})}) + body)
            if shut_wr:
                sock.shutdown(socket.SHUT_WR)
            return read_reply(sock)[0]

    # -- hostile kinds

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
        """A body of 100,000 empty gzip members: 400 early."""
        return self.send_whole(gzip.compress(b"", mtime=0) * 100_000)

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


HOSTILE = ("trickle_upload", "trickle_headers", "half_close", "gzip_members",
           "oversized_expect", "bad_framing", "disconnect")


class Honest(Client):
    """Sends valid witnesses one after the other; keeps every 200's proof."""

    def __init__(self, port, witness, stop_at, proofs_dir, number):
        super().__init__("honest", port, witness, stop_at, pause=0)
        self.proofs_dir, self.number, self.count = proofs_dir, number, 0
        self.seconds = []

    def honest(self):
        started = time.monotonic()
        with connect(self.port, timeout=300) as sock:
            sock.sendall(request_head("/api/prove", {"Content-Length": len(self.witness),
                                                     "Accept": "application/json"}) + self.witness)
            status, _, body = read_reply(sock)
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


# ---------------------------------------------------------------- health

def probe_health(port, stop_at, interval, queue):
    """In its own process: GET /api/health every `interval` s; put (latencies in ms, statuses)."""
    latencies, statuses = [], Counter()
    while time.monotonic() < stop_at:
        started = time.perf_counter()
        try:
            with connect(port, timeout=10) as sock:
                sock.sendall(request_head("/api/health", {}, method="GET"))
                status = read_reply(sock)[0]
        except OSError as exc:
            status = type(exc).__name__
        latencies.append((time.perf_counter() - started) * 1000)
        statuses[str(status)] += 1
        time.sleep(interval)
    queue.put((latencies, dict(statuses)))


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--hostile", type=int, default=32)
    parser.add_argument("--honest", type=int, default=8)
    parser.add_argument("--witness", required=True, help="a valid gzipped witness for the served circuit")
    parser.add_argument("--proofs", required=True, help="directory for the honest clients' proofs")
    parser.add_argument("--health-interval", type=float, default=0.02,
                        help="seconds between /api/health probes; 0: no probes")
    args = parser.parse_args(argv)
    with open(args.witness, "rb") as f:
        witness = f.read()
    os.makedirs(args.proofs, exist_ok=True)
    stop_at = time.monotonic() + args.seconds

    results = multiprocessing.get_context("spawn").Queue()
    prober = multiprocessing.get_context("spawn").Process(
        target=probe_health, args=(args.port, stop_at, args.health_interval, results))
    if args.health_interval:
        prober.start()
    clients = [Client(HOSTILE[i % len(HOSTILE)], args.port, witness, stop_at) for i in range(args.hostile)]
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
