"""Each server owns its files and its bb processes.

- private_dir() and open_private() create or open paths only when they are ours:
  not a symlink, owned by this user (or root, for read-only caches baked into an
  image), not writable by group or others.
- lock_path() takes an flock on a lock file and re-checks, after taking it, that the
  path still names the locked inode: a lock on a file someone unlinked or replaced
  (e.g. the slot directory removed while a proof runs) is no lock at all.
  lock_slot() adds a name no file operation can free (an abstract Unix socket), so
  removing the slot directory under a running proof cannot free its slot either.
- ServerDir is one server's private work directory under TMPDIR, held by an flock
  for as long as any of the server's processes lives (gunicorn's workers inherit
  it); clean_stale() removes only the directories of servers that are gone.
- die_with_parent() runs in a child between fork and exec: the kernel kills it
  when the process that started it dies (Linux PR_SET_PDEATHSIG).
- become_subreaper() and kill_orphans() run in the gunicorn master: what a bb started
  before its worker was killed (PR_SET_PDEATHSIG reaches bb, not bb's children) is
  handed to the master, which kills it when it learns the worker died.
"""
import ctypes
import errno
import fcntl
import os
import hashlib
import shutil
import signal
import socket
import stat
import tempfile
import time

import gevent

RUN_PREFIX = "bb-worker-run-"
RUN_DIR_ENV = "BB_WORKER_RUN_DIR"  # gunicorn.conf.py names the server's run directory here for its workers
OWNER_LOCK = "owner.lock"
STALE_GRACE_SECONDS = 60.0  # a run dir without its lock file is removed only when older than this
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PR_SET_CHILD_SUBREAPER = 36


class UnsafePath(PermissionError):
    """A path we were to use is a symlink, someone else's, or open to other users."""

    def __init__(self, path, why):
        super().__init__(errno.EPERM, why, path)


def _check(path, st, kind, allow_root):
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

    allow_root: also accept a directory owned by root (a cache baked into an image).
    mode: for a directory others may read (a cache an image ships), 0755; never
    writable by others. Raises UnsafePath (a PermissionError) or another OSError.
    """
    try:
        os.mkdir(path, mode & 0o755)
    except FileExistsError:
        pass
    _check(path, os.lstat(path), stat.S_IFDIR, allow_root)
    return path


def open_private(path, flags=os.O_RDONLY, mode=0o600, allow_root=False):
    """os.open() `path` without following a symlink and check the file is ours; return the fd.

    flags: os.O_* flags (O_NOFOLLOW and O_CLOEXEC are added). Raises UnsafePath or OSError.
    """
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        _check(path, os.fstat(fd), stat.S_IFREG, allow_root)
    except BaseException:
        os.close(fd)
        raise
    return fd


def lock_path(path, blocking=False):
    """Open (creating, mode 0600) and flock `path` exclusively; return the fd, or None when busy.

    After the lock is taken the path must still name the same inode; if it was
    unlinked or replaced meanwhile (the directory removed and made again), the lock
    is dropped and taken again on the new file. Raises UnsafePath or OSError
    (FileNotFoundError when the directory is gone).
    """
    while True:
        fd = open_private(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        held = os.fstat(fd)
        try:
            now = os.lstat(path)
        except FileNotFoundError:
            now = None
        if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)  # we locked a file that is no longer at `path`: try the one that is


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


class HeldSlot:
    """A slot held by lock_slot(): the flock'ed file's descriptor and the bound socket.

    fds: both descriptors (a child that inherits them keeps the slot taken while it lives).
    """

    def __init__(self, fd, sock):
        self.fd = fd
        self.sock = sock
        self.fds = (fd, sock.fileno())

    def close(self):
        """Free the slot (idempotent)."""
        if self.sock is not None:
            os.close(self.fd)
            self.sock.close()
            self.sock = None


def lock_slot(path):
    """Take the slot whose lock file is `path`; return a HeldSlot, or None when it is taken.

    Two locks, both needed: an flock on the file (lock_path; shared by every process
    that sees the same file, across network namespaces too) and an abstract Unix
    socket bound to a name made from this user and the file's path, which exists
    while a holder keeps it open, whatever happens to the files: a slot directory
    removed and made again while a proof runs does not free that proof's slot.
    Raises UnsafePath or OSError like lock_path().
    """
    key = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:40]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(f"\0bb-worker-slot-{os.geteuid()}-{key}")
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            return None
        raise
    try:
        fd = lock_path(path)
    except BaseException:
        sock.close()
        raise
    if fd is None:
        sock.close()
        return None
    return HeldSlot(fd, sock)


# ---------------------------------------------------------------- per-server work directory

class ServerDir:
    """A server's private work directory `<parent>/bb-worker-run-<pid>-<random>/` (mode 0700).

    create() makes it and takes an flock on its owner.lock; the descriptor is
    inherited by forked workers, so the lock is held while any process of the
    server lives. worker_dir(pid) is one worker's subdirectory (remove_worker()
    removes it when the master sees the worker die).
    """

    def __init__(self, path, lock_fd):
        self.path = path
        self.lock_fd = lock_fd

    @classmethod
    def create(cls, parent):
        """Make a new run directory in `parent` (str, e.g. TMPDIR); return the ServerDir."""
        path = tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{os.getpid()}-", dir=parent)
        fd = lock_path(os.path.join(path, OWNER_LOCK))
        if fd is None:  # nobody else can know the new name yet
            raise OSError(errno.EAGAIN, "owner lock busy", path)
        return cls(path, fd)

    def worker_dir(self, pid=None):
        """Path (str) of worker `pid`'s private subdirectory (default: this process), created."""
        return private_dir(os.path.join(self.path, f"w{pid or os.getpid()}"))

    def remove_worker(self, pid):
        """Remove worker `pid`'s subdirectory and everything in it."""
        shutil.rmtree(os.path.join(self.path, f"w{pid}"), ignore_errors=True)

    def remove(self):
        """Remove the whole directory and drop the owner lock (at server exit)."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


def clean_stale(parent, keep=None, grace=STALE_GRACE_SECONDS):
    """Remove the run directories in `parent` of servers that are gone; return the paths removed.

    A directory is stale when its owner.lock is free (no process of its server
    lives), or it has no owner.lock and is older than `grace` seconds (a server
    killed while creating it). Only this user's directories are looked at, never
    through a symlink; `keep` (a path) is skipped.
    """
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(RUN_PREFIX) or entry.path == keep:
            continue
        try:
            _check(entry.path, os.lstat(entry.path), stat.S_IFDIR, allow_root=False)
            fd = os.open(os.path.join(entry.path, OWNER_LOCK), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            try:
                if time.time() - os.lstat(entry.path).st_mtime > grace:
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed.append(entry.path)
            except OSError:
                pass
            continue
        except OSError:  # someone else's, a symlink, unreadable: not ours to remove
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # its server is alive
            continue
        try:
            shutil.rmtree(entry.path, ignore_errors=True)  # under the lock: a dead server's
            removed.append(entry.path)
        finally:
            os.close(fd)
    return removed


# ---------------------------------------------------------------- child processes

_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(parent_pid, sig=signal.SIGKILL):
    """In a child after fork: ask the kernel to send `sig` when the parent dies.

    parent_pid: the pid of the process that forked (read before the fork). If it
    died already, the child kills itself with `sig` now. The signal fires when the
    parent *thread* exits: call it from a fork made on a thread that lives as long
    as the process (a gevent worker has one). Raises OSError if prctl fails.
    """
    if _libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)


def become_subreaper():
    """Make this process inherit the orphans of its descendants instead of PID 1 (Linux
    PR_SET_CHILD_SUBREAPER), for kill_orphans(). Returns False where the kernel refuses.
    A server run as PID 1 (a container without an init) inherits them anyway."""
    return _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def kill_orphans():
    """SIGKILL the process groups of this process's children that are not in its own group.

    In the gunicorn master those are bb runs, or processes a bb started, whose worker died
    (bb runs in a process group of its own; the workers stay in the master's): a worker
    reaps its own bb. Returns the pids found (list of int); gunicorn reaps them.
    """
    me, ours = os.getpid(), os.getpgrp()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # state, ppid, pgrp, ... (proc(5))
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me and int(fields[2]) != ours:
            try:
                os.killpg(int(fields[2]), signal.SIGKILL)
            except OSError:
                pass
            found.append(int(entry))
    return found
