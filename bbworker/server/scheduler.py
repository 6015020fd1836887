"""Proof scheduling: how many bb run at once, and with how many threads each.

bb's threads scale poorly (bench/RESULTS.md): on 2 cores two proofs with one thread each
give 1.13x (2^18 rows) to 1.3x (2^12 rows) the throughput of one proof with two threads,
while a lone proof finishes fastest with every core. So the scheduler gives a request
that finds nobody waiting all the cores, and splits the cores when requests queue:

- a proof starts when fewer than `cap` run, at least one core is free (cores minus the
  threads of the running bb), and the peak RSS of the running bb plus its own stays
  within the memory budget (a lone proof always starts);
- it gets the free cores divided among the requests that could start now
  (`free // min(waiting, room)`, at least 1), and keeps them until bb exits (bb reads
  `HARDWARE_CONCURRENCY` once, at start);
- a request that finds the cores taken waits, even by a lone proof holding every core:
  starting it on top would oversubscribe the cores and slow the running proof. When
  that proof ends, the waiting requests start together with the cores split.
- until a circuit's peak RSS is known (measured on its first proof, or its VK
  computation), its proofs run only when nothing else does.

The decision is `plan()`, a pure function. `Scheduler` applies it across every process
sharing one directory: each running proof holds `slot-<i>.lock` (lock_slot: an flock and
an abstract socket, both inherited by bb) and writes its threads and peak bytes there; each process keeps its count of waiting requests in
`waiting-<pid>-<id>`, flocked for the life of the process; peaks per circuit live in
`peak-<key>`; `state.lock` serialises decisions. The kernel drops a dead process's
locks, so a killed worker leaks neither a slot nor a waiter.
"""
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import resource
import socket
import time
from collections import deque, namedtuple

from gevent.event import Event

from bbworker import files

Running = namedtuple("Running", "threads peak_bytes started pid", defaults=(None, None))
Running.__doc__ = """One running bb: its thread count, its circuit's peak RSS in bytes (0 = unknown), and
when (time.time()) and by which process its slot was taken (None when not known)."""
WAITING_PREFIX = "waiting-"  # waiting-<pid>-<id>: one process's count of waiting requests


def waiting_prefix(pid):
    """The start of the names of process `pid`'s waiting files (str)."""
    return f"{WAITING_PREFIX}{pid}-"


def forget_process(state_dir, pid):
    """Remove the waiting-<pid>-* files of process `pid`, which has exited (the master's
    child_exit hook). Others would remove them at their next look (Scheduler._waiting);
    this leaves nothing behind once the server has stopped."""
    try:
        names = os.listdir(state_dir)
    except OSError:
        return
    for name in names:
        if name.startswith(waiting_prefix(pid)):
            try:
                os.unlink(os.path.join(state_dir, name))
            except OSError:
                pass


class Grant(namedtuple("Grant", "slot threads")):
    """A started proof: `slot` a HeldSlot (release() closes it); `threads` for bb."""

    @property
    def fds(self):
        """The slot's lock descriptors (tuple): bb inherits them, so the slot stays taken while it lives."""
        return self.slot.fds


class SlotTimeout(Exception):
    """No proof slot became free in time."""


def plan(cores, cap, budget_bytes, running, waiting, peak_bytes):
    """Threads (int) to start one more proof with now, or 0 to keep waiting.

    cores: threads all bb together may use (>= 1). cap: bb at once at most (>= 1).
    budget_bytes: what the peak RSS of all running bb together may reach.
    running: list of Running. waiting: requests that wait for a slot, this one included (>= 1).
    peak_bytes: this proof's expected peak RSS (bytes), or 0/None when not yet measured.
    """
    waiting = max(1, waiting)
    if not running:
        if not peak_bytes:
            return cores  # learn the peak on a lone proof
        room = min(cap, cores, max(1, budget_bytes // peak_bytes))
        return max(1, cores // min(waiting, room))
    if not peak_bytes or any(not r.peak_bytes for r in running):
        return 0
    free = cores - sum(r.threads for r in running)
    used = sum(r.peak_bytes for r in running)
    room = min(cap - len(running), (budget_bytes - used) // peak_bytes)
    if free < 1 or room < 1:
        return 0
    return max(1, free // min(waiting, room))


def reaped_peak_bytes():
    """Peak RSS (bytes) of the largest child this process has reaped so far (getrusage)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


# ---------------------------------------------------------------- shared state

class Scheduler:
    """At most `cap` proofs at once across every process sharing `state_dir`, cores split by plan().

    cores: threads all bb together may use. cap: bb at once at most (1 keeps one proof at a
    time with every core). budget_bytes: peak RSS all running bb together may reach.
    Within a process waiters line up first come, first served (only the oldest polls the
    shared state, every `poll` seconds, or at once when a proof of this process ends);
    across processes the heads of the lines compete. lease: seconds past which a held slot
    can only be a leak (longer than any proof's deadlines); problems() reports such slots and
    frees this process's own.
    """

    def __init__(self, state_dir, cores, cap, budget_bytes, poll=0.02, lease=None):
        self.state_dir = state_dir  # created on first use
        self.cores = cores
        self.cap = min(cap, cores)
        self.budget_bytes = budget_bytes
        self.poll = poll
        self.lease = lease
        self.paths = [os.path.join(state_dir, f"slot-{i}.lock") for i in range(self.cap)]
        self._line = deque()  # gevent Events of this process's waiters, oldest first
        self._freed = Event()
        self._waiting_fd = None
        self._waiting_pid = None
        self._granted = {}  # this process's HeldSlots handed out -> time.monotonic() they were

    def take(self, timeout, peak_key=None):
        """Wait up to `timeout` seconds for a slot; return a Grant (threads for bb).

        peak_key: the circuit's key for peak_bytes()/record_peak() (None: unknown peak).
        Raises SlotTimeout when none frees up in time, OSError when the state dir fails.
        """
        deadline = time.monotonic() + timeout
        turn = Event()
        self._line.append(turn)
        self._publish_waiting()
        if self._line[0] is turn:
            turn.set()
        try:
            if not turn.wait(timeout):
                raise SlotTimeout(f"no proof slot free within {timeout:g} s")
            while True:
                grant = self._try_start(peak_key)
                if grant:
                    return grant
                if time.monotonic() >= deadline:
                    raise SlotTimeout(f"no proof slot free within {timeout:g} s")
                self._freed.clear()
                self._freed.wait(min(self.poll, max(0.0, deadline - time.monotonic())))
        finally:  # leave the line (served, timed out or killed); the next in line goes on
            was_head = self._line[0] is turn
            self._line.remove(turn)
            self._publish_waiting()
            if was_head and self._line:
                self._line[0].set()

    def release(self, grant):
        """End the proof that take() started (closing the slot's descriptors frees it)."""
        self._granted.pop(grant.slot, None)
        grant.slot.close()
        self._freed.set()

    def problems(self):
        """Why no proof slot can be taken (list of str; readiness reports them): the slot files are
        unusable (someone else's, open to others), or slots are held, in any process, for longer
        than the lease. This process's own such slots, which only a leak can hold, are freed (logged)."""
        now = time.monotonic()
        for held, since in list(self._granted.items()):
            if self.lease is not None and now - since > self.lease:
                logging.getLogger("bb_worker").error("a proof slot was held for %.0f s, past any proof's "
                                                     "deadlines: freed", now - since)
                self.release(Grant(held, 0))
        try:
            with self._state_lock(), _FreeSlots() as free:
                running = self._scan(free)
        except OSError as exc:
            return [f"proof slots unusable: {exc.filename or self.state_dir}: {exc.strerror}"]
        return [f"proof slot held for {time.time() - r.started:.0f} s by process {r.pid}, past any proof's "
                "deadlines: proving is wedged" for r in running
                if self.lease is not None and r.started and time.time() - r.started > self.lease]

    # -- peaks per circuit

    def peak_bytes(self, key):
        """The largest peak RSS (bytes) recorded for circuit `key`, 0 when none."""
        if key is None:
            return 0
        try:
            with open(os.path.join(self.state_dir, f"peak-{key}")) as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def record_peak(self, key, nbytes):
        """Remember that a bb run for circuit `key` peaked at `nbytes` (kept if above the record)."""
        if key is None or nbytes <= self.peak_bytes(key):
            return
        with self._state_lock():
            if nbytes > self.peak_bytes(key):
                path = os.path.join(self.state_dir, f"peak-{key}")
                with open(f"{path}.{os.getpid()}", "w") as f:
                    f.write(f"{nbytes}\n")
                os.replace(f"{path}.{os.getpid()}", path)

    # -- what runs and waits now, across processes

    def _try_start(self, peak_key):
        with self._state_lock(), _FreeSlots() as free:
            running = self._scan(free)
            peak = self.peak_bytes(peak_key)
            threads = plan(self.cores, self.cap, self.budget_bytes, running, self._waiting(), peak) \
                if free.slots else 0
            if not threads:
                return None
            held = free.slots[0]  # still freed by the `with` if writing its file fails
            os.ftruncate(held.fd, 0)
            os.pwrite(held.fd, f"{threads} {peak} {time.time():.3f} {os.getpid()}\n".encode(), 0)
            free.take()
            self._granted[held] = time.monotonic()
            return Grant(held, threads)

    def _scan(self, free):
        """The running proofs (list of Running); the free slots are taken into `free` (a
        _FreeSlots, which frees them again whatever is raised). A slot file says its
        holder's threads, peak bytes, start time and pid."""
        running = []
        for path in self.paths:
            held = lock_slot(path)
            if held is not None:
                free.slots.append(held)
                continue
            try:
                fd = files.open_private(path)
                try:
                    fields = os.pread(fd, 128, 0).split()
                finally:
                    os.close(fd)
                running.append(Running(int(fields[0]), int(fields[1]), float(fields[2]), int(fields[3])))
            except (OSError, ValueError, IndexError):  # not written yet, or a holder from before this scheduler
                running.append(Running(self.cores, 0))
        return running

    def _waiting(self):
        """Requests waiting in every process (int); removes the files of dead processes.

        This process's own count is len(self._line), whether or not its file is still there."""
        total = len(self._line)
        for name in os.listdir(self.state_dir):
            if not name.startswith(WAITING_PREFIX) or name == self._waiting_name():
                continue
            path = os.path.join(self.state_dir, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:  # its process is alive
                    try:
                        total += int(os.pread(fd, 32, 0).split()[0])
                    except (ValueError, IndexError):
                        pass
                    continue
                os.unlink(path)  # nobody holds it: its process is gone
            finally:
                os.close(fd)
        return total

    def _publish_waiting(self):
        """Write this process's count of waiting requests to its waiting-<pid>-<id> file."""
        try:
            if self._waiting_pid != os.getpid():  # first use, or a forked child
                files.private_dir(self.state_dir)
                fd = os.open(os.path.join(self.state_dir, self._waiting_name()),
                             os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held for the life of the process
                except OSError:
                    os.close(fd)
                    raise
                self._waiting_fd, self._waiting_pid = fd, os.getpid()
            os.pwrite(self._waiting_fd, f"{len(self._line):10d}\n".encode(), 0)
        except OSError:
            pass  # other processes then see this one's waiters as none: a fairness loss only

    def _waiting_name(self):
        return f"{waiting_prefix(os.getpid())}{id(self):x}"

    @contextlib.contextmanager
    def _state_lock(self):
        """Hold state.lock (made with the directory when missing): one decision at a time."""
        files.private_dir(self.state_dir)
        fd = os.open(os.path.join(self.state_dir, "state.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            files.flock_polled(fd, poll=0.001)  # held for microseconds by another process's decision
            yield
        finally:  # an error, or a gevent kill (ClientGone) while waiting: no fd leaks
            os.close(fd)


# ---------------------------------------------------------------- slot locks

class _FreeSlots:
    """The free slots one scan took (`slots`, HeldSlots): all freed when the `with` ends,
    on every path, but the one take() handed out."""

    def __init__(self):
        self.slots = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for held in self.slots:
            held.close()

    def take(self):
        return self.slots.pop(0)


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


def lock_path(path):
    """Open (creating, mode 0600) and flock `path` exclusively; return the fd, or None when busy.

    After the lock is taken the path must still name the same inode; if it was unlinked or
    replaced meanwhile (the directory removed and made again), the lock is dropped and taken
    again on the new file. Raises UnsafePath or OSError (FileNotFoundError when the directory
    is gone).
    """
    while True:
        fd = files.open_private(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
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
