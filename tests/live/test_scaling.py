"""The autoscaling signal: bb_worker_proof_requests, the proof requests a pod holds (uploading,
waiting for a proof slot or proving), summed over gunicorn's workers and back to 0 when idle.

deploy/k8s/scaledobject.yaml scales on it (tests/packaging/test_deploy.py checks the query
names it). Live tests use the fake bb with FAKE_BB_DELAY, a slow circuit at no CPU cost; the
gauge is read from /api/metrics as Prometheus would scrape it.
"""
import threading

import pytest
from prometheus_client import REGISTRY

from bbworker.errors import Busy
from bbworker.web.admission import ProofQueue
from support import connect, fixture_bytes, read_metrics, request_head, Replies, wait_for

WITNESS = fixture_bytes("valid_1.gz")
CLIENTS = 8
GAUGE = ("bb_worker_proof_requests", frozenset())
IN_FLIGHT = ("bb_worker_proofs_in_flight", frozenset())
QUEUED = ("bb_worker_queued_requests", frozenset())


class HeldUpload:
    """A POST /api/prove whose last body byte is held back until finish(); the reply is read in a thread."""

    def __init__(self, port):
        self.sock = connect(port, timeout=120)
        self.sock.sendall(request_head("/api/prove", {"Content-Type": "application/gzip",
                                                      "Content-Length": str(len(WITNESS))}) + WITNESS[:-1])
        self.status = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._reply, daemon=True)

    def finish(self):
        self.sock.sendall(WITNESS[-1:])
        self.thread.start()

    def abandon(self):
        """Hang up if finish() was never called (a failed test must not wait for its reply)."""
        if self.thread.ident is None:
            self.sock.close()
            self.done.set()

    def _reply(self):
        try:
            self.status = Replies(self.sock).next()[0]
        finally:
            self.sock.close()
            self.done.set()


@pytest.mark.parametrize("workers", [1, 2])
def test_proof_requests_count_waiting_and_running_then_zero(start_server, fake_bb, workers):
    srv = start_server(BB_BINARY=fake_bb, FAKE_BB_DELAY=1, WEB_CONCURRENCY=workers, PROOF_CORES=2,
                       MAX_CONCURRENT_PROOFS=2, QUEUE_TIMEOUT_SECONDS=120)
    assert read_metrics(srv.port)[GAUGE] == 0
    clients = [HeldUpload(srv.port) for _ in range(CLIENTS)]
    try:
        # Admitted, their bodies still arriving: each counts from admission on.
        assert wait_for(lambda: read_metrics(srv.port)[GAUGE] == CLIENTS, timeout=30), read_metrics(srv.port)
        values = read_metrics(srv.port)
        assert values[IN_FLIGHT] == 0 and values[QUEUED] == 0
        for client in clients:
            client.finish()
        # Then proving (at most MAX_CONCURRENT_PROOFS) and waiting for a slot: still every one of them,
        # as long as no reply has come back (a sample taken with a reply out is not judged).
        judged = []

        def sample():
            before = sum(c.done.is_set() for c in clients)
            values = read_metrics(srv.port)
            if before == 0 and not any(c.done.is_set() for c in clients):
                judged.append(values)
                return values[IN_FLIGHT] >= 1 and values[QUEUED] >= 1
            return False

        assert wait_for(sample, timeout=60), f"no sample with proofs both running and waiting: {judged}"
        for values in judged:
            assert values[GAUGE] == CLIENTS, values
            assert 1 <= values[IN_FLIGHT] + values[QUEUED] <= CLIENTS
            assert values[IN_FLIGHT] <= 2, "MAX_CONCURRENT_PROOFS"
    finally:
        for client in clients:
            client.abandon()
        for client in clients:
            client.done.wait(timeout=120)
    assert [c.status for c in clients] == [200] * CLIENTS, srv.output_tail()
    for _ in range(workers * 3):  # whichever worker answers, the sum is the server's
        values = read_metrics(srv.port)
        assert (values[GAUGE], values[IN_FLIGHT], values[QUEUED]) == (0, 0, 0)
        assert values[("bb_worker_proofs_total", frozenset({("circuit", "default"), ("outcome", "success")}))] \
            == CLIENTS


def test_a_request_counts_until_it_ends_and_a_refused_one_never():
    """In-process: ProofQueue.admit() counts from admission to the end of the `with` body,
    however it ends; one refused at admission (503) never counts."""
    def gauge():
        return REGISTRY.get_sample_value("bb_worker_proof_requests")  # this process's own registry

    queue = ProofQueue(slots=None, timeout=1, max_queued=1, max_uploading=1)
    start = gauge()
    with queue.admit():
        assert gauge() == start + 1
        with pytest.raises(Busy):  # the one uploading place is taken, and too young to preempt
            with queue.admit():
                pass
        assert gauge() == start + 1
    assert gauge() == start
    with pytest.raises(ValueError):
        with queue.admit() as ticket:
            ticket.uploaded()
            raise ValueError("the request failed while queued")
    assert gauge() == start
