"""Test helper (a real process for tests/server/test_scheduler.py): take a scheduler grant and hold it.

argv: STATE_DIR LOG HOLD_SECONDS CORES CAP BUDGET_BYTES PEAK_BYTES TIMEOUT_SECONDS.
Prints "held THREADS" once it holds a grant; appends "START END THREADS" to LOG when done;
exits 3 on SlotTimeout. Run it with the project's venv python (bbworker is installed there).
"""
import sys
import time

import gevent

from bbworker.server.scheduler import Scheduler, SlotTimeout


def main():
    state, log, hold, cores, cap, budget, peak, timeout = sys.argv[1:]
    sched = Scheduler(state, int(cores), int(cap), int(budget), poll=0.01)
    sched.record_peak("circuit", int(peak))
    try:
        grant = sched.take(float(timeout), "circuit")
    except SlotTimeout:
        sys.exit(3)
    try:
        start = time.time()
        print("held", grant.threads, flush=True)
        gevent.sleep(float(hold))
        end = time.time()
        with open(log, "a") as f:
            f.write(f"{start} {end} {grant.threads}\n")
    finally:
        sched.release(grant)


if __name__ == "__main__":
    main()
