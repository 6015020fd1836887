"""Prometheus metrics of bb-worker, with prometheus_client.

With one gunicorn worker the default in-process registry is exact. With several
(WEB_CONCURRENCY > 1), the master sets PROMETHEUS_MULTIPROC_DIR before any worker
imports this module: every process then writes its samples to files there and
GET /api/metrics merges them (prometheus_client's multiprocess mode).
"""
import os

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               REGISTRY, generate_latest)
from prometheus_client import multiprocess

# One count per request; the outcomes are bbworker.errors' classes' and the handlers' (docs/api.md).
PROOFS = Counter("bb_worker_proofs_total", "POST /api/prove requests by circuit and outcome, one each "
                 "(success, rejected, bad_request, too_large, busy, timeout, server_error, ...: docs/api.md).",
                 ["circuit", "outcome"])
VERIFICATIONS = Counter("bb_worker_verifications_total", "POST /api/verify requests by circuit and outcome, "
                        "one each (valid, invalid, bad_request, busy, timeout, ...: docs/api.md).",
                        ["circuit", "outcome"])
PROVE_SECONDS = Histogram("bb_worker_prove_duration_seconds", "Wall time of one `bb prove` run, seconds.",
                          ["circuit"], buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
QUEUE_SECONDS = Histogram("bb_worker_queue_wait_seconds", "Time a request waited for a proof slot, seconds.",
                          buckets=(0.005, 0.02, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60))
IN_FLIGHT = Gauge("bb_worker_proofs_in_flight", "bb prove processes running now.",
                  multiprocess_mode="livesum")
QUEUED = Gauge("bb_worker_queued_requests", "Requests waiting for a proof slot now.",
               multiprocess_mode="livesum")
# What an autoscaler scales on (deploy/k8s/scaledobject.yaml): every proof request from its
# admission to its reply, uploading, waiting for a slot or proving; CPU cannot tell a pod
# with work waiting from one without, since one proof already keeps every core busy.
PROOF_REQUESTS = Gauge("bb_worker_proof_requests", "Proof requests admitted and not yet answered: "
                       "uploading, waiting for a proof slot or proving.", multiprocess_mode="livesum")
RECEIVED = Counter("bb_worker_received_bytes", "Request body bytes received on /api/prove.")
BB_INFO = Gauge("bb_worker_bb_info", "The bb in use (value 1).", ["version", "verifier_target"],
                multiprocess_mode="max")


def _multiprocess():
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def render():
    """Return (body bytes, content type) of all metrics in Prometheus text format."""
    registry = REGISTRY
    if _multiprocess():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def worker_exited(pid):
    """Drop a dead worker's live gauges (the master's child_exit hook)."""
    if _multiprocess():
        multiprocess.mark_process_dead(pid)
