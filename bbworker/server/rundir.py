"""Each server's private run directory under TMPDIR, and the clean-up of servers that are gone.

ServerDir is `<TMPDIR>/bb-worker-run-<pid>-<random>/` (mode 0700), held by an flock on its
owner.lock for as long as any of the server's processes lives (the workers inherit the
descriptor); each worker keeps its requests' files in `w<pid>/` inside it. clean_stale()
removes only the directories of servers that are gone (killed with SIGKILL, say).
"""
import atexit
import fcntl
import os
import shutil
import stat
import tempfile
import time

from bbworker import files

RUN_PREFIX = "bb-worker-run-"
RUN_DIR_ENV = "BB_WORKER_RUN_DIR"  # the master names the server's run directory here for its workers
OWNER_LOCK = "owner.lock"
RELOADED = "reloaded"  # written by the master when gunicorn reloads (SIGHUP): its mtime says when
STALE_GRACE_SECONDS = 60.0  # a run dir without its lock file is removed only when older than this


class ServerDir:
    """A server's private work directory, held by the flock on `lock_fd` (see the module)."""

    def __init__(self, path, lock_fd):
        self.path = path
        self.lock_fd = lock_fd

    @classmethod
    def create(cls, parent):
        """Make a new run directory in `parent` (str, e.g. TMPDIR); return the ServerDir. Raises OSError."""
        path = tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{os.getpid()}-", dir=parent)
        fd = files.open_private(os.path.join(path, OWNER_LOCK), os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else can know the new name yet
        except OSError:
            os.close(fd)
            raise
        return cls(path, fd)

    def worker_path(self, pid):
        """Path (str) of worker `pid`'s subdirectory (made by the worker when it needs it)."""
        return os.path.join(self.path, f"w{pid}")

    def remove_worker(self, pid):
        """Remove worker `pid`'s subdirectory and everything in it."""
        shutil.rmtree(self.worker_path(pid), ignore_errors=True)

    def remove(self):
        """Remove the whole directory and drop the owner lock (at server exit); idempotent."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


def clean_stale(parent, grace=STALE_GRACE_SECONDS):
    """Remove the run directories in `parent` of servers that are gone; return the paths removed.

    A directory is stale when its owner.lock is free (no process of its server lives), or it
    has no owner.lock and is older than `grace` seconds (a server killed while creating it).
    Only this user's directories are looked at, never through a symlink.
    """
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(RUN_PREFIX):
            continue
        try:
            files.check_ours(entry.path, os.lstat(entry.path), stat.S_IFDIR)
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


def mark_reload(run_dir):
    """In the master, as gunicorn reloads (its on_reload hook): note the time in `run_dir` (a ServerDir)."""
    path = os.path.join(run_dir.path, RELOADED)
    with open(path, "w") as f:
        f.write(f"{time.time()}\n")


def reloaded_since(when):
    """True when the server's master started a reload after `when` (time.time() seconds): a worker
    told to stop then is being replaced, not the server stopped. False outside gunicorn."""
    run_dir = os.environ.get(RUN_DIR_ENV)
    try:
        return bool(run_dir) and os.stat(os.path.join(run_dir, RELOADED)).st_mtime >= when
    except OSError:
        return False


class WorkerDir:
    """This worker's private directory for request files (`path`, str): `w<pid>` in the server's
    run directory, which the master names in the environment (RUN_DIR_ENV).

    A process started outside gunicorn makes a run directory of its own in `tmpdir` when the
    path is first asked for, removed at exit. `path` given: that directory instead. The
    directory itself is made by whoever writes into it (files.private_dir).
    """

    def __init__(self, tmpdir, path=None):
        self.tmpdir = tmpdir
        self._path = path

    @property
    def path(self):
        if self._path is None:
            run_dir = os.environ.get(RUN_DIR_ENV)
            if not run_dir:
                own = ServerDir.create(self.tmpdir)
                atexit.register(own.remove)
                run_dir = own.path
            self._path = os.path.join(run_dir, f"w{os.getpid()}")
        return self._path
