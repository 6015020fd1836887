"""bbworker.server.rundir: per-server run directories (ServerDir), the clean-up of dead servers' ones, WorkerDir."""
import fcntl
import os
import subprocess
import sys
import time

import pytest

from bbworker import files
from bbworker.server import rundir


def hold_run_dir(parent):
    """A child process that creates a ServerDir in `parent`, prints its path and sleeps."""
    code = ("import sys, time; from bbworker.server.rundir import ServerDir; d = ServerDir.create(sys.argv[1]); "
            "print(d.path, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, parent], stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def test_clean_stale_removes_only_dead_servers_dirs(tmp_path):
    parent = str(tmp_path)
    alive, alive_dir = hold_run_dir(parent)
    dead, dead_dir = hold_run_dir(parent)
    mine = rundir.ServerDir.create(parent)
    try:
        dead.kill()
        dead.wait()
        dead.stdout.close()
        for d in (alive_dir, dead_dir, mine.path):
            open(os.path.join(d, "file"), "w").close()
            assert os.stat(d).st_mode & 0o777 == 0o700
        fresh = tmp_path / f"{rundir.RUN_PREFIX}fresh"  # being created: no lock file yet
        fresh.mkdir()
        old = tmp_path / f"{rundir.RUN_PREFIX}old"
        old.mkdir()
        os.utime(old, (time.time() - 3600,) * 2)
        unrelated = tmp_path / "bb-worker-vk"
        unrelated.mkdir()
        removed = rundir.clean_stale(parent)  # this process's own holds its lock: alive
        assert sorted(removed) == sorted([dead_dir, str(old)])
        assert os.path.isdir(alive_dir) and os.path.isdir(mine.path) and fresh.is_dir() and unrelated.is_dir()
    finally:
        alive.kill()
        alive.wait()
        alive.stdout.close()
        mine.remove()
    assert not os.path.exists(mine.path)
    assert rundir.clean_stale(parent) == [alive_dir]


def test_clean_stale_leaves_symlinks_and_directories_open_to_others(tmp_path):
    parent = tmp_path / "parent"
    parent.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "precious").write_text("x")
    os.symlink(target, parent / f"{rundir.RUN_PREFIX}link")
    open_dir = parent / f"{rundir.RUN_PREFIX}open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    (open_dir / rundir.OWNER_LOCK).write_text("")
    os.utime(open_dir, (time.time() - 3600,) * 2)
    assert rundir.clean_stale(str(parent)) == []
    assert (target / "precious").exists() and open_dir.is_dir()
    assert rundir.clean_stale(str(tmp_path / "missing")) == []


def test_clean_stale_grace_for_a_dir_without_its_lock_file(tmp_path):
    young = tmp_path / f"{rundir.RUN_PREFIX}young"
    young.mkdir(0o700)
    assert rundir.clean_stale(str(tmp_path), grace=3600) == []
    os.utime(young, (time.time() - 10,) * 2)
    assert rundir.clean_stale(str(tmp_path), grace=5) == [str(young)]


def test_worker_dirs(tmp_path):
    d = rundir.ServerDir.create(str(tmp_path))
    assert os.path.basename(d.path).startswith(f"{rundir.RUN_PREFIX}{os.getpid()}-")
    w = d.worker_path(1234)
    assert w == os.path.join(d.path, "w1234") and not os.path.exists(w)  # made by the worker when it needs it
    files.private_dir(w)
    assert os.path.isdir(w) and os.stat(w).st_mode & 0o777 == 0o700
    open(os.path.join(w, "witness.gz"), "w").close()
    d.remove_worker(1234)
    assert not os.path.exists(w)
    d.remove_worker(1234)  # already gone: no error
    d.remove()
    assert not os.path.exists(d.path) and d.lock_fd is None
    d.remove()  # idempotent


def test_a_server_dir_is_locked_while_its_owner_lives(tmp_path):
    d = rundir.ServerDir.create(str(tmp_path))
    try:
        fd = os.open(os.path.join(d.path, rundir.OWNER_LOCK), os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    finally:
        d.remove()


def test_worker_dir_is_w_pid_in_the_run_dir_the_master_names(tmp_path, monkeypatch):
    monkeypatch.setenv(rundir.RUN_DIR_ENV, str(tmp_path / "run"))
    worker = rundir.WorkerDir(str(tmp_path / "tmp"))
    assert worker.path == str(tmp_path / "run" / f"w{os.getpid()}")
    assert rundir.WorkerDir(str(tmp_path), path="/somewhere").path == "/somewhere"
    assert os.listdir(tmp_path) == [], "the directory is made by whoever writes into it"


def test_a_worker_dir_outside_gunicorn_makes_its_own_run_dir_removed_at_exit(tmp_path):
    code = ("import os, sys; from bbworker.server.rundir import WorkerDir; w = WorkerDir(sys.argv[1]); "
            "print(os.getpid(), w.path, w.path); assert os.path.isdir(os.path.dirname(w.path))")
    env = {k: v for k, v in os.environ.items() if k != rundir.RUN_DIR_ENV}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    pid, first, again = proc.stdout.split()
    assert first == again, "the path is decided once"
    assert os.path.basename(first) == f"w{pid}"
    assert os.path.dirname(os.path.dirname(first)) == str(tmp_path)
    assert os.path.basename(os.path.dirname(first)).startswith(rundir.RUN_PREFIX)
    assert os.listdir(tmp_path) == [], "the run directory outlived the process"
