"""gunicorn.conf.py and settings.py: the file checks out, bad environment values stop the server."""
import glob
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from support import ROOT, free_port

GUNICORN = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"]


def env_for(tmp_path, **values):
    """The test process's environment with its own TMPDIR and a free PORT, plus `values`."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("GUNICORN_CMD_ARGS", "WEB_CONCURRENCY") and not k.startswith("FAKE_BB")}
    env.update(TMPDIR=str(tmp_path), PORT=str(free_port()), PYTHONUNBUFFERED="1")
    env.update(values)
    return env


def test_check_config_passes(tmp_path):
    proc = subprocess.run(GUNICORN[:3] + ["--check-config"] + GUNICORN[3:], cwd=ROOT, env=env_for(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_check_config_fails_on_a_bad_setting(tmp_path):
    proc = subprocess.run(GUNICORN[:3] + ["--check-config"] + GUNICORN[3:], cwd=ROOT,
                          env=env_for(tmp_path, MAX_BODY_BYTES="lots"), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "MAX_BODY_BYTES" in proc.stdout + proc.stderr


@pytest.fixture
def bad_file(tmp_path):
    path = tmp_path / "not-json.txt"
    path.write_text("hello\n")
    return str(path)


@pytest.mark.parametrize("name, value", [
    ("PORT", "abc"), ("PORT", "70000"), ("PORT", "0"),
    ("PROVE_TIMEOUT_SECONDS", "-1"), ("PROVE_TIMEOUT_SECONDS", "0"), ("PROVE_TIMEOUT_SECONDS", "nan"),
    ("PROVE_TIMEOUT_SECONDS", "ninety"),
    ("MAX_CONCURRENT_PROOFS", "0"), ("MAX_CONCURRENT_PROOFS", "2.5"),
    ("PROOF_CORES", "0"), ("HARDWARE_CONCURRENCY", "many"), ("PROOF_MEMORY_BUDGET_BYTES", "1GiB"),
    ("CIRCUIT_PATH", "/nonexistent"), ("CIRCUIT_PATH", "{bad_file}"),
    ("VERIFIER_TARGET", "bogus"),
    ("WEB_CONCURRENCY", "0"), ("MAX_BODY_BYTES", "0"), ("MAX_WITNESS_BYTES", "-5"),
    ("QUEUE_TIMEOUT_SECONDS", "-3"), ("UPLOAD_TIMEOUT_SECONDS", "x"),
    ("BB_CRS_PATH", "{bad_file}"), ("VK_CACHE_DIR", "{bad_file}"),
    ("TMPDIR", "/nonexistent"), ("TMPDIR", "{bad_file}"), ("LOG_LEVEL", "verbose"),
    ("MAX_QUEUED_REQUESTS", "0"), ("LOG_FORMAT", "xml"), ("PROOF_RESPONSE_FORMAT", "cbor"),
    ("HARDWARE_CONCURRENCY", "abc"), ("HARDWARE_CONCURRENCY", "0"), ("HARDWARE_CONCURRENCY", "-1"),
    ("HARDWARE_CONCURRENCY", "1.5"), ("PROMETHEUS_MULTIPROC_DIR", "/nonexistent"),
    ("PROMETHEUS_MULTIPROC_DIR", "{bad_file}"), ("PROMETHEUS_MULTIPROC_DIR", "/proc"),
])
def test_bad_environment_stops_the_server_naming_the_variable(tmp_path, bad_file, name, value):
    env = env_for(tmp_path, **{name: value.format(bad_file=bad_file)})
    proc = subprocess.Popen(GUNICORN, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the server started with {name}={value!r}:\n{output.decode()}")
    assert proc.returncode != 0
    text = output.decode()
    assert f"{name}=" in text, text
    assert "Traceback" not in text, text
    assert glob.glob(os.path.join(tmp_path, "bb-worker-run-*")) == [], "a failed start left its run directory"


CONFIG_DUMP = """\
import json, runpy, sys, types
sys.argv = ["gunicorn", "-c", "gunicorn.conf.py"]
from gunicorn.app.wsgiapp import WSGIApplication
app = WSGIApplication()
cfg = app.cfg
names = runpy.run_path("gunicorn.conf.py")
unknown = sorted(k for k, v in names.items() if not k.startswith("_") and not isinstance(v, types.ModuleType)
                 and k not in cfg.settings)
print(json.dumps({"worker_class": cfg.worker_class_str, "graceful_timeout": cfg.graceful_timeout,
                  "timeout": cfg.timeout, "bind": cfg.bind, "workers": cfg.workers,
                  "worker_tmp_dir": cfg.worker_tmp_dir, "wsgi_app": cfg.wsgi_app,
                  "on_starting": cfg.on_starting.__module__, "pre_request": cfg.pre_request.__module__,
                  "post_request": cfg.post_request.__module__, "unknown": unknown}))
"""


def gunicorn_config(tmp_path, **env):
    proc = subprocess.run([sys.executable, "-c", CONFIG_DUMP], cwd=ROOT, env=env_for(tmp_path, **env),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("prove, queue", [("90", "30"), ("300", "30"), ("600.5", "0.5"), ("1", "120.9")])
def test_gunicorn_settings_follow_the_environment(tmp_path, prove, queue):
    cfg = gunicorn_config(tmp_path, PORT="12345", PROVE_TIMEOUT_SECONDS=prove, QUEUE_TIMEOUT_SECONDS=queue,
                          WEB_CONCURRENCY="3")
    assert cfg["unknown"] == [], "names in gunicorn.conf.py that gunicorn ignores"
    assert cfg["worker_class"] == "connection.GeventWorker"  # gunicorn's gevent worker + a header deadline
    assert cfg["pre_request"] == cfg["post_request"] == "connection"
    assert cfg["bind"] == ["0.0.0.0:12345"]
    assert cfg["workers"] == 3
    assert cfg["wsgi_app"] == "app:application"
    assert cfg["graceful_timeout"] >= float(prove) + float(queue)
    assert cfg["timeout"] > 0
    if os.path.isdir("/dev/shm"):
        assert cfg["worker_tmp_dir"] == "/dev/shm"
    assert cfg["on_starting"] != "gunicorn.config", "the on_starting hook is ours"


def test_a_vk_that_can_be_neither_found_nor_stored_stops_the_server(tmp_path, bad_file):
    cache = os.path.join(bad_file, "vk")  # under a regular file: nothing can be created there, even by root
    proc = subprocess.run(GUNICORN, cwd=ROOT, env=env_for(tmp_path, VK_CACHE_DIR=cache),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert f"VK_CACHE_DIR={cache!r} is not writable and holds no VK" in proc.stdout + proc.stderr


def test_a_port_in_use_stops_the_server_and_leaves_nothing(tmp_path):
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(GUNICORN, cwd=ROOT, env=env_for(tmp_path, PORT=str(port)),
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "Can't connect" in proc.stderr or "in use" in proc.stderr, proc.stderr
    assert glob.glob(os.path.join(tmp_path, "bb-worker-run-*")) == [], "a failed start left its run directory"
    assert "Traceback" not in proc.stderr, proc.stderr


def test_two_workers_with_an_unusable_metrics_dir_stop_naming_it(tmp_path):
    proc = subprocess.run(GUNICORN, cwd=ROOT, env=env_for(tmp_path, WEB_CONCURRENCY="2",
                                                          PROMETHEUS_MULTIPROC_DIR="/proc"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "bad configuration: PROMETHEUS_MULTIPROC_DIR='/proc'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert glob.glob(os.path.join(tmp_path, "bb-worker-run-*")) == []
