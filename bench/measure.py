"""Measuring tools for the benchmark: bare bb runs, a live worker, an HTTP client, an RSS sampler.

Everything here talks only to 127.0.0.1 and cleans up after itself: servers run
in their own session and are stopped with killpg (TERM, then KILL); bb runs are
killed (SIGKILL to their process group) when they overrun their deadline.
"""
import base64
import http.client
import json
import os
import re
import subprocess
import tempfile
import threading
import time
from collections import namedtuple

from bbworker.bbrunner import formats
from bbworker.settings import Settings
from tests import support

# Cleared before a server starts, so the caller's shell cannot change what is measured.
SERVER_SETTINGS = tuple(Settings.names())


class BenchError(Exception):
    """Something the benchmark relies on broke (a bb run or a proof request failed)."""


# ---------------------------------------------------------------- bare bb

BBRun = namedtuple("BBRun", "seconds max_rss_bytes returncode stderr")
BBRun.__doc__ = """One bb process: wall seconds from spawn to reap, its peak RSS in bytes
(VmHWM sampled every 10 ms; getrusage's ru_maxrss would count the forking
Python's RSS too), its exit status and its stderr (bytes)."""


def run_bb(argv, timeout=600.0, sample_rss=False):
    """Run bb (argv: list of str) to completion and time it; return a BBRun.

    Wall time in seconds (time.perf_counter) covers fork/exec to reap, as a
    caller that spawns bb would see it; the main thread blocks in wait4 so the
    end is exact. With sample_rss, a thread reads bb's VmHWM every 10 ms
    (max_rss_bytes; else 0): keep it off for timed runs, where its wake-ups and
    /proc reads slow bb by about 1%. Kills bb's process group after `timeout`
    seconds and raises BenchError; raises BenchError on a non-zero exit.
    """
    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
        timer = threading.Timer(timeout, support.kill_quietly, (proc.pid,), {"group": True})
        hwm = _HighWater(proc.pid)
        timer.start()
        if sample_rss:
            hwm.start()
        try:
            _, status, _ = os.wait4(proc.pid, 0)
            elapsed = time.perf_counter() - started
        finally:
            timer.cancel()
            if sample_rss:
                hwm.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read()
    if proc.returncode != 0:
        tail = text.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise BenchError(f"{' '.join(argv[:2])} exited {proc.returncode}: {' | '.join(tail)}")
    return BBRun(elapsed, hwm.peak, proc.returncode, text)


class _HighWater(threading.Thread):
    """Keep the largest VmHWM (bytes) of process `pid` while it lives, reading it every 10 ms."""

    def __init__(self, pid, interval=0.01):
        super().__init__(name=f"hwm-{pid}", daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._done = threading.Event()

    def run(self):
        while True:
            value = support.status_bytes(self.pid, "VmHWM")
            if value:
                self.peak = max(self.peak, value)
            if self._done.wait(self.interval):
                return

    def stop(self):
        self._done.set()
        self.join()


def bb_output(argv, timeout=600.0):
    """Run a short bb command and return its stdout (str); raises BenchError on failure."""
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(argv[:2])} did not finish within {timeout:g} s") from None
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv[:2])} exited {proc.returncode}: "
                         f"{proc.stderr.decode('utf-8', 'replace').strip()[-300:]}")
    return proc.stdout.decode()


def gates(bb, circuit):
    """Return (acir_opcodes, circuit_size) of `circuit` from `bb gates` (rows before padding)."""
    out = bb_output([bb, "gates", "-b", circuit])
    info = json.loads(out[out.index("{"):])["functions"][0]
    return info["acir_opcodes"], info["circuit_size"]


def write_vk(bb, circuit, out_dir, crs):
    """Write `out_dir`/vk with `bb write_vk`; return log2 of the dyadic circuit size read from it.

    bb 5's UltraHonk VK starts with log2(dyadic size) as a 32-byte big-endian field element.
    """
    os.makedirs(out_dir, exist_ok=True)
    bb_output([bb, "write_vk", "-b", circuit, "-o", out_dir, "-c", crs])
    with open(os.path.join(out_dir, "vk"), "rb") as f:
        return formats.vk_log_circuit_size(f.read())


def verify(bb, vk, proof, public_inputs, crs):
    """True if `bb verify` accepts the proof (bytes) with public_inputs (list of 0x-hex str)."""
    d = os.path.join(os.path.dirname(vk), "verify")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "proof"), "wb") as f:
        f.write(proof)
    with open(os.path.join(d, "public_inputs"), "wb") as f:
        f.write(b"".join(bytes.fromhex(x[2:]) for x in public_inputs))
    proc = subprocess.run([bb, "verify", "-k", vk, "-p", os.path.join(d, "proof"),
                           "-i", os.path.join(d, "public_inputs"), "-c", crs],
                          capture_output=True, timeout=120, start_new_session=True)
    return proc.returncode == 0


# ---------------------------------------------------------------- RSS sampler

class RSSSampler:
    """Sample the total resident memory of our bb processes every `interval` seconds.

    A bb process is one whose argv[0] is `binary` (as bbrunner starts it) and
    that descends from `root_pid` (the server under test: this machine is
    shared, other people's bb runs are not ours). Runs in a daemon thread
    between start() and stop(); keeps the peak total VmRSS (bytes), the peak
    number of our bb processes alive at once, and `threads`: {HARDWARE_CONCURRENCY
    in a bb's environment (str, "-" if unset): bb processes seen with it}. Reading /proc costs ~1 ms per
    scan, so a process already seen to be something else for 0.5 s is not
    re-read (a fork reads as its parent until it execs bb).
    """

    def __init__(self, binary, root_pid, interval=0.02):
        self.binary = binary.encode()
        self.real = os.path.realpath(binary).encode()
        self.root = root_pid
        self.interval = interval
        self.peak_bytes = 0
        self.peak_count = 0
        self.samples = 0
        self.threads = {}
        self._seen = set()  # (pid, start time) of bb processes counted in `threads`
        self._other = {}  # pid -> first seen (monotonic) while not one of ours
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        """Start sampling in a background thread; returns self."""
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stop sampling and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _ours(self, pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0", 1)[0]
        except OSError:
            return False
        if argv0 != self.binary and argv0 != self.real:
            return False
        return support.descends_from(int(pid), self.root, depth=8)  # bb -> gunicorn worker -> master

    def _loop(self):
        while not self._stop.is_set():
            now = time.monotonic()
            live = set()
            total = count = 0
            for name in os.listdir("/proc"):
                if not name.isdigit():
                    continue
                live.add(name)
                first = self._other.get(name)
                if first is not None and now - first > 0.5:
                    continue
                if not self._ours(name):
                    self._other.setdefault(name, now)
                    continue
                self._other.pop(name, None)
                rss = support.status_bytes(name, "VmRSS")
                key = (name, support.start_time(name))
                if key not in self._seen:
                    self._seen.add(key)
                    threads = bb_threads(name)
                    self.threads[threads] = self.threads.get(threads, 0) + 1
                if rss is not None:
                    total += rss
                    count += 1
            for gone in self._other.keys() - live:  # pids are not reused within one scan
                del self._other[gone]
            self.samples += 1
            self.peak_bytes = max(self.peak_bytes, total)
            self.peak_count = max(self.peak_count, count)
            self._stop.wait(self.interval)


def bb_threads(pid):
    """HARDWARE_CONCURRENCY (str) in the environment of `pid`, "-" if unset, "?" if unreadable."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(b"HARDWARE_CONCURRENCY="):
                    return item.split(b"=", 1)[1].decode()
        return "-"
    except OSError:
        return "?"


def own_cpu_seconds(pids):
    """CPU seconds (utime + stime, children excluded) used so far by the live processes among `pids`."""
    total = 0
    for pid in pids:
        fields = support.proc_stat(pid)
        if fields:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- background load

class Load:
    """CPU used by processes that are not this benchmark's: the noise of a shared machine.

    A snapshot (snap()) holds the machine's busy CPU time (/proc/stat, all CPUs),
    its steal time, and the CPU time of this process's tree: itself, its reaped
    children (os.times), and every live descendant's own and reaped children's
    time (/proc/<pid>/stat utime, stime, cutime, cstime), so a bb reaped by a
    server we started still counts as ours. between(a, b) turns two snapshots
    into {"other_cores", "steal", "seconds"}: the average number of cores other
    processes kept busy, the hypervisor's steal fraction, and the wall time.
    """

    HZ = os.sysconf("SC_CLK_TCK")

    @classmethod
    def snap(cls):
        """A snapshot (tuple) of the machine's and our CPU times, now."""
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        t = os.times()
        ours = t.user + t.system + t.children_user + t.children_system
        for pid, _ in support.descendants(os.getpid()):
            ticks = support.cpu_ticks(pid)  # None: exited meanwhile, its time moved to its parent's cutime
            ours += (ticks or 0) / cls.HZ
        return time.monotonic(), (user + nice + system + irq + softirq) / cls.HZ, steal, sum(fields[:8]), ours

    @staticmethod
    def between(a, b):
        """The load (dict, see the class) between snapshots a and b."""
        wall = max(b[0] - a[0], 1e-9)
        other = max(0.0, (b[1] - a[1]) - (b[4] - a[4])) / wall
        return {"other_cores": other, "steal": (b[2] - a[2]) / max(b[3] - a[3], 1), "seconds": wall}


def wait_quiet(threshold=0.15, window=0.5, max_wait=20.0):
    """Wait until other processes used < `threshold` cores over a `window`-second look, at most `max_wait` s.

    Returns the seconds waited (float). The benchmark cannot stop other people's
    work on a shared machine; it can avoid starting a round in the middle of it.
    """
    started = time.monotonic()
    while True:
        a = Load.snap()
        time.sleep(window)
        if Load.between(a, Load.snap())["other_cores"] < threshold or time.monotonic() - started >= max_wait:
            return time.monotonic() - started


class CpuMeter:
    """Load between start() and stop() (see Load): a dict with other_cores, steal, seconds."""

    def start(self):
        """Take the first snapshot; returns self."""
        self._first = Load.snap()
        return self

    def stop(self):
        """Return the load since start()."""
        return Load.between(self._first, Load.snap())


# ---------------------------------------------------------------- the worker

class Server(support.Server):
    """Our worker (support.Server) for one circuit, as the benchmark runs it.

    env: the server's settings (str values), on top of a cleared set of
    SERVER_SETTINGS. `run_dir` gets the server's TMPDIR, VK cache and log. stop()
    also kills whatever the server left running.
    """

    def __init__(self, run_dir, env):
        super().__init__(run_dir, {"VK_CACHE_DIR": os.path.join(run_dir, "vk-cache"), **env},
                         clear=SERVER_SETTINGS, kill_leftovers=True)

    def wait_ready(self, timeout=180.0):
        """Poll GET /api/health until it answers 200 (the VK is computed before); returns self."""
        return super().wait_ready(timeout, healthy=True)


# ---------------------------------------------------------------- HTTP client

Reply = namedtuple("Reply", "seconds status proof public_inputs error request_id")
Reply.__doc__ = """One POST /api/prove as a client sees it: wall seconds (connect, upload,
wait, read, JSON decode, base64 decode), HTTP status, the proof (bytes) and
publicInputs (list of str) on success, else error text (str); the worker's
X-Request-Id (str or None)."""


PROVE_HEADERS = {"Accept": "application/json", "Content-Type": "application/octet-stream"}


def prove(port, witness, timeout=600.0):
    """POST the gzipped witness (bytes) to /api/prove on 127.0.0.1:`port`; return a Reply."""
    started = time.perf_counter()
    try:
        status, headers, data = support.request(port, "POST", "/api/prove", witness, PROVE_HEADERS, timeout)
        payload = json.loads(data)
        proof = base64.b64decode(payload["proof"]) if status == 200 else None
    except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
        return Reply(time.perf_counter() - started, 0, None, None, f"{type(exc).__name__}: {exc}", None)
    elapsed = time.perf_counter() - started
    rid = headers.get("x-request-id")
    if status == 200 and payload.get("success") is True:
        return Reply(elapsed, status, proof, payload.get("publicInputs"), None, rid)
    return Reply(elapsed, status, None, None, f"{payload.get('error')}: {payload.get('message')}", rid)


_PROVE_SUM = re.compile(r'^bb_worker_prove_duration_seconds_sum\{circuit="default"\} (\S+)$', re.M)
_ACCESS = re.compile(r"\b([0-9a-f-]{36}) POST /api/prove 200 .*?\bms=([0-9.]+)")


def bb_seconds_in_worker(port):
    """Total seconds the worker's bb runs took so far (its Prometheus histogram sum), or None."""
    try:
        status, _, data = support.request(port, "GET", "/api/metrics", timeout=30)
        match = _PROVE_SUM.search(data.decode()) if status == 200 else None
        return float(match.group(1)) if match else None
    except (OSError, http.client.HTTPException, ValueError):
        return None


def handler_seconds(log_text):
    """{request id: seconds} of successful POST /api/prove lines in the worker's access log (text format)."""
    return {rid: float(ms) / 1000 for rid, ms in _ACCESS.findall(log_text)}


def closed_loop(port, witness, clients, total, expect_public_inputs, timeout=600.0):
    """`clients` threads send `total` proof requests back to back (closed loop).

    Returns (wall seconds from first send to last answer, list of Reply, list of
    steady latencies in seconds). A request counts as failed when it is not 200 or
    its publicInputs differ from `expect_public_inputs`.

    Steady latencies: those of the successful requests sent after the first answer
    and answered before the last request was sent, so every client had a request in
    the server throughout their life (no ramp-up, no drain). By the response-time law
    of a closed system with no think time, `clients` / their mean is the steady
    throughput: what a server under sustained load delivers, without the idle cores
    of a finite batch's first proof and its last ones.
    """
    lock = threading.Lock()
    left = [total]
    replies = []
    spans = []  # (sent, answered, ok) in perf_counter seconds
    last_sent = [None]

    def client():
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
                sent = time.perf_counter()
                if left[0] == 0:
                    last_sent[0] = sent
            reply = prove(port, witness, timeout)
            if reply.status == 200 and reply.public_inputs != expect_public_inputs:
                reply = reply._replace(status=0, error=f"unexpected publicInputs {reply.public_inputs}")
            with lock:
                replies.append(reply)
                spans.append((sent, time.perf_counter(), reply.status == 200))

    threads = [threading.Thread(target=client, name=f"client-{i}", daemon=True) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started, replies, steady_latencies(spans, last_sent[0])


def steady_latencies(spans, last_sent):
    """Latencies (list of seconds) of the requests a closed loop made under sustained load.

    spans: (sent, answered, ok) per request, in one clock's seconds; last_sent: when the
    batch's last request was sent. Keeps the successful requests sent at or after the
    first answer and answered at or before `last_sent` (see closed_loop).
    """
    if not spans or last_sent is None:
        return []
    first_answer = min(done for _, done, _ in spans)
    return [done - sent for sent, done, ok in spans if ok and sent >= first_answer and done <= last_sent]
