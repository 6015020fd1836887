"""The benchmark's own arithmetic (bench/measure.py), checked without running it."""
from bench import measure  # the repository root is on pytest's path (pyproject.toml)


def test_steady_latencies_keep_only_requests_made_under_sustained_load():
    # Two clients, six requests, one server proving one at a time for 1 s each: a and b are
    # sent at 0 (ramp-up), c and d after the first answer, e and f last (the drain follows).
    spans = [(0.0, 1.0, True),   # a: sent before the first answer
             (0.0, 2.0, True),   # b: sent before the first answer
             (1.0, 3.0, True),   # c: steady
             (2.0, 4.0, False),  # d: failed
             (3.0, 5.0, True),   # e: answered after the last send (4.0)
             (4.0, 6.0, True)]   # f: the last request
    assert measure.steady_latencies(spans, last_sent=4.0) == [2.0]  # 2 clients / 2 s = 1 proof/s, the server's rate


def test_steady_latencies_of_a_batch_too_short_are_none():
    spans = [(0.0, 1.0, True), (0.0, 2.0, True)]  # every request sent before the first answer
    assert measure.steady_latencies(spans, last_sent=0.0) == []
    assert measure.steady_latencies([], last_sent=None) == []
