"""ownership: private dirs and lock files, per-server run dirs, children that die with their parent."""
import fcntl
import os
import signal
import subprocess
import sys
import time

import pytest

import ownership

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_private_dir_creates_0700_and_refuses_what_is_not_ours(tmp_path):
    path = ownership.private_dir(str(tmp_path / "d"))
    assert os.stat(path).st_mode & 0o777 == 0o700
    assert ownership.private_dir(path) == path  # accepted again as it is
    os.symlink(path, tmp_path / "link")
    with pytest.raises(ownership.UnsafePath, match="symbolic link"):
        ownership.private_dir(str(tmp_path / "link"))
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with pytest.raises(ownership.UnsafePath, match="writable by other users"):
        ownership.private_dir(str(open_dir))
    (tmp_path / "file").write_text("")
    with pytest.raises(ownership.UnsafePath, match="not a directory"):
        ownership.private_dir(str(tmp_path / "file"))


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_private_paths_owned_by_someone_else_are_refused(tmp_path):
    other = tmp_path / "other"
    other.mkdir(0o700)
    os.chown(other, 4242, 4242)
    with pytest.raises(ownership.UnsafePath, match="owned by uid 4242"):
        ownership.private_dir(str(other))
    (tmp_path / "f").write_text("x")
    os.chown(tmp_path / "f", 4242, 4242)
    with pytest.raises(ownership.UnsafePath, match="owned by uid 4242"):
        ownership.open_private(str(tmp_path / "f"))


def test_open_private_does_not_follow_symlinks(tmp_path):
    (tmp_path / "target").write_text("secret")
    os.symlink(tmp_path / "target", tmp_path / "link")
    with pytest.raises(OSError):
        ownership.open_private(str(tmp_path / "link"), os.O_RDWR | os.O_CREAT)
    assert (tmp_path / "target").read_text() == "secret"


def test_lock_path_is_exclusive_and_survives_the_directory_being_replaced(tmp_path):
    d = tmp_path / "slots"
    d.mkdir(0o700)
    path = str(d / "slot-0.lock")
    first = ownership.lock_path(path)
    assert first is not None
    assert ownership.lock_path(path) is None  # held
    # Someone removes the directory while the slot is held and makes it again:
    os.unlink(path)
    os.rmdir(d)
    d.mkdir(0o700)
    second = ownership.lock_path(path)  # a new file: a new lock, and the only one on it
    assert second is not None and ownership.lock_path(path) is None
    os.close(first)
    os.close(second)


def test_lock_path_rechecks_the_inode_after_locking(tmp_path, monkeypatch):
    """The file is replaced between open() and flock(): the lock taken on the old inode is dropped."""
    path = str(tmp_path / "slot.lock")
    real_flock = fcntl.flock
    calls = []

    def racing_flock(fd, op):
        real_flock(fd, op)
        if not calls:  # first lock: replace the file under it
            os.unlink(path)
            holder = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            calls.append(holder)
    monkeypatch.setattr(ownership.fcntl, "flock", racing_flock)
    fd = ownership.lock_path(path)
    assert fd is not None
    assert os.fstat(fd).st_ino == os.stat(path).st_ino
    os.close(fd)
    os.close(calls[0])


def hold_run_dir(parent):
    """A child process that creates a ServerDir in `parent`, prints its path and sleeps."""
    code = ("import sys, time, ownership; d = ownership.ServerDir.create(sys.argv[1]); "
            "print(d.path, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, parent], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def test_clean_stale_removes_only_dead_servers_dirs(tmp_path):
    parent = str(tmp_path)
    alive, alive_dir = hold_run_dir(parent)
    dead, dead_dir = hold_run_dir(parent)
    mine = ownership.ServerDir.create(parent)
    try:
        dead.kill()
        dead.wait()
        dead.stdout.close()
        for d in (alive_dir, dead_dir, mine.path):
            open(os.path.join(d, "file"), "w").close()
            assert os.stat(d).st_mode & 0o777 == 0o700
        fresh = tmp_path / f"{ownership.RUN_PREFIX}fresh"  # being created: no lock file yet
        fresh.mkdir()
        old = tmp_path / f"{ownership.RUN_PREFIX}old"
        old.mkdir()
        os.utime(old, (time.time() - 3600,) * 2)
        unrelated = tmp_path / "bb-worker-vk"
        unrelated.mkdir()
        removed = ownership.clean_stale(parent, keep=mine.path)
        assert sorted(removed) == sorted([dead_dir, str(old)])
        assert os.path.isdir(alive_dir) and os.path.isdir(mine.path) and fresh.is_dir() and unrelated.is_dir()
    finally:
        alive.kill()
        alive.wait()
        alive.stdout.close()
        mine.remove()
    assert not os.path.exists(mine.path)
    assert ownership.clean_stale(parent) == [alive_dir]


def test_worker_dirs(tmp_path):
    d = ownership.ServerDir.create(str(tmp_path))
    w = d.worker_dir(1234)
    assert os.path.isdir(w) and os.stat(w).st_mode & 0o777 == 0o700
    open(os.path.join(w, "witness.gz"), "w").close()
    d.remove_worker(1234)
    assert not os.path.exists(w)
    d.remove()


def test_child_dies_with_its_parent(tmp_path):
    """A parent starts a grandchild with die_with_parent, then is killed -9: the grandchild dies too."""
    code = ("import os, subprocess, sys, ownership; me = os.getpid(); "
            "p = subprocess.Popen(['sleep', '60'], preexec_fn=lambda: ownership.die_with_parent(me)); "
            "print(p.pid, flush=True); p.wait()")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.stdout.close()
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break  # dead, waiting for init to reap it
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child outlived its parent")


def test_a_subreaper_kills_orphans_in_other_process_groups_only():
    """In a process of its own (pytest's other children must not count): a child in our process
    group (a worker) lives; a child in a group of its own (bb) and the process it started,
    orphaned to us when bb exits, die with their group."""
    code = ("import os, subprocess, sys, time, ownership; assert ownership.become_subreaper(); "
            "worker = subprocess.Popen(['sleep', '60']); "
            "bb = subprocess.Popen(['sh', '-c', 'sleep 60 & echo $!; exit 0'], process_group=0, stdout=subprocess.PIPE, text=True); "
            "grandchild = int(bb.stdout.readline()); bb.wait(); time.sleep(0.2); "
            "found = ownership.kill_orphans(); time.sleep(0.2); "
            "print(found == [grandchild], worker.poll() is None, os.waitpid(grandchild, 0)[1] == 9); worker.kill()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.stdout.split() == ["True", "True", "True"], proc.stdout + proc.stderr


def test_die_with_parent_kills_a_child_whose_parent_is_already_gone():
    code = "import ownership; ownership.die_with_parent(1); print('survived')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == -signal.SIGKILL and "survived" not in proc.stdout


def test_a_slot_stays_held_when_its_directory_is_removed_and_made_again(tmp_path):
    d = tmp_path / "slots"
    d.mkdir(0o700)
    path = str(d / "slot-0.lock")
    held = ownership.lock_slot(path)
    assert held is not None and ownership.lock_slot(path) is None
    os.unlink(path)
    os.rmdir(d)
    d.mkdir(0o700)
    assert ownership.lock_slot(path) is None  # the file is new, the slot is not free
    held.close()
    again = ownership.lock_slot(path)
    assert again is not None
    again.close()
    again.close()  # idempotent


def test_a_child_that_inherits_a_slot_keeps_it_taken(tmp_path):
    path = str(tmp_path / "slot-0.lock")
    held = ownership.lock_slot(path)
    child = subprocess.Popen(["sleep", "30"], pass_fds=held.fds)
    try:
        held.close()  # the parent lets go, e.g. a worker killed while bb runs
        assert ownership.lock_slot(path) is None
    finally:
        child.kill()
        child.wait()
    free = ownership.lock_slot(path)
    assert free is not None
    free.close()
