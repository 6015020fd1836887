"""gunicorn.conf.py and bbworker.server.hooks: the file checks out, bad environment values stop the server,
the master's state (run directory, metrics) lives on gunicorn's Arbiter."""
import glob
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import types

import pytest

from bbworker.server import hooks, rundir, scheduler, worker
from bbworker.settings import Settings
from support import ROOT, Server, free_port, wait_for

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
# What the file imports or builds for itself (modules, classes, its Settings) is no setting of gunicorn's.
unknown = sorted(k for k, v in names.items() if not k.startswith("_") and not isinstance(v, (types.ModuleType, type))
                 and k != "settings" and k not in cfg.settings)
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
    assert cfg["worker_class"] == "bbworker.server.worker.GeventWorker"  # gunicorn's gevent worker + a header deadline
    assert cfg["pre_request"] == cfg["post_request"] == "bbworker.server.connection"
    assert cfg["bind"] == ["0.0.0.0:12345"]
    assert cfg["workers"] == 3
    assert cfg["wsgi_app"] == "app:application"
    assert cfg["graceful_timeout"] >= float(prove) + float(queue)
    assert cfg["timeout"] > 0
    if os.path.isdir("/dev/shm"):
        assert cfg["worker_tmp_dir"] == "/dev/shm"
    assert cfg["on_starting"] == "bbworker.server.hooks", "the on_starting hook is ours"


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


MULTIPROCESS_METRICS = """\
import glob, logging, os, runpy, types
conf = runpy.run_path("gunicorn.conf.py")  # what gunicorn's master does first
server = types.SimpleNamespace(log=logging.getLogger("test"))
conf["on_starting"](server)
try:
    from bbworker.server import metrics  # a worker forked now has what the master imported
    metrics.PROOFS.labels("default", "success").inc()
    print(len(glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db"))))
finally:
    conf["on_exit"](server)
"""


def test_with_several_workers_a_forked_worker_s_metrics_go_to_the_multiprocess_dir(tmp_path):
    """WEB_CONCURRENCY > 1: on_starting names a PROMETHEUS_MULTIPROC_DIR; the metrics a worker
    (forked from the master after it) counts must be written there, or GET /api/metrics, which
    merges that directory's files, misses them. prometheus_client picks its value class when
    first imported: the master must not import it before on_starting."""
    proc = subprocess.run([sys.executable, "-c", MULTIPROCESS_METRICS], cwd=ROOT,
                          env=env_for(tmp_path, WEB_CONCURRENCY="2", BB_BINARY="/nonexistent"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[-1]) > 0, "the worker's counter was kept in its own memory"


# ---------------------------------------------------------------- hooks.Hooks, in this process

class FakeArbiter:
    """What the hooks use of gunicorn's Arbiter (`server`): its log; hooks.Master lands on it."""

    def __init__(self):
        self.log = logging.getLogger("test.arbiter")


@pytest.fixture
def master_env(tmp_path, monkeypatch):
    """settings(**env) -> Settings for a master in tmp_path/tmp (no bb unless env names one);
    the variables on_starting sets for the workers are restored afterwards, atexit is not used."""
    (tmp_path / "tmp").mkdir()
    for name in (rundir.RUN_DIR_ENV, "PROMETHEUS_MULTIPROC_DIR"):
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    monkeypatch.setattr(hooks.atexit, "register", lambda func: None)

    def settings(**env):
        return Settings.from_environ({"TMPDIR": str(tmp_path / "tmp"), "BB_BINARY": "/nonexistent", **env})
    return settings


def test_the_master_s_state_lives_on_the_arbiter_and_survives_a_config_re_read(master_env):
    """gunicorn re-reads gunicorn.conf.py on SIGHUP, which makes a new Hooks: its child_exit and
    on_exit still find the run directory the first one made."""
    server = FakeArbiter()
    hooks.Hooks(master_env()).on_starting(server)
    master = getattr(server, hooks.STATE)
    run_dir = master.run_dir.path
    assert os.environ[rundir.RUN_DIR_ENV] == run_dir and os.path.isdir(run_dir)
    gone, alive = types.SimpleNamespace(pid=4321), types.SimpleNamespace(pid=4322)
    for pid in (gone.pid, alive.pid):
        os.mkdir(master.run_dir.worker_path(pid), 0o700)
        open(os.path.join(master.run_dir.worker_path(pid), "witness.gz"), "w").close()
    settings = master_env()  # the re-read
    os.makedirs(settings.slots_dir, 0o700)
    waiting = os.path.join(settings.slots_dir, f"{scheduler.waiting_prefix(gone.pid)}1")
    open(waiting, "w").close()
    reread = hooks.Hooks(settings)
    reread.child_exit(server, gone)
    assert not os.path.exists(master.run_dir.worker_path(gone.pid)), "the exited worker's files stayed"
    assert not os.path.exists(waiting), "the exited worker's scheduler files stayed"
    assert os.path.isdir(master.run_dir.worker_path(alive.pid)), "another worker's files went"
    reread.on_exit(server)
    assert not os.path.exists(run_dir)


def test_hooks_without_a_started_master_do_nothing(master_env):
    server = FakeArbiter()  # on_starting never ran (gunicorn stopped before it)
    hooks.Hooks(master_env()).child_exit(server, types.SimpleNamespace(pid=4321))
    hooks.Hooks(master_env()).on_exit(server)
    assert not hasattr(server, hooks.STATE)


def test_on_starting_removes_the_run_dirs_of_servers_that_are_gone(master_env, tmp_path):
    dead = rundir.ServerDir.create(str(tmp_path / "tmp"))
    os.close(dead.lock_fd)  # its server is gone
    server = FakeArbiter()
    hooks.Hooks(master_env()).on_starting(server)
    try:
        assert not os.path.exists(dead.path)
        assert glob.glob(str(tmp_path / "tmp" / f"{rundir.RUN_PREFIX}*")) == [getattr(server, hooks.STATE).run_dir.path]
    finally:
        hooks.Hooks(master_env()).on_exit(server)


def test_on_starting_makes_a_metrics_dir_for_several_workers_and_on_exit_removes_it(master_env):
    server = FakeArbiter()
    settings = master_env(WEB_CONCURRENCY="2")
    hooks.Hooks(settings).on_starting(server)
    metrics_dir = getattr(server, hooks.STATE).metrics_dir
    try:
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == metrics_dir and os.path.isdir(metrics_dir)
        assert os.path.dirname(metrics_dir) == (settings.shm_dir or settings.tmpdir)
    finally:
        hooks.Hooks(settings).on_exit(server)
    assert not os.path.exists(metrics_dir)


def test_a_given_metrics_dir_is_emptied_locked_and_refused_to_a_second_server(master_env, tmp_path):
    given = tmp_path / "metrics"
    given.mkdir()
    (given / "counter_1.db").write_text("")
    (given / "notes.txt").write_text("")
    first = FakeArbiter()
    hooks.Hooks(master_env(PROMETHEUS_MULTIPROC_DIR=str(given))).on_starting(first)
    try:
        assert sorted(os.listdir(given)) == [".bb-worker.lock", "notes.txt"]
        assert getattr(first, hooks.STATE).metrics_dir is None, "a given directory is not ours to remove"
        (given / "counter_2.db").write_text("")
        with pytest.raises(SystemExit, match="PROMETHEUS_MULTIPROC_DIR=.* is in use by another running server"):
            hooks.Hooks(master_env(PROMETHEUS_MULTIPROC_DIR=str(given))).on_starting(FakeArbiter())
        assert (given / "counter_2.db").exists(), "the running server's files were removed"
    finally:
        hooks.Hooks(master_env()).on_exit(first)
        os.close(getattr(first, hooks.STATE).metrics_fd)
    assert given.is_dir()


@pytest.mark.parametrize("limit", [3, 1])
def test_max_requests_stops_the_master_before_it_makes_anything(master_env, tmp_path, limit):
    """A worker at max_requests stops accepting and the next starts only once it exited (after its
    last keep-alive connection): the service stops meanwhile. gunicorn's --max-requests is refused."""
    server = FakeArbiter()
    server.cfg = types.SimpleNamespace(max_requests=limit)
    with pytest.raises(SystemExit, match=rf"bad configuration: max_requests={limit} \(--max-requests\): "):
        hooks.Hooks(master_env()).on_starting(server)
    assert os.listdir(tmp_path / "tmp") == [] and not hasattr(server, hooks.STATE)


def test_without_max_requests_the_master_starts(master_env):
    server = FakeArbiter()
    server.cfg = types.SimpleNamespace(max_requests=0)  # gunicorn's default
    hooks.Hooks(master_env()).on_starting(server)
    try:
        assert getattr(server, hooks.STATE).run_dir is not None
    finally:
        hooks.Hooks(master_env()).on_exit(server)


def test_the_master_runs_bb_only_when_the_vk_cache_is_not_writable(master_env, tmp_path, bad_file):
    """`bb --version` may take seconds and the port opens after on_starting: it runs only when a VK
    that cannot be stored must be found in the cache."""
    mark = tmp_path / "bb-ran"
    fake = tmp_path / "bb"
    fake.write_text(f"#!/bin/sh\ntouch {mark}\necho 5.0.0\n")
    fake.chmod(0o755)
    server = FakeArbiter()
    settings = master_env(BB_BINARY=str(fake), VK_CACHE_DIR=str(tmp_path / "vk"))
    hooks.Hooks(settings).on_starting(server)
    hooks.Hooks(settings).on_exit(server)
    assert not mark.exists(), "bb ran in the master though the VK cache is writable"
    with pytest.raises(SystemExit, match="is not writable and holds no VK"):
        hooks.Hooks(master_env(BB_BINARY=str(fake), VK_CACHE_DIR=os.path.join(bad_file, "vk"))).on_starting(
            FakeArbiter())
    assert mark.exists()


def test_post_fork_gives_the_worker_its_header_timeout(master_env):
    settings = master_env(HEADER_TIMEOUT_SECONDS="2.5")
    forked = types.SimpleNamespace()
    hooks.Hooks(settings).post_fork(FakeArbiter(), forked)
    assert forked.header_timeout == 2.5
    assert worker.GeventWorker.header_timeout == 10.0, "set on the worker, not on its class"


def test_post_worker_init_starts_the_app(master_env):
    started = []
    app = types.SimpleNamespace(start=lambda: started.append(True))
    hooks.Hooks(master_env()).post_worker_init(types.SimpleNamespace(wsgi=app))
    assert started == [True]


# ---------------------------------------------------------------- a live reload

def test_a_reload_on_hup_keeps_the_master_s_run_dir(tmp_path, fake_bb):
    """SIGHUP: gunicorn re-reads gunicorn.conf.py and replaces its workers. The old worker's
    request files go when it exits, and the run directory when the server stops."""
    with Server(str(tmp_path), {"BB_BINARY": fake_bb}) as srv:
        srv.wait_ready(timeout=120)
        assert wait_for(lambda: len(srv.worker_dirs()) == 1), srv.output_tail()
        old = srv.worker_dirs()
        run_dirs = glob.glob(os.path.join(srv.tmpdir, f"{rundir.RUN_PREFIX}*"))
        os.kill(srv.proc.pid, signal.SIGHUP)
        assert wait_for(lambda: not os.path.exists(old[0]), timeout=30), srv.output_tail()
        srv.wait_ready(timeout=120)
        assert wait_for(lambda: len(srv.worker_dirs()) == 1), srv.output_tail()
        assert srv.worker_dirs() != old and glob.glob(os.path.join(srv.tmpdir, f"{rundir.RUN_PREFIX}*")) == run_dirs
    assert srv.proc.returncode == 0, srv.output_tail()
    assert glob.glob(os.path.join(srv.tmpdir, f"{rundir.RUN_PREFIX}*")) == [], "the run directory outlived the server"
