"""gunicorn configuration for bb-worker: the settings (bbworker.settings) in gunicorn's names.

Run: gunicorn -c gunicorn.conf.py  (every value comes from the environment; docs/configuration.md).
"""
import os
import sys

from bbworker.server import logs
from bbworker.server.hooks import Hooks
from bbworker.settings import ConfigError, Settings

try:
    settings = Settings.from_environ(os.environ)
except ConfigError as exc:
    sys.exit(f"bb-worker: bad configuration: {exc}")

# ---------------------------------------------------------------- app and socket
wsgi_app = "app:application"
bind = [f"0.0.0.0:{settings.port}"]
forwarder_headers = ""  # routing follows the request path alone, whoever sends SCRIPT_NAME

# ---------------------------------------------------------------- workers
# bb does the heavy work in its own process; a gevent worker only streams bodies and waits,
# so one process serves many connections. MAX_CONCURRENT_PROOFS bounds the bb processes.
worker_class = "bbworker.server.worker.GeventWorker"
workers = settings.web_concurrency
# A full worker drops the connection waiting longest for a request head, so idle connections
# never keep out the next one (bbworker.server.worker). max_requests is refused at start
# (hooks.Hooks.on_starting): a worker at its limit stops accepting until its last connection ends.
worker_connections = 1000  # gunicorn's default; idle connections cost a greenlet and a socket
worker_tmp_dir = settings.shm_dir
control_socket_disable = True  # no runtime control socket: nothing to manage, less to expose

# ---------------------------------------------------------------- timeouts
# For gevent workers `timeout` is a heartbeat: the worker notifies the master from its own
# greenlet while bb runs, so a long proof never trips it. On SIGTERM the worker stops
# accepting and lets in-flight proofs finish: graceful_timeout covers a full queue wait plus
# a full proof. An orchestrator's stop grace period must exceed it.
timeout = 30
graceful_timeout = int(settings.queue_timeout_seconds + settings.prove_timeout_seconds) + 10
keepalive = settings.keepalive_seconds  # above load balancers' idle timeouts
forwarded_allow_ips = settings.forwarded_allow_ips  # whose X-Forwarded-For the access log believes

# ---------------------------------------------------------------- logging
# The app writes one access line per request to the "bb_worker.access" logger.
accesslog = None
errorlog = "-"
loglevel = settings.log_level
logconfig_dict = logs.config(settings.log_level, settings.log_format)

# ---------------------------------------------------------------- hooks
# The master never imports app.py (no preload: a HUP reloads the code); workers do.
_hooks = Hooks(settings)
on_starting = _hooks.on_starting
on_reload = _hooks.on_reload
post_fork = _hooks.post_fork
post_worker_init = _hooks.post_worker_init
pre_request = _hooks.pre_request
post_request = _hooks.post_request
child_exit = _hooks.child_exit
on_exit = _hooks.on_exit
