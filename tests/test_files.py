"""bbworker.files: paths that are ours (private_dir, open_private), flock_polled, stamp, low_on_space, remove."""
import fcntl
import os
import time

import gevent
import pytest

from bbworker import files


def test_private_dir_creates_0700_and_refuses_what_is_not_ours(tmp_path):
    path = files.private_dir(str(tmp_path / "d"))
    assert os.stat(path).st_mode & 0o777 == 0o700
    assert files.private_dir(path) == path  # accepted again as it is
    os.symlink(path, tmp_path / "link")
    with pytest.raises(files.UnsafePath, match="symbolic link"):
        files.private_dir(str(tmp_path / "link"))
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with pytest.raises(files.UnsafePath, match="writable by other users"):
        files.private_dir(str(open_dir))
    (tmp_path / "file").write_text("")
    with pytest.raises(files.UnsafePath, match="not a directory"):
        files.private_dir(str(tmp_path / "file"))


def test_private_dir_mode_is_never_writable_by_others(tmp_path):
    assert os.stat(files.private_dir(str(tmp_path / "cache"), mode=0o755)).st_mode & 0o777 == 0o755
    assert os.stat(files.private_dir(str(tmp_path / "wide"), mode=0o777)).st_mode & 0o777 == 0o755


def test_unsafe_path_is_a_permission_error_naming_the_path(tmp_path):
    os.symlink(tmp_path, tmp_path / "link")
    with pytest.raises(PermissionError) as raised:
        files.private_dir(str(tmp_path / "link"))
    assert isinstance(raised.value, files.UnsafePath)
    assert raised.value.filename == str(tmp_path / "link") and raised.value.strerror == "is a symbolic link"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_private_paths_owned_by_someone_else_are_refused(tmp_path):
    other = tmp_path / "other"
    other.mkdir(0o700)
    os.chown(other, 4242, 4242)
    with pytest.raises(files.UnsafePath, match="owned by uid 4242"):
        files.private_dir(str(other))
    (tmp_path / "f").write_text("x")
    os.chown(tmp_path / "f", 4242, 4242)
    with pytest.raises(files.UnsafePath, match="owned by uid 4242"):
        files.open_private(str(tmp_path / "f"))


def test_allow_root_accepts_what_root_owns(monkeypatch):
    """A cache baked into an image is root's; the server runs as another user (uid 4242 here)."""
    monkeypatch.setattr(files.os, "geteuid", lambda: 4242)
    assert os.stat("/").st_uid == 0
    assert files.private_dir("/", allow_root=True) == "/"
    with pytest.raises(files.UnsafePath, match="owned by uid 0, not by this server's uid 4242"):
        files.private_dir("/")


def test_open_private_does_not_follow_symlinks(tmp_path):
    (tmp_path / "target").write_text("secret")
    os.symlink(tmp_path / "target", tmp_path / "link")
    with pytest.raises(OSError):
        files.open_private(str(tmp_path / "link"), os.O_RDWR | os.O_CREAT)
    assert (tmp_path / "target").read_text() == "secret"


def test_open_private_creates_0600_and_refuses_a_file_open_to_others(tmp_path):
    fd = files.open_private(str(tmp_path / "f"), os.O_RDWR | os.O_CREAT)
    try:
        assert os.fstat(fd).st_mode & 0o777 == 0o600
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        os.close(fd)
    os.chmod(tmp_path / "f", 0o646)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(files.UnsafePath, match="writable by other users"):
        files.open_private(str(tmp_path / "f"))
    assert set(os.listdir("/proc/self/fd")) == before, "the refused file's descriptor was left open"
    os.mkdir(tmp_path / "d", 0o700)
    with pytest.raises(files.UnsafePath, match="not a regular file"):
        files.open_private(str(tmp_path / "d"))


def test_flock_polled_waits_for_the_lock_without_blocking_other_greenlets(tmp_path):
    path = str(tmp_path / "lock")
    holder = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    waiter = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        got = gevent.spawn(files.flock_polled, waiter, poll=0.001)
        ran = gevent.spawn(lambda: "ran")
        assert ran.get(timeout=5) == "ran", "another greenlet ran while the lock was held"
        assert not got.ready()
        os.close(holder)  # the holder's process lets go
        holder = None
        got.get(timeout=5)
        other = os.open(path, os.O_RDWR)
        with pytest.raises(BlockingIOError):  # the waiter holds it now
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(other)
    finally:
        for fd in (holder, waiter):
            if fd is not None:
                os.close(fd)


def test_flock_polled_gives_up_at_the_deadline(tmp_path):
    path = str(tmp_path / "lock")
    holder = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    waiter = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(TimeoutError):
            files.flock_polled(waiter, deadline=time.monotonic(), poll=0.001)
        with pytest.raises(OSError):  # not a lock being held (a bad descriptor): raised at once
            files.flock_polled(1 << 20)
    finally:
        os.close(holder)
        os.close(waiter)


def test_stamp_changes_when_the_file_is_written_or_replaced(tmp_path):
    path = tmp_path / "f"
    path.write_text("a")
    first = files.stamp(str(path))
    assert files.stamp(str(path)) == first
    path.write_text("ab")  # a new size
    written = files.stamp(str(path))
    assert written != first
    (tmp_path / "g").write_text("ab")
    os.utime(tmp_path / "g", ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns))
    os.replace(tmp_path / "g", path)  # same size and mtime, another inode
    assert files.stamp(str(path)) != written
    with pytest.raises(FileNotFoundError):
        files.stamp(str(tmp_path / "missing"))


def test_low_on_space(tmp_path, monkeypatch):
    assert files.low_on_space(str(tmp_path)) is False  # a test machine has more than a MiB free
    usage = type(files.shutil.disk_usage(str(tmp_path)))
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - 1000, 1000))
    assert files.low_on_space(str(tmp_path)) is True
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):
        files.low_on_space(str(tmp_path / "missing"))


def test_remove_takes_files_and_trees_and_ignores_what_is_gone(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "g").write_text("y")
    (tmp_path / "kept").mkdir()
    os.symlink(tmp_path / "kept", tmp_path / "link")  # a link to a directory: the link goes, not the target
    files.remove(str(tmp_path / "f"), str(tmp_path / "d"), str(tmp_path / "link"), str(tmp_path / "missing"),
                 str(tmp_path / "f" / "under-a-file"))
    assert sorted(os.listdir(tmp_path)) == ["kept"]
