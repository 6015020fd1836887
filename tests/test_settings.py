"""bbworker.settings: Settings.from_environ's defaults, its checks (a ConfigError naming the variable),
the values it derives, and the parsers it shares (parse_tokens, parse_origins, circuit_files)."""
import dataclasses
import os
import re
import subprocess
import sys

import pytest

from bbworker import settings
from bbworker.settings import ConfigError, Settings, circuit_files, parse_origins, parse_tokens
from support import CIRCUIT, ROOT

MiB = 1024 * 1024


@pytest.fixture
def base(tmp_path):
    """The smallest environment: TMPDIR a fresh directory, CIRCUIT_PATH the repository's circuit.json."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    return {"TMPDIR": str(tmpdir), "CIRCUIT_PATH": CIRCUIT}


def load(base, **env):
    return Settings.from_environ({**base, **env})


# ---------------------------------------------------------------- defaults

def test_defaults(base):
    s = Settings.from_environ(base)
    tmpdir = base["TMPDIR"]
    assert (s.port, s.web_concurrency, s.keepalive_seconds, s.header_timeout_seconds) == (8080, 1, 75, 10.0)
    assert s.forwarded_allow_ips == "127.0.0.1,::1"
    assert (s.api_tokens, s.api_tokens_file, s.cors_allow_origins) == ((), None, None)
    assert s.circuit_path == CIRCUIT and s.circuits_dir is None
    assert s.circuits == {"default": CIRCUIT}
    assert s.bb_binary == os.path.join(ROOT, ".bb", "bb") and s.bb_crs_path is None
    assert s.verifier_target is None
    assert (s.prove_timeout_seconds, s.verify_proofs, s.verify_timeout_seconds) == (90.0, True, 10.0)
    assert s.bb_memory_limit_mb == 2048 and s.hardware_concurrency is None
    assert (s.proof_response_format, s.log_format, s.log_level) == ("json", "text", "info")
    assert s.tmpdir == tmpdir and s.prometheus_multiproc_dir is None
    assert s.vk_cache_dir == os.path.join(tmpdir, "bb-worker-vk")  # in TMPDIR
    assert s.slots_dir == os.path.join(tmpdir, "bb-worker-slots")
    assert (s.max_body_bytes, s.max_witness_bytes) == (50 * MiB, 512 * MiB)
    assert (s.upload_timeout_seconds, s.upload_deadline_seconds, s.queue_timeout_seconds) == (30.0, 60.0, 30.0)
    assert (s.max_uploading_requests, s.max_queued_requests, s.verify_concurrency) == (16, 16, 2)
    assert s.proof_cores == settings.available_cores() >= 1
    assert s.max_concurrent_proofs == s.proof_cores
    assert s.proof_memory_budget_bytes == settings.available_memory() // 2
    assert s.shm_dir == ("/dev/shm" if os.path.isdir("/dev/shm") else None)


def test_an_empty_or_blank_value_is_the_default_and_values_are_stripped(base):
    assert load(base, PORT="").port == 8080
    assert load(base, PORT="   ").port == 8080
    assert load(base, PORT=" 8081 ").port == 8081
    assert load(base, TMPDIR=" " + base["TMPDIR"] + " ").tmpdir == base["TMPDIR"]


def test_the_settings_are_frozen(base):
    s = Settings.from_environ(base)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.port = 1


# ---------------------------------------------------------------- bad values name their variable

BAD = [
    ("PORT", "0"), ("PORT", "65536"), ("PORT", "http"), ("PORT", "80.5"),
    ("WEB_CONCURRENCY", "0"), ("KEEPALIVE_SECONDS", "-1"),
    ("PROVE_TIMEOUT_SECONDS", "ten"), ("PROVE_TIMEOUT_SECONDS", "0"), ("PROVE_TIMEOUT_SECONDS", "86400"),
    ("PROVE_TIMEOUT_SECONDS", "nan"), ("UPLOAD_TIMEOUT_SECONDS", "30s"), ("HEADER_TIMEOUT_SECONDS", "-5"),
    ("QUEUE_TIMEOUT_SECONDS", "inf"), ("VERIFY_TIMEOUT_SECONDS", "1,5"), ("UPLOAD_DEADLINE_SECONDS", "x"),
    ("PROOF_RESPONSE_FORMAT", "xml"), ("LOG_FORMAT", "yaml"), ("LOG_LEVEL", "loud"),
    ("VERIFIER_TARGET", "evm2"),
    ("VERIFY_PROOFS", "maybe"), ("VERIFY_PROOFS", "2"),
    ("API_TOKENS", ","), ("API_TOKENS", " , ,"), ("API_TOKENS", ""), ("API_TOKENS", "  "),  # an empty secret: no auth
    ("CORS_ALLOW_ORIGINS", "https://a.example/"), ("CORS_ALLOW_ORIGINS", "*, https://a.example"),
    ("FORWARDED_ALLOW_IPS", "proxy.local"), ("FORWARDED_ALLOW_IPS", "127.0.0.1,10.0.0.0/33"),
    ("HARDWARE_CONCURRENCY", "x"), ("HARDWARE_CONCURRENCY", "0"),
    ("BB_MEMORY_LIMIT_MB", "-1"), ("MAX_BODY_BYTES", "0"), ("MAX_WITNESS_BYTES", "1MB"),
    ("PROOF_CORES", "0"), ("MAX_CONCURRENT_PROOFS", "1025"), ("VERIFY_CONCURRENCY", "0"),
    ("PROOF_MEMORY_BUDGET_BYTES", "0"), ("MAX_QUEUED_REQUESTS", "0"), ("MAX_UPLOADING_REQUESTS", "many"),
]


@pytest.mark.parametrize("name, value", BAD, ids=[f"{n}={v}" for n, v in BAD])
def test_a_bad_value_is_a_config_error_naming_the_variable(base, name, value):
    with pytest.raises(ConfigError) as raised:
        load(base, **{name: value})
    assert re.match(rf"{name}[=:]", str(raised.value)), str(raised.value)
    assert isinstance(raised.value, ValueError)


def expect_error(base, name, words, **env):
    with pytest.raises(ConfigError) as raised:
        load(base, **env)
    message = str(raised.value)
    assert re.match(rf"{name}[=:]", message) and words in message, message


def test_api_tokens_file_must_be_readable_and_hold_a_token(base, tmp_path):
    expect_error(base, "API_TOKENS_FILE", "No such file or directory", API_TOKENS_FILE=str(tmp_path / "missing"))
    expect_error(base, "API_TOKENS_FILE", "Is a directory", API_TOKENS_FILE=str(tmp_path))  # unreadable, as root too
    empty = tmp_path / "tokens"
    empty.write_text("# rotated 2026-11\n\n , \n")
    expect_error(base, "API_TOKENS_FILE", "holds no token", API_TOKENS_FILE=str(empty))


def test_circuit_path_must_be_a_noir_program(base, tmp_path):
    expect_error(base, "CIRCUIT_PATH", "No such file or directory", CIRCUIT_PATH=str(tmp_path / "missing.json"))
    not_json = tmp_path / "circuit.json"
    not_json.write_bytes(b"\x1f\x8b not a program")
    expect_error(base, "CIRCUIT_PATH", "is not a Noir program JSON", CIRCUIT_PATH=str(not_json))


def test_circuits_dir_must_exist(base, tmp_path):
    expect_error(base, "CIRCUITS_DIR", "does not exist", CIRCUITS_DIR=str(tmp_path / "missing"))
    expect_error(base, "CIRCUITS_DIR", "is not a directory", CIRCUITS_DIR=CIRCUIT)


def test_tmpdir_must_be_a_writable_directory(base, tmp_path):
    expect_error(base, "TMPDIR", "does not exist", TMPDIR=str(tmp_path / "missing"))
    expect_error(base, "TMPDIR", "is not a directory", TMPDIR=CIRCUIT)
    if os.geteuid() != 0:  # root may write anywhere: a missing directory stands for an unwritable one above
        read_only = tmp_path / "read-only"
        read_only.mkdir(mode=0o500)
        expect_error(base, "TMPDIR", "is not writable", TMPDIR=str(read_only))


def test_other_directories_are_checked(base, tmp_path):
    expect_error(base, "VK_CACHE_DIR", "is not a directory", VK_CACHE_DIR=CIRCUIT)
    expect_error(base, "BB_CRS_PATH", "is not a directory", BB_CRS_PATH=CIRCUIT)
    expect_error(base, "PROMETHEUS_MULTIPROC_DIR", "does not exist",
                 PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "missing"))
    assert load(base, VK_CACHE_DIR=str(tmp_path / "later")).vk_cache_dir == str(tmp_path / "later")  # made later


# ---------------------------------------------------------------- derived and parsed values

def test_cores_and_proofs_follow_hardware_concurrency(base):
    s = load(base, HARDWARE_CONCURRENCY="3")
    assert (s.hardware_concurrency, s.proof_cores, s.max_concurrent_proofs) == (3, 3, 3)
    s = load(base, HARDWARE_CONCURRENCY="3", PROOF_CORES="5")
    assert (s.proof_cores, s.max_concurrent_proofs) == (5, 5)
    s = load(base, HARDWARE_CONCURRENCY="3", MAX_CONCURRENT_PROOFS="2")
    assert (s.proof_cores, s.max_concurrent_proofs) == (3, 2)


def test_parsed_values(base, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("one\n")
    s = load(base, API_TOKENS=" a, b,,", API_TOKENS_FILE=str(tokens), VERIFY_PROOFS="Off", VERIFIER_TARGET="evm",
             BB_MEMORY_LIMIT_MB="0", CORS_ALLOW_ORIGINS="https://A.example http://localhost:3000",
             FORWARDED_ALLOW_IPS="*", BB_BINARY="relative/bb", PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    assert s.api_tokens == ("a", "b") and s.api_tokens_file == str(tokens)
    assert s.verify_proofs is False and s.verifier_target == "evm"
    assert s.bb_memory_limit_mb is None  # 0: no limit
    assert s.cors_allow_origins == frozenset({"https://a.example", "http://localhost:3000"})
    assert s.forwarded_allow_ips == "*"
    assert s.bb_binary == os.path.abspath("relative/bb")
    assert s.prometheus_multiproc_dir == str(tmp_path)
    for value in ("1", "true", "YES", "on"):
        assert load(base, VERIFY_PROOFS=value).verify_proofs is True
    assert load(base, CORS_ALLOW_ORIGINS="*").cors_allow_origins == "*"


def test_circuits_dir_adds_named_circuits_after_the_default(base, tmp_path, caplog):
    directory = tmp_path / "circuits"
    directory.mkdir()
    for name in ("b.json", "a-1_x.json", "default.json", "bad name.json", "notes.txt"):
        (directory / name).write_text("{}")
    (directory / "sub.json").mkdir()
    s = load(base, CIRCUITS_DIR=str(directory))
    assert s.circuits_dir == str(directory)
    assert list(s.circuits) == ["default", "a-1_x", "b"]
    assert s.circuits == {"default": CIRCUIT, "a-1_x": str(directory / "a-1_x.json"), "b": str(directory / "b.json")}
    skipped = " ".join(r.getMessage() for r in caplog.records)
    assert "'default.json'" in skipped and "'bad name.json'" in skipped
    assert circuit_files(None) == {}


def test_names_are_the_variables_read():
    read = []

    class Recording(dict):
        def get(self, key, default=None):
            read.append(key)
            return super().get(key, default)

    environ = Recording(TMPDIR="/tmp", CIRCUIT_PATH=CIRCUIT)
    Settings.from_environ(environ)
    assert Settings.names() == list(dict.fromkeys(read))
    assert len(set(Settings.names())) == len(Settings.names())
    assert {"PORT", "TMPDIR", "HARDWARE_CONCURRENCY", "API_TOKENS_FILE"} <= set(Settings.names())
    assert not {"CIRCUITS", "SLOTS_DIR", "SHM_DIR"} & set(Settings.names())  # derived, not read


def test_importing_reads_nothing(tmp_path):
    env = {**os.environ, "PORT": "not a port", "TMPDIR": str(tmp_path / "missing"),
           "CIRCUIT_PATH": str(tmp_path / "missing.json"), "HARDWARE_CONCURRENCY": "x"}
    proc = subprocess.run([sys.executable, "-c", "import bbworker.settings, bbworker.web.app"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "missing").exists()


# ---------------------------------------------------------------- the parsers

def test_tokens_parse_from_lists_and_files():
    assert parse_tokens("a, b,,c") == ["a", "b", "c"]
    assert parse_tokens("# rotated 2026-11\none\n\n  two  \n#three\n") == ["one", "two"]


def test_origins_parse():
    assert parse_origins("") is None and parse_origins("  ") is None
    assert parse_origins("*") == "*"
    assert parse_origins("https://A.example, http://localhost:3000") == {"https://a.example", "http://localhost:3000"}
    for bad in ("https://a.example/", "a.example", "ftp://a.example", "https://a.example/path", "*, https://a.b"):
        with pytest.raises(ValueError):
            parse_origins(bad)


def test_the_configuration_table_lists_exactly_the_settings_with_their_defaults(base):
    """docs/configuration.md's table against the object: every variable once, nothing else, and each
    plain number or word default the table states is the one Settings.from_environ gives."""
    with open(os.path.join(ROOT, "docs", "configuration.md")) as f:
        rows = [line.split("|")[1:3] for line in f if re.match(r"^\| `[A-Z_]+` \|", line)]
    names = [name.strip().strip("`") for name, _ in rows]
    assert sorted(names) == sorted(Settings.names()) and len(names) == len(set(names))
    s = Settings.from_environ({"CIRCUIT_PATH": CIRCUIT})  # nothing else set: every default
    for name, default in rows:
        value = getattr(s, name.strip().strip("`").lower())
        stated = default.strip().split(" ")[0].strip("`")
        if re.fullmatch(r"\d+", stated):
            assert value in (int(stated), float(stated)) or (value is True and stated == "1"), (name, stated, value)
        elif stated in ("json", "text", "info", "/tmp", "127.0.0.1,::1"):
            assert value == stated, (name, stated, value)
