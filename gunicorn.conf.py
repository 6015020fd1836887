"""gunicorn configuration for bb-worker: gevent workers, timeouts tied to the prove timeout.

Run: gunicorn -c gunicorn.conf.py  (every value comes from settings.py / the environment).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import settings
except ValueError as exc:  # settings.ConfigError: a bad environment variable
    sys.exit(f"bb-worker: bad configuration: {exc}")

# ---------------------------------------------------------------- app and socket
wsgi_app = "app:application"
chdir = settings.APP_DIR
bind = [f"0.0.0.0:{settings.PORT}"]

# ---------------------------------------------------------------- workers
# bb does the heavy work in its own process; a gevent worker only streams bodies
# and waits, so one process serves many connections. MAX_CONCURRENT_PROOFS (not
# the worker count) bounds how many bb processes run at once.
# connection.GeventWorker: gunicorn's gevent worker, plus a deadline for request heads.
worker_class = "connection.GeventWorker"
workers = settings.WEB_CONCURRENCY
worker_connections = 1000  # gunicorn's default; idle connections cost a greenlet and a socket
worker_tmp_dir = settings.SHM_DIR
control_socket_disable = True  # no runtime control socket: nothing to manage, less to expose

# ---------------------------------------------------------------- timeouts
# For gevent workers `timeout` is a heartbeat: the worker notifies the master from
# its own greenlet while bb runs, so a long proof never trips it. The prove
# deadline is ours (PROVE_TIMEOUT_SECONDS). On SIGTERM the worker stops accepting
# and lets in-flight proofs finish: graceful_timeout covers a full queue wait
# plus a full proof. An orchestrator's stop grace period must exceed it.
timeout = 30
graceful_timeout = int(settings.QUEUE_TIMEOUT_SECONDS + settings.PROVE_TIMEOUT_SECONDS) + 10
keepalive = settings.KEEPALIVE_SECONDS  # above load balancers' idle timeouts (settings.py)
forwarded_allow_ips = settings.FORWARDED_ALLOW_IPS  # whose X-Forwarded-For the access log believes
# A request line and headers must arrive within HEADER_TIMEOUT_SECONDS once begun (a
# trickling client is dropped without a reply); the body is body.read_body's.
import connection  # noqa: E402

connection.GeventWorker.header_timeout = settings.HEADER_TIMEOUT_SECONDS

# ---------------------------------------------------------------- logging
# app.py writes one access line per request (id, status, bytes in, ms) to the
# "bb_worker.access" logger; gunicorn's own access log would repeat it.
accesslog = None
errorlog = "-"
loglevel = settings.LOG_LEVEL
_STDERR = {"class": "logging.StreamHandler", "formatter": "generic", "stream": "ext://sys.stderr"}
logconfig_dict = {  # gunicorn's defaults, plus the app's "bb_worker" loggers on stderr
    "version": 1,
    "disable_existing_loggers": False,
    "root": {"level": settings.LOG_LEVEL.upper(), "handlers": ["console"]},
    "loggers": {
        "gunicorn.error": {"level": settings.LOG_LEVEL.upper(), "handlers": ["error_console"], "propagate": False,
                           "qualname": "gunicorn.error"},
        "bb_worker": {"level": settings.LOG_LEVEL.upper(), "handlers": ["console"], "propagate": False},
    },
    "handlers": {"console": _STDERR, "error_console": _STDERR},
    "formatters": {"generic": {"format": "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s",
                               "datefmt": "[%Y-%m-%d %H:%M:%S %z]"}},
}
if settings.LOG_FORMAT == "json":  # LOG_FORMAT=json: one JSON object per line, access and error logs
    from jsonlog import JsonFormatter as _JsonFormatter

    logconfig_dict["formatters"]["generic"] = {"()": _JsonFormatter}


# ---------------------------------------------------------------- hooks
# The master never imports app.py (no preload: HUP reloads the code); workers do.

# gunicorn sends "100 Continue" before the app runs and drains a body the app refused:
# connection.py holds the first back until the body is read, and closes instead.
pre_request = connection.pre_request
post_request = connection.post_request

_run_dir = None  # this server's ownership.ServerDir (master)
_metrics_lock = None  # descriptor holding PROMETHEUS_MULTIPROC_DIR for this server
_master_pid = None


def _bad_configuration(variable, value, exc):
    """Stop the master with a message naming `variable` for an OSError met while checking it."""
    sys.exit(f"bb-worker: bad configuration: {variable}={value!r}: {getattr(exc, 'strerror', None) or exc}")


def _remove_ours():
    """Remove this server's run directory and its own metrics directory (master only; idempotent).

    Registered with atexit as well as called from on_exit: gunicorn exits without
    on_exit when it cannot bind its port or a hook stops it.
    """
    if os.getpid() != _master_pid:  # forked workers inherit the atexit registration
        return
    import shutil

    if _run_dir is not None:
        _run_dir.remove()
    if os.path.basename(os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")).startswith("bb-worker-metrics-"):
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


def on_starting(server):
    """In the master, before any worker: this server's run directory, stale files, metrics.

    The VKs are not computed here: workers compute them after the port is open
    (app.App.start), and /api/health answers 503 "starting" meanwhile. Any OSError
    met here stops the server with a message naming the variable at fault.
    """
    global _run_dir, _metrics_lock, _master_pid
    import atexit
    import fcntl
    import glob
    import tempfile

    import ownership

    _master_pid = os.getpid()
    atexit.register(_remove_ours)
    ownership.become_subreaper()  # child_exit kills what a killed worker's bb left (kill_orphans)
    # Metrics: with one worker prometheus_client's in-process registry is exact. With
    # several, its multiprocess mode: each worker writes samples to mmap'ed files that
    # /api/metrics merges. They live in RAM (/dev/shm) in a directory of this server's
    # own, never in TMPDIR: a full TMPDIR would SIGBUS a worker writing an mmap'ed page.
    if settings.PROMETHEUS_MULTIPROC_DIR:  # given: ours alone while we run, emptied at start
        try:
            _metrics_lock = os.open(os.path.join(settings.PROMETHEUS_MULTIPROC_DIR, ".bb-worker.lock"),
                                    os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(_metrics_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                sys.exit(f"bb-worker: bad configuration: PROMETHEUS_MULTIPROC_DIR="
                         f"{settings.PROMETHEUS_MULTIPROC_DIR!r} is in use by another running server")
            for path in glob.glob(os.path.join(settings.PROMETHEUS_MULTIPROC_DIR, "*.db")):
                os.unlink(path)
        except OSError as exc:
            _bad_configuration("PROMETHEUS_MULTIPROC_DIR", settings.PROMETHEUS_MULTIPROC_DIR, exc)
    elif settings.WEB_CONCURRENCY > 1:
        try:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="bb-worker-metrics-",
                                                                      dir=settings.SHM_DIR)
        except OSError as exc:  # no variable of ours names SHM_DIR: say which one avoids it
            _bad_configuration("WEB_CONCURRENCY", str(settings.WEB_CONCURRENCY),
                               f"cannot make a metrics directory in {settings.SHM_DIR or settings.TMPDIR}: "
                               f"{exc.strerror} (set PROMETHEUS_MULTIPROC_DIR)")
    # Files: a private run directory per server, held by a lock its workers inherit;
    # the directories of servers that are gone (SIGKILLed) are removed, never a live one's.
    try:
        for path in ownership.clean_stale(settings.TMPDIR):
            server.log.info("removed %s, left by a server that is gone", path)
        _run_dir = ownership.ServerDir.create(settings.TMPDIR)
    except OSError as exc:
        _bad_configuration("TMPDIR", settings.TMPDIR, exc)
    os.environ[ownership.RUN_DIR_ENV] = _run_dir.path

    import bbrunner

    bb = bbrunner.BB(**settings.BB_OPTIONS)
    status = bb.status()
    if not status.available:
        server.log.warning("bb is not available (%s): /api/health answers 503", status.detail)
        return
    # A VK that can be neither found nor stored would keep the server unready for good: stop now.
    cache = settings.VK_CACHE_DIR
    creatable = os.path.isdir(cache) or os.access(os.path.dirname(cache), os.W_OK | os.X_OK)
    if creatable and (not os.path.isdir(cache) or os.access(cache, os.W_OK | os.X_OK)):
        return
    for name, path in settings.CIRCUITS.items():
        if not bbrunner.Circuit(bb, path, cache).vk_cached():
            sys.exit(f"bb-worker: bad configuration: VK_CACHE_DIR={cache!r} is not writable and holds no VK "
                     f"for circuit {name} (bb {status.version}, VERIFIER_TARGET={settings.VERIFIER_TARGET or ''}): "
                     "make it writable or bake the VK in (scripts/precompute_vk.py)")


def post_worker_init(worker):
    """In each worker, once the app is loaded: compute missing VKs in the background."""
    worker.wsgi.start()


def child_exit(server, worker):
    """Drop a dead worker's live metrics (in-flight and queued gauges) and its files."""
    import observability
    import ownership
    import scheduler

    observability.worker_exited(worker.pid)
    scheduler.forget_process(settings.SLOTS_DIR, worker.pid)
    ownership.kill_orphans()  # bb died with its worker (PR_SET_PDEATHSIG); anything bb started did not
    if _run_dir is not None:  # a worker killed mid-proof leaves its witness; its bb died with it
        _run_dir.remove_worker(worker.pid)


def on_exit(server):
    """Remove this server's run directory and multiprocess metrics files."""
    _remove_ours()
