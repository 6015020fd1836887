"""Prometheus metrics and JSON log lines for bb-worker.

Metrics use prometheus_client. Under gunicorn each worker is a process, so
gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR before this module is imported:
every process then writes its samples to files there and GET /api/metrics
merges them (prometheus_client's multiprocess mode). Without that variable (a
direct WSGI call in tests) the default single-process registry is used.
"""
import json
import logging
import os
import time

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               REGISTRY, generate_latest)
from prometheus_client import multiprocess

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

PROOFS = Counter("bb_worker_proofs_total", "Proof requests by circuit and outcome "
                 "(success, rejected, timeout, crashed, unavailable, busy, client_gone).",
                 ["circuit", "outcome"])
PROVE_SECONDS = Histogram("bb_worker_prove_duration_seconds", "Wall time of one `bb prove` run, seconds.",
                          ["circuit"], buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
QUEUE_SECONDS = Histogram("bb_worker_queue_wait_seconds", "Time a request waited for a proof slot, seconds.",
                          buckets=(0.005, 0.02, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60))
IN_FLIGHT = Gauge("bb_worker_proofs_in_flight", "bb prove processes running now.",
                  multiprocess_mode="livesum")
QUEUED = Gauge("bb_worker_queued_requests", "Requests waiting for a proof slot now.",
               multiprocess_mode="livesum")
RECEIVED = Counter("bb_worker_received_bytes", "Request body bytes received on /api/prove.")
BB_INFO = Gauge("bb_worker_bb_info", "The bb in use (value 1).", ["version", "verifier_target"],
                multiprocess_mode="max")


def render():
    """Return (body bytes, content type) of all metrics in Prometheus text format."""
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST


def worker_exited(pid):
    """Drop a dead worker's live gauges (gunicorn child_exit hook)."""
    if MULTIPROCESS:
        multiprocess.mark_process_dead(pid)


# ---------------------------------------------------------------- logs

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC ISO-8601), level, logger, message, and the
    record's `extra` fields (request_id, status, bytes_in, ... for access lines)."""

    def format(self, record):
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                + f".{int(record.msecs):03d}Z",
                "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        line.update((k, v) for k, v in vars(record).items() if k not in _STANDARD)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)
