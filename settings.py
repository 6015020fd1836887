"""bb-worker settings, read once from the environment and checked at import.

A bad value raises ConfigError (a ValueError) naming the variable, so the server
stops at start-up instead of failing on the first request. gunicorn.conf.py,
app.py, scripts/precompute_vk.py and the tests read the constants below.
(PROMETHEUS_MULTIPROC_DIR is prometheus_client's own: gunicorn.conf.py sets it.)
"""
import ipaddress
import logging
import os
import re

APP_DIR = os.path.dirname(os.path.abspath(__file__))
MiB = 1024 * 1024

# bb's -t/--verifier_target values (bb 5.0.0 `bb prove --help`).
VERIFIER_TARGETS = ("evm", "evm-no-zk", "noir-recursive", "noir-recursive-no-zk",
                    "noir-rollup", "noir-rollup-no-zk", "starknet", "starknet-no-zk")


class ConfigError(ValueError):
    """A setting from the environment is invalid; the message names the variable."""


_READ = {"PROMETHEUS_MULTIPROC_DIR"}  # every variable this module reads (ENV_NAMES), and prometheus_client's


def _raw(name, default):
    _READ.add(name)
    value = os.environ.get(name, "")
    return value.strip() if value.strip() else default


def _int(name, default, low, high=None):
    raw = _raw(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    if value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{name}={raw!r} must be {bounds}")
    return value


def _seconds(name, default):
    raw = _raw(name, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds") from None
    if not 0 < value < 86400:
        raise ConfigError(f"{name}={raw!r} must be more than 0 and less than 86400 seconds")
    return value


def _choice(name, default, choices):
    raw = _raw(name, default)
    if raw not in choices:
        raise ConfigError(f"{name}={raw!r} must be one of: {', '.join(c for c in choices if c)}")
    return raw


def _bool(name, default):
    raw = _raw(name, "1" if default else "0").lower()
    if raw not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ConfigError(f"{name}={raw!r} must be 1/true/yes/on or 0/false/no/off")
    return raw in ("1", "true", "yes", "on")


def _circuit(name, default):
    path = os.path.abspath(_raw(name, default))
    try:
        with open(path, "rb") as f:
            head = f.read(1)
    except OSError as exc:
        raise ConfigError(f"{name}={path!r}: {exc.strerror}") from None
    if head != b"{":
        raise ConfigError(f"{name}={path!r} is not a Noir program JSON (circuit.json)")
    return path


def _writable_directory(name, default):
    path = os.path.abspath(_raw(name, default))
    if not os.path.isdir(path):
        raise ConfigError(f"{name}={path!r} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{name}={path!r} is not writable")
    return path


def _readable_file(name):
    path = _raw(name, None)
    if path is None:
        return None
    path = os.path.abspath(path)
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{name}={path!r}: {exc.strerror}") from None
    return path


_ORIGIN = re.compile(r"(https?)://([a-z0-9.-]+|\[[0-9a-f:.]+\])(:\d{1,5})?", re.I)


def parse_origins(text):
    """CORS_ALLOW_ORIGINS text -> None (CORS off), "*" or a frozenset of lower-case origins.

    Raises ValueError naming the first entry that is not an origin (`scheme://host[:port]`,
    no path or trailing slash).
    """
    entries = [e for e in re.split(r"[\s,]+", text.strip()) if e]
    if not entries:
        return None
    if entries == ["*"]:
        return "*"
    for entry in entries:
        if not _ORIGIN.fullmatch(entry):
            raise ValueError(f"{entry!r} is not an origin like https://app.example.com (or use * alone)")
    return frozenset(e.lower() for e in entries)


def _origins(name):
    raw = _raw(name, "")
    try:
        return parse_origins(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _networks(name, default):
    raw = _raw(name, default)
    for item in (i.strip() for i in raw.split(",")):
        try:
            if item != "*":
                ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(f"{name}: {item!r} is not an IP address or network (or *)") from None
    return raw


def _directory(name, default):
    path = _raw(name, default)
    if path is None:
        return None
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{name}={path!r} is not a directory")
    return path


# ---------------------------------------------------------------- server
PORT = _int("PORT", 8080, 1, 65535)
WEB_CONCURRENCY = _int("WEB_CONCURRENCY", 1, 1, 64)

# Seconds an idle keep-alive connection stays open: above the 60 s idle timeout of common
# load balancers (AWS ALB, GCP, nginx upstream pools), so the server never closes a
# connection just as the load balancer reuses it (a random 502).
KEEPALIVE_SECONDS = _int("KEEPALIVE_SECONDS", 75, 1, 3600)
# gunicorn's own variable: proxies whose X-Forwarded-For names the client (access log).
FORWARDED_ALLOW_IPS = _networks("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")

# ---------------------------------------------------------------- clients: tokens, CORS
# Bearer tokens for /api/prove, /api/verify, /api/vk and /api/metrics (auth.py); none: open.
API_TOKENS = tuple(t.strip() for t in _raw("API_TOKENS", "").split(",") if t.strip())
if _raw("API_TOKENS", None) is not None and not API_TOKENS:  # "," would silently turn authentication off
    raise ConfigError(f"API_TOKENS={_raw('API_TOKENS', '')!r} holds no token (unset it to run without tokens)")
API_TOKENS_FILE = _readable_file("API_TOKENS_FILE")  # one per line, re-read when it changes
if API_TOKENS_FILE is not None:
    import auth as _auth

    with open(API_TOKENS_FILE, encoding="utf-8", errors="surrogateescape") as _f:
        if not _auth.parse_tokens(_f.read()):
            raise ConfigError(f"API_TOKENS_FILE={API_TOKENS_FILE!r} holds no token")
CORS_ALLOW_ORIGINS = _origins("CORS_ALLOW_ORIGINS")  # None, "*" or a set of origins

# ---------------------------------------------------------------- bb and the circuit
CIRCUIT_PATH = _circuit("CIRCUIT_PATH", os.path.join(APP_DIR, "circuit.json"))
BB_BINARY = os.path.abspath(_raw("BB_BINARY", os.path.join(APP_DIR, ".bb", "bb")))
BB_CRS_PATH = _directory("BB_CRS_PATH", None)
VERIFIER_TARGET = _choice("VERIFIER_TARGET", "", ("",) + VERIFIER_TARGETS) or None
PROVE_TIMEOUT_SECONDS = _seconds("PROVE_TIMEOUT_SECONDS", 90)
# bb's own variable, passed through to bb: bb aborts (SIGABRT) on every run when it is not a number.
HARDWARE_CONCURRENCY = _int("HARDWARE_CONCURRENCY", 0, 1, 4096) if _raw("HARDWARE_CONCURRENCY", None) else None
# Run `bb verify` on every proof before answering 200 (about 8 ms a proof).
VERIFY_PROOFS = _bool("VERIFY_PROOFS", True)
# Cap on each bb run's data segment (RLIMIT_DATA), MiB; 0 = none. A 2^18-row proof peaks at
# 290-340 MiB resident, 290-580 MiB of data segment (1 to 32 threads): 2048 leaves room for it.
BB_MEMORY_LIMIT_MB = _int("BB_MEMORY_LIMIT_MB", 2048, 0, 1 << 30)

# Optional: serve every <name>.json in this directory at /api/prove/<name> too.
CIRCUITS_DIR = _directory("CIRCUITS_DIR", None)
if CIRCUITS_DIR is not None and not os.path.isdir(CIRCUITS_DIR):
    raise ConfigError(f"CIRCUITS_DIR={CIRCUITS_DIR!r} does not exist")
CIRCUIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
RESERVED_NAMES = ("default",)  # the metrics label of CIRCUIT_PATH


def circuit_files(directory=CIRCUITS_DIR):
    """Map name -> path (str) of each <name>.json file in `directory` (CIRCUITS_DIR).

    Names are letters, digits, '-' and '_' (at most 64), never "default"; other
    files are skipped with a warning. Empty when `directory` is None.
    """
    circuits = {}
    for entry in sorted(os.listdir(directory)) if directory else []:
        name, ext = os.path.splitext(entry)
        path = os.path.join(directory, entry)
        if ext != ".json" or not os.path.isfile(path):
            continue
        if not CIRCUIT_NAME.match(name) or name in RESERVED_NAMES:
            logging.getLogger("bb_worker").warning(
                "CIRCUITS_DIR: skipping %r: names are letters, digits, '-' and '_', not 'default'", entry)
            continue
        circuits[name] = path
    return circuits


def available_cores():
    """CPUs this process may use (int): its affinity, capped by a cgroup (v2 or v1) CPU quota."""
    cores = len(os.sched_getaffinity(0))
    for quota_file, period_file in (("/sys/fs/cgroup/cpu.max", None),
                                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            with open(quota_file) as f:
                fields = f.read().split()
            if period_file:
                with open(period_file) as f:
                    fields.append(f.read().strip())
            quota, period = fields[0], fields[1]
            if quota not in ("max", "-1"):
                cores = min(cores, max(1, -(-int(quota) // int(period))))
            break
        except (OSError, ValueError, IndexError):
            continue
    return cores


def available_memory():
    """Bytes (int) this process's cgroup may use (v2 or v1), else the machine's MemTotal."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
            if text != "max" and int(text) < 1 << 60:
                return int(text)
        except (OSError, ValueError):
            continue
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise ConfigError("cannot read MemTotal from /proc/meminfo")


# ---------------------------------------------------------------- responses and logs
PROOF_RESPONSE_FORMAT = _choice("PROOF_RESPONSE_FORMAT", "json", ("json", "binary"))
LOG_FORMAT = _choice("LOG_FORMAT", "text", ("text", "json"))
LOG_LEVEL = _choice("LOG_LEVEL", "info", ("debug", "info", "warning", "error", "critical"))

# ---------------------------------------------------------------- files
TMPDIR = _writable_directory("TMPDIR", "/tmp")  # each server's files: ownership.ServerDir in here
VK_CACHE_DIR = _directory("VK_CACHE_DIR", os.path.join(TMPDIR, "bb-worker-vk"))
SLOTS_DIR = os.path.join(TMPDIR, "bb-worker-slots")
# prometheus_client's own, for several workers (gunicorn.conf.py makes one in SHM_DIR when unset).
PROMETHEUS_MULTIPROC_DIR = (_writable_directory("PROMETHEUS_MULTIPROC_DIR", None)
                            if _raw("PROMETHEUS_MULTIPROC_DIR", None) else None)
# /dev/shm keeps gunicorn's worker heartbeat and the metrics files in RAM; when it exists it must be writable.
SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None
if SHM_DIR and not os.access(SHM_DIR, os.W_OK | os.X_OK):
    raise ConfigError(f"{SHM_DIR} is present but not writable (gunicorn's worker heartbeat and the "
                      "metrics files live there): mount it writable, e.g. a tmpfs")

# ---------------------------------------------------------------- limits
MAX_BODY_BYTES = _int("MAX_BODY_BYTES", 50 * MiB, 1)
MAX_WITNESS_BYTES = _int("MAX_WITNESS_BYTES", 512 * MiB, 1)
# Proof scheduling (scheduler.py): a lone proof gets PROOF_CORES threads; queued ones split them,
# up to MAX_CONCURRENT_PROOFS at once (1: one proof at a time with every core) and as many as
# fit in PROOF_MEMORY_BUDGET_BYTES by bb's measured peak RSS.
# HARDWARE_CONCURRENCY (bb's own, which the Kubernetes manifest sets to the CPU limit) is the
# default; bb itself gets the scheduler's count in its environment.
PROOF_CORES = _int("PROOF_CORES", HARDWARE_CONCURRENCY or available_cores(), 1, 4096)
MAX_CONCURRENT_PROOFS = _int("MAX_CONCURRENT_PROOFS", PROOF_CORES, 1, 1024)
PROOF_MEMORY_BUDGET_BYTES = _int("PROOF_MEMORY_BUDGET_BYTES", available_memory() // 2, 1)
# Per worker process: complete proof requests waiting for a slot; more get 503 at once. With
# MAX_UPLOADING_REQUESTS it bounds the disk witnesses take: (both + proving) x MAX_BODY_BYTES.
MAX_QUEUED_REQUESTS = _int("MAX_QUEUED_REQUESTS", 16, 1, 100000)
QUEUE_TIMEOUT_SECONDS = _seconds("QUEUE_TIMEOUT_SECONDS", 30)
UPLOAD_TIMEOUT_SECONDS = _seconds("UPLOAD_TIMEOUT_SECONDS", 30)  # the body may stall this long
UPLOAD_DEADLINE_SECONDS = _seconds("UPLOAD_DEADLINE_SECONDS", 60)  # for the whole body
# Per worker process: proof requests whose body is still arriving; more get 503 at once.
MAX_UPLOADING_REQUESTS = _int("MAX_UPLOADING_REQUESTS", 16, 1, 100000)
HEADER_TIMEOUT_SECONDS = _seconds("HEADER_TIMEOUT_SECONDS", 10)  # request line and headers, once begun
# POST /api/verify: bb verify runs at once per worker process (never a proof slot), and
# the deadline of one run (it takes ~10 ms for the demo circuit).
VERIFY_CONCURRENCY = _int("VERIFY_CONCURRENCY", 2, 1, 64)
VERIFY_TIMEOUT_SECONDS = _seconds("VERIFY_TIMEOUT_SECONDS", 10)

# ---------------------------------------------------------------- what the server serves
# bbrunner.BB's keyword arguments: BB(**BB_OPTIONS), one shared by every circuit.
BB_OPTIONS = {"binary": BB_BINARY, "crs_dir": BB_CRS_PATH, "timeout": PROVE_TIMEOUT_SECONDS,
              "verifier_target": VERIFIER_TARGET, "memory_limit_mb": BB_MEMORY_LIMIT_MB or None}
# name -> circuit JSON path: "default" (CIRCUIT_PATH, at /api/prove) first, then CIRCUITS_DIR's.
CIRCUITS = {"default": CIRCUIT_PATH, **circuit_files()}

# The environment variables above, e.g. for a benchmark that clears them before starting a server.
ENV_NAMES = tuple(sorted(_READ))
