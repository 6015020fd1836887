"""bb-worker's gunicorn hooks: the master's files and checks, and each worker's start.

gunicorn.conf.py makes a Hooks from the settings and hands its methods to gunicorn. gunicorn
re-reads that file on SIGHUP, which makes a new Hooks: what the master keeps from one hook to
the next (its run directory, its metrics directory lock) lives on gunicorn's Arbiter, the
`server` every master hook gets, which outlives the re-read.
"""
import atexit
import fcntl
import glob
import os
import shutil
import sys
import tempfile

from bbworker import bbrunner
from bbworker.server import connection, rundir, scheduler

STATE = "bb_worker"  # the Arbiter attribute holding the master's Master


class Master:
    """What the master keeps while it runs: `run_dir` (a rundir.ServerDir), `metrics_fd` (the
    lock on a given PROMETHEUS_MULTIPROC_DIR), `metrics_dir` (one made here), `pid`."""

    def __init__(self):
        self.pid = os.getpid()
        self.run_dir = None
        self.metrics_fd = None
        self.metrics_dir = None

    def remove(self):
        """Remove this server's run directory and its own metrics directory (master only; idempotent).

        Registered with atexit as well as called from on_exit: gunicorn exits without on_exit
        when it cannot bind its port or a hook stops it.
        """
        if os.getpid() != self.pid:  # forked workers inherit the atexit registration
            return
        if self.run_dir is not None:
            self.run_dir.remove()
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)


class Hooks:
    """gunicorn's server hooks for a server with these `settings` (bbworker.settings.Settings)."""

    pre_request = staticmethod(connection.pre_request)
    post_request = staticmethod(connection.post_request)

    def __init__(self, settings):
        self.settings = settings

    def on_starting(self, server):
        """In the master, before any worker: its run directory, stale files, metrics; the VK cache.

        The VKs are not computed here: workers compute them after the port is open, and
        /api/health answers 503 "starting" meanwhile. A setting found unusable here stops the
        server with a message naming the variable; so does gunicorn's max_requests (_refuse_max_requests).
        """
        _refuse_max_requests(getattr(server, "cfg", None))
        s = self.settings
        master = Master()
        setattr(server, STATE, master)
        atexit.register(master.remove)
        # Metrics: with several workers, prometheus_client's multiprocess mode; its files live in
        # RAM (/dev/shm), never in TMPDIR: a full TMPDIR would SIGBUS a worker writing a page.
        if s.prometheus_multiproc_dir:  # given: ours alone while we run, emptied at start
            try:
                master.metrics_fd = os.open(os.path.join(s.prometheus_multiproc_dir, ".bb-worker.lock"),
                                            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
                try:
                    fcntl.flock(master.metrics_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    sys.exit(f"bb-worker: bad configuration: PROMETHEUS_MULTIPROC_DIR="
                             f"{s.prometheus_multiproc_dir!r} is in use by another running server")
                for path in glob.glob(os.path.join(s.prometheus_multiproc_dir, "*.db")):
                    os.unlink(path)
            except OSError as exc:
                _bad_configuration("PROMETHEUS_MULTIPROC_DIR", s.prometheus_multiproc_dir, exc)
        elif s.web_concurrency > 1:
            try:
                master.metrics_dir = tempfile.mkdtemp(prefix="bb-worker-metrics-", dir=s.shm_dir)
            except OSError as exc:  # no variable of ours names /dev/shm: say which one avoids it
                _bad_configuration("WEB_CONCURRENCY", str(s.web_concurrency),
                                   f"cannot make a metrics directory in {s.shm_dir or s.tmpdir}: "
                                   f"{exc.strerror} (set PROMETHEUS_MULTIPROC_DIR)")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = master.metrics_dir
        # Files: a private run directory per server, held by a lock its workers inherit; the
        # directories of servers that are gone (SIGKILLed) are removed, never a live one's.
        try:
            for path in rundir.clean_stale(s.tmpdir):
                server.log.info("removed %s, left by a server that is gone", path)
            master.run_dir = rundir.ServerDir.create(s.tmpdir)
        except OSError as exc:
            _bad_configuration("TMPDIR", s.tmpdir, exc)
        os.environ[rundir.RUN_DIR_ENV] = master.run_dir.path
        self._check_vk_cache(server)

    def _check_vk_cache(self, server):
        """Stop the server when a VK can be neither found nor stored: it would stay unready for good.

        bb runs (`bb --version`, for the cache's key) only when the cache is not writable: it may
        take seconds, and the port opens after this hook.
        """
        s = self.settings
        cache = s.vk_cache_dir
        creatable = os.path.isdir(cache) or os.access(os.path.dirname(cache), os.W_OK | os.X_OK)
        if creatable and (not os.path.isdir(cache) or os.access(cache, os.W_OK | os.X_OK)):
            if not os.access(s.bb_binary, os.X_OK):
                server.log.warning("bb is not available (%s: not an executable file): /api/health answers 503",
                                   s.bb_binary)
            return
        bb = bbrunner.BB(s.bb_binary, s.bb_crs_path, verifier_target=s.verifier_target)
        status = bb.status()
        if not status.available:
            server.log.warning("bb is not available (%s): /api/health answers 503", status.detail)
            return
        for name, path in s.circuits.items():
            if not bbrunner.Circuit(bb, path, cache).vk.cached():
                sys.exit(f"bb-worker: bad configuration: VK_CACHE_DIR={cache!r} is not writable and holds no VK "
                         f"for circuit {name} (bb {status.version}, VERIFIER_TARGET={s.verifier_target or ''}): "
                         "make it writable or bake the VK in (scripts/precompute_vk.py)")

    def on_reload(self, server):
        """In the master, on SIGHUP: mark the reload, so the workers it replaces stay ready while
        they finish (a SIGTERM to them is no stop of the server)."""
        master = getattr(server, STATE, None)
        if master is not None and master.run_dir is not None:
            try:
                rundir.mark_reload(master.run_dir)
            except OSError as exc:
                server.log.warning("cannot mark the reload in %s: %s", master.run_dir.path, exc)

    def post_fork(self, server, worker):
        """In each worker, before it loads the app: the settings the worker class reads."""
        worker.header_timeout = self.settings.header_timeout_seconds

    def post_worker_init(self, worker):
        """In each worker, once the app is loaded: compute missing VKs in the background."""
        worker.wsgi.start()

    def child_exit(self, server, worker):
        """In the master, for a worker that exited: its live metrics, its scheduler files, its request files."""
        # Imported here, never before on_starting: prometheus_client picks its multiprocess mode when it
        # is first imported, from PROMETHEUS_MULTIPROC_DIR, which on_starting sets for the workers.
        from bbworker.server import metrics

        metrics.worker_exited(worker.pid)
        scheduler.forget_process(self.settings.slots_dir, worker.pid)
        master = getattr(server, STATE, None)
        if master is not None and master.run_dir is not None:  # a worker killed mid-proof leaves its witness
            master.run_dir.remove_worker(worker.pid)

    def on_exit(self, server):
        """Remove this server's run directory and multiprocess metrics files."""
        master = getattr(server, STATE, None)
        if master is not None:
            master.remove()


def _refuse_max_requests(cfg):
    """Stop the master when gunicorn's max_requests is set (gunicorn's `cfg`; None: nothing to check).

    A worker that reaches it stops accepting and the master starts the next one only once it
    has exited, after its last connection ended: an idle keep-alive connection holds it up to
    KEEPALIVE_SECONDS, a proof up to the prove timeout, with no worker serving meanwhile.
    """
    limit = getattr(cfg, "max_requests", 0) or 0
    if limit > 0:
        sys.exit(f"bb-worker: bad configuration: max_requests={limit} (--max-requests): a worker that reaches "
                 "it stops accepting until its last connection ends (an idle keep-alive connection: up to "
                 "KEEPALIVE_SECONDS) and no worker serves meanwhile; leave it unset (replace workers with "
                 "`kill -HUP <master>` instead)")


def _bad_configuration(variable, value, exc):
    """Stop the master with a message naming `variable` for an OSError met while checking it."""
    sys.exit(f"bb-worker: bad configuration: {variable}={value!r}: {getattr(exc, 'strerror', None) or exc}")
