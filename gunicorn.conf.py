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
worker_class = "gevent"
workers = settings.WEB_CONCURRENCY
worker_connections = 256
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
control_socket_disable = True  # no runtime control socket: nothing to manage, less to expose

# ---------------------------------------------------------------- timeouts
# For gevent workers `timeout` is a heartbeat: the worker notifies the master from
# its own greenlet while bb runs, so a long proof never trips it. The prove
# deadline is ours (PROVE_TIMEOUT_SECONDS). On SIGTERM the worker stops accepting
# and lets in-flight proofs finish: graceful_timeout covers a full queue wait
# plus a full proof. An orchestrator's stop grace period must exceed it.
timeout = 30
graceful_timeout = int(settings.QUEUE_TIMEOUT_SECONDS + settings.PROVE_TIMEOUT_SECONDS) + 10
keepalive = 5

# ---------------------------------------------------------------- logging
# app.py writes one access line per request (id, status, bytes in, ms) to the
# "bb_worker.access" logger; gunicorn's own access log would repeat it.
accesslog = None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")
_STDERR = {"class": "logging.StreamHandler", "formatter": "generic", "stream": "ext://sys.stderr"}
logconfig_dict = {  # gunicorn's defaults, plus the app's "bb_worker" loggers on stderr
    "version": 1,
    "disable_existing_loggers": False,
    "root": {"level": "INFO", "handlers": ["console"]},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["error_console"], "propagate": False,
                           "qualname": "gunicorn.error"},
        "bb_worker": {"level": "INFO", "handlers": ["console"], "propagate": False},
    },
    "handlers": {"console": _STDERR, "error_console": _STDERR},
    "formatters": {"generic": {"format": "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s",
                               "datefmt": "[%Y-%m-%d %H:%M:%S %z]"}},
}


# ---------------------------------------------------------------- hooks
def on_starting(server):
    """In the master, before any worker: clear stale temp files, compute the VK once."""
    import app as worker_app  # noqa: F401 - imported here, after settings were checked

    worker_app.clean_work_dir(settings.WORK_DIR)
    available, version, detail = worker_app.application.prover.status()
    if not available:
        server.log.warning("bb is not available (%s): /api/health answers 503", detail)
        return
    try:
        vk = worker_app.application.prover.ensure_vk()
    except Exception as exc:  # noqa: BLE001 - logged; the first proof will retry
        server.log.error("could not compute the verification key: %s", exc)
    else:
        server.log.info("bb %s ready, VK at %s", version, vk)
