"""Files that are ours: the helpers every layer uses to make, open, lock and remove them.

private_dir() and open_private() create or open paths only when they are ours: not a
symlink, owned by this user (or root, for read-only caches baked into an image), not
writable by group or others. flock_polled() waits for a lock without blocking a gevent
worker. stamp() tells when a file changed; low_on_space() when its file system is full.
"""
import errno
import fcntl
import os
import shutil
import stat
import time

import gevent

LOW_SPACE_BYTES = 1 << 20  # a file system with less free than this is full (bb's writes fail unchecked)


class UnsafePath(PermissionError):
    """A path we were to use is a symlink, someone else's, or open to other users."""

    def __init__(self, path, why):
        super().__init__(errno.EPERM, why, path)


def check_ours(path, st, kind, allow_root=False):
    """Raise UnsafePath unless `st` (an lstat/fstat of `path`) is a `kind` (stat.S_IFDIR or
    S_IFREG) owned by this user (or root with `allow_root`) and not writable by others."""
    owners = (os.geteuid(), 0) if allow_root else (os.geteuid(),)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(path, "is a symbolic link")
    if stat.S_IFMT(st.st_mode) != kind:
        raise UnsafePath(path, "is not a directory" if kind == stat.S_IFDIR else "is not a regular file")
    if st.st_uid not in owners:
        raise UnsafePath(path, f"is owned by uid {st.st_uid}, not by this server's uid {os.geteuid()}")
    if st.st_mode & 0o022:
        raise UnsafePath(path, f"is writable by other users (mode {stat.S_IMODE(st.st_mode):04o})")


def private_dir(path, allow_root=False, mode=0o700):
    """Create `path` (with `mode`, 0700 by default) or accept it as it is if it is safely ours; return `path`.

    allow_root: also accept a directory owned by root (a cache baked into an image). mode:
    0755 for a directory others may read (a cache an image ships); never writable by others.
    Raises UnsafePath (a PermissionError) or another OSError.
    """
    try:
        os.mkdir(path, mode & 0o755)
    except FileExistsError:
        pass
    check_ours(path, os.lstat(path), stat.S_IFDIR, allow_root)
    return path


def open_private(path, flags=os.O_RDONLY, mode=0o600, allow_root=False):
    """os.open() `path` without following a symlink and check the file is ours; return the fd.

    flags: os.O_* flags (O_NOFOLLOW and O_CLOEXEC are added). Raises UnsafePath or OSError.
    """
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        check_ours(path, os.fstat(fd), stat.S_IFREG, allow_root)
    except BaseException:
        os.close(fd)
        raise
    return fd


def flock_polled(fd, deadline=None, poll=0.05):
    """Take an exclusive flock on `fd`, polling (gevent.sleep(`poll` seconds) between tries) so
    a gevent worker keeps serving while another process holds it.

    deadline: a time.monotonic() value after which TimeoutError is raised (None: no limit).
    Raises OSError for a failure other than the lock being held.
    """
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError("the lock stayed held by another process")
        gevent.sleep(poll)


def stamp(path):
    """(inode, size, mtime in ns) of `path`: it changes when the file is replaced or written.
    Raises OSError."""
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def low_on_space(path):
    """True when the file system of `path` has less than LOW_SPACE_BYTES free; raises OSError."""
    return shutil.disk_usage(path).free < LOW_SPACE_BYTES


def remove(*paths):
    """Remove files and directory trees, ignoring those already gone."""
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except (FileNotFoundError, NotADirectoryError):
                pass
