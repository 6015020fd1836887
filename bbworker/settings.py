"""bb-worker's settings: one frozen object, built and checked once from the environment.

`Settings.from_environ(os.environ)` reads every variable docs/configuration.md lists (the
attribute is the variable's name in lower case) and raises ConfigError naming the
variable for a bad value, so the server stops at start instead of failing on the first
request. Nothing is read when this module is imported.
"""
import dataclasses
import ipaddress
import logging
import os
import re

APP_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds circuit.json and .bb/
MiB = 1024 * 1024
# bb's -t/--verifier_target values (bb 5.0.0 `bb prove --help`).
VERIFIER_TARGETS = ("evm", "evm-no-zk", "noir-recursive", "noir-recursive-no-zk",
                    "noir-rollup", "noir-rollup-no-zk", "starknet", "starknet-no-zk")
DEFAULT_CIRCUIT = "default"  # the name of CIRCUIT_PATH's circuit (served at /api/prove), and its metrics label
CIRCUIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_ORIGIN = re.compile(r"(https?)://([a-z0-9.-]+|\[[0-9a-f:.]+\])(:\d{1,5})?", re.I)


class ConfigError(ValueError):
    """A setting from the environment is invalid; the message names the variable."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting (docs/configuration.md), plus what follows from them: `circuits` (name ->
    circuit JSON path, "default" first), `slots_dir` and `shm_dir` (/dev/shm or None)."""
    # server
    port: int
    web_concurrency: int
    keepalive_seconds: int
    forwarded_allow_ips: str
    header_timeout_seconds: float
    # callers
    api_tokens: tuple
    api_tokens_file: str
    cors_allow_origins: object  # None, "*" or a frozenset of origins
    # bb and the circuits
    circuit_path: str
    circuits_dir: str
    bb_binary: str
    bb_crs_path: str
    verifier_target: str
    prove_timeout_seconds: float
    verify_proofs: bool
    verify_timeout_seconds: float
    bb_memory_limit_mb: int
    hardware_concurrency: int
    # responses and logs
    proof_response_format: str
    log_format: str
    log_level: str
    # files
    tmpdir: str
    vk_cache_dir: str
    prometheus_multiproc_dir: str
    # limits and scheduling
    max_body_bytes: int
    max_witness_bytes: int
    upload_timeout_seconds: float
    upload_deadline_seconds: float
    max_uploading_requests: int
    max_queued_requests: int
    queue_timeout_seconds: float
    proof_cores: int
    max_concurrent_proofs: int
    proof_memory_budget_bytes: int
    verify_concurrency: int
    # derived
    circuits: dict
    slots_dir: str
    shm_dir: str

    @classmethod
    def from_environ(cls, environ):
        """Build and check the settings from `environ` (a mapping of str); raises ConfigError."""
        env = _Reader(environ)
        s = {}
        s["port"] = env.integer("PORT", 8080, 1, 65535)
        s["web_concurrency"] = env.integer("WEB_CONCURRENCY", 1, 1, 64)
        s["keepalive_seconds"] = env.integer("KEEPALIVE_SECONDS", 75, 1, 3600)
        s["forwarded_allow_ips"] = env.networks("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")
        s["header_timeout_seconds"] = env.seconds("HEADER_TIMEOUT_SECONDS", 10)
        s["api_tokens"] = env.tokens("API_TOKENS")
        s["api_tokens_file"] = env.token_file("API_TOKENS_FILE")
        s["cors_allow_origins"] = env.origins("CORS_ALLOW_ORIGINS")
        s["circuit_path"] = env.circuit("CIRCUIT_PATH", os.path.join(APP_DIR, "circuit.json"))
        s["circuits_dir"] = env.directory("CIRCUITS_DIR", None, must_exist=True)
        s["bb_binary"] = os.path.abspath(env.raw("BB_BINARY", os.path.join(APP_DIR, ".bb", "bb")))
        s["bb_crs_path"] = env.directory("BB_CRS_PATH", None)
        s["verifier_target"] = env.choice("VERIFIER_TARGET", "", ("",) + VERIFIER_TARGETS) or None
        s["prove_timeout_seconds"] = env.seconds("PROVE_TIMEOUT_SECONDS", 90)
        s["verify_proofs"] = env.boolean("VERIFY_PROOFS", True)
        s["verify_timeout_seconds"] = env.seconds("VERIFY_TIMEOUT_SECONDS", 10)
        # A 2^18-row proof peaks at 290-580 MiB of data segment (1 to 32 threads): 2048 leaves room.
        s["bb_memory_limit_mb"] = env.integer("BB_MEMORY_LIMIT_MB", 2048, 0, 1 << 30) or None
        # bb's own variable: bb aborts on every run when it is not a number.
        s["hardware_concurrency"] = env.integer("HARDWARE_CONCURRENCY", None, 1, 4096)
        s["proof_response_format"] = env.choice("PROOF_RESPONSE_FORMAT", "json", ("json", "binary"))
        s["log_format"] = env.choice("LOG_FORMAT", "text", ("text", "json"))
        s["log_level"] = env.choice("LOG_LEVEL", "info", ("debug", "info", "warning", "error", "critical"))
        s["tmpdir"] = env.writable_directory("TMPDIR", "/tmp")
        s["vk_cache_dir"] = env.directory("VK_CACHE_DIR", os.path.join(s["tmpdir"], "bb-worker-vk"))
        s["prometheus_multiproc_dir"] = env.writable_directory("PROMETHEUS_MULTIPROC_DIR", None)
        s["max_body_bytes"] = env.integer("MAX_BODY_BYTES", 50 * MiB, 1)
        s["max_witness_bytes"] = env.integer("MAX_WITNESS_BYTES", 512 * MiB, 1)
        s["upload_timeout_seconds"] = env.seconds("UPLOAD_TIMEOUT_SECONDS", 30)
        s["upload_deadline_seconds"] = env.seconds("UPLOAD_DEADLINE_SECONDS", 60)
        s["max_uploading_requests"] = env.integer("MAX_UPLOADING_REQUESTS", 16, 1, 100000)
        s["max_queued_requests"] = env.integer("MAX_QUEUED_REQUESTS", 16, 1, 100000)
        s["queue_timeout_seconds"] = env.seconds("QUEUE_TIMEOUT_SECONDS", 30)
        s["proof_cores"] = env.integer("PROOF_CORES", s["hardware_concurrency"] or available_cores(), 1, 4096)
        s["max_concurrent_proofs"] = env.integer("MAX_CONCURRENT_PROOFS", s["proof_cores"], 1, 1024)
        s["proof_memory_budget_bytes"] = env.integer("PROOF_MEMORY_BUDGET_BYTES", available_memory() // 2, 1)
        s["verify_concurrency"] = env.integer("VERIFY_CONCURRENCY", 2, 1, 64)
        s["circuits"] = {DEFAULT_CIRCUIT: s["circuit_path"], **circuit_files(s["circuits_dir"])}
        s["slots_dir"] = os.path.join(s["tmpdir"], "bb-worker-slots")
        s["shm_dir"] = _shm_dir()
        return cls(**s)

    @classmethod
    def names(cls):
        """The environment variables the settings are read from (list of str), in order."""
        derived = {"circuits", "slots_dir", "shm_dir"}
        return [f.name.upper() for f in dataclasses.fields(cls) if f.name not in derived]


class _Reader:
    """Typed, checked reads of one environment; each raises ConfigError naming the variable."""

    def __init__(self, environ):
        self.environ = environ

    def raw(self, name, default):
        value = self.environ.get(name, "").strip()
        return value or default

    def integer(self, name, default, low, high=None):
        raw = self.raw(name, None)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            raise ConfigError(f"{name}={raw!r} must be " + (f"from {low} to {high}" if high is not None
                                                            else f"at least {low}"))
        return value

    def seconds(self, name, default):
        raw = self.raw(name, str(default))
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a number of seconds") from None
        if not 0 < value < 86400:
            raise ConfigError(f"{name}={raw!r} must be more than 0 and less than 86400 seconds")
        return value

    def choice(self, name, default, choices):
        raw = self.raw(name, default)
        if raw not in choices:
            raise ConfigError(f"{name}={raw!r} must be one of: {', '.join(c for c in choices if c)}")
        return raw

    def boolean(self, name, default):
        raw = self.raw(name, "1" if default else "0").lower()
        if raw not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ConfigError(f"{name}={raw!r} must be 1/true/yes/on or 0/false/no/off")
        return raw in ("1", "true", "yes", "on")

    def circuit(self, name, default):
        path = os.path.abspath(self.raw(name, default))
        try:
            with open(path, "rb") as f:
                head = f.read(1)
        except OSError as exc:
            raise ConfigError(f"{name}={path!r}: {exc.strerror}") from None
        if head != b"{":
            raise ConfigError(f"{name}={path!r} is not a Noir program JSON (circuit.json)")
        return path

    def directory(self, name, default, must_exist=False):
        path = self.raw(name, default)
        if path is None:
            return None
        path = os.path.abspath(path)
        if (os.path.exists(path) or must_exist) and not os.path.isdir(path):
            raise ConfigError(f"{name}={path!r} " + ("is not a directory" if os.path.exists(path)
                                                      else "does not exist"))
        return path

    def writable_directory(self, name, default):
        path = self.directory(name, default, must_exist=True)
        if path is not None and not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{name}={path!r} is not writable")
        return path

    def networks(self, name, default):
        raw = self.raw(name, default)
        for item in (i.strip() for i in raw.split(",")):
            try:
                if item != "*":
                    ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ConfigError(f"{name}: {item!r} is not an IP address or network (or *)") from None
        return raw

    def tokens(self, name):
        raw = self.environ.get(name)
        tokens = tuple(t.strip() for t in (raw or "").split(",") if t.strip())
        if raw is not None and not tokens:  # "," or an empty secret would silently turn authentication off
            raise ConfigError(f"{name}={raw.strip()!r} holds no token (unset it to run without tokens)")
        return tokens

    def token_file(self, name):
        path = self.raw(name, None)
        if path is None:
            return None
        path = os.path.abspath(path)
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"{name}={path!r}: {exc.strerror}") from None
        if not parse_tokens(text):
            raise ConfigError(f"{name}={path!r} holds no token")
        return path

    def origins(self, name):
        try:
            return parse_origins(self.raw(name, ""))
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None


def parse_tokens(text):
    """The tokens (list of str) in API_TOKENS_FILE's text: one per line (commas also separate), `#` lines skipped."""
    tokens = []
    for line in text.splitlines():
        if not line.strip().startswith("#"):
            tokens += [t.strip() for t in line.split(",") if t.strip()]
    return tokens


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


def circuit_files(directory):
    """Map name -> path (str) of each <name>.json file in `directory` (CIRCUITS_DIR; None: {}).

    Names are letters, digits, '-' and '_' (at most 64), never "default"; other files are
    skipped with a warning.
    """
    circuits = {}
    for entry in sorted(os.listdir(directory)) if directory else []:
        name, ext = os.path.splitext(entry)
        path = os.path.join(directory, entry)
        if ext != ".json" or not os.path.isfile(path):
            continue
        if not CIRCUIT_NAME.match(name) or name == DEFAULT_CIRCUIT:
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


def _shm_dir():
    """/dev/shm when present (gunicorn's heartbeat and the metrics files live there), else None."""
    if not os.path.isdir("/dev/shm"):
        return None
    if not os.access("/dev/shm", os.W_OK | os.X_OK):
        raise ConfigError("/dev/shm is present but not writable (gunicorn's worker heartbeat and the "
                          "metrics files live there): mount it writable, e.g. a tmpfs")
    return "/dev/shm"
