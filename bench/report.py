"""Turn the benchmark's results (the dict run.py builds) into markdown, a PNG and a verdict per target."""
import statistics

MiB = 2 ** 20

# The targets of issue 4 (a benchmark, not a test: a miss is reported, not failed).
OVERHEAD_RATIO = 1.05        # worker p50 / floor p50, from 2^14 rows up
OVERHEAD_FROM_LOG = 14
SMALL_OVERHEAD_S = 0.025     # worker p50 - floor p50 on the smallest circuit
RUST_SPEEDUP = 1.10          # rust call p50 / worker p50, from 2^16 rows up
RUST_FROM_LOG = 16
# The targets of issue 14: the scheduler against the old policy (MAX_CONCURRENT_PROOFS=1), same run.
SCHED_GAIN = {12: 1.35, 18: 1.12}   # 8 clients: scheduler proofs/min / old policy's, by log2 size
LONE_P50 = 1.02                     # 1 client: scheduler p50 / old policy's p50, at every size


def med(xs):
    """Median of a non-empty list of numbers."""
    return statistics.median(xs)


def ms(seconds):
    """Seconds (float) as milliseconds text: one decimal below 100 ms."""
    v = seconds * 1000
    return f"{v:.1f}" if abs(v) < 100 else f"{v:.0f}"


def iqr_ms(xs):
    """Interquartile range of seconds xs as 'p25–p75' milliseconds text."""
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return f"{ms(q[0])}–{ms(q[2])}"


def verdict(ok):
    """'MET' or 'MISSED'."""
    return "MET" if ok else "**MISSED**"


def targets(results):
    """List of (target text, verdict text or None when not measured, detail text)."""
    sizes = results.get("sizes", [])
    out = []
    big = [s for s in sizes if s["log"] >= OVERHEAD_FROM_LOG]
    if big:
        worst = max(big, key=lambda s: med(s["worker"]) / med(s["floor"]))
        ratios = ", ".join(f"2^{s['log']}: {med(s['worker']) / med(s['floor']):.3f}" for s in big)
        out.append((f"worker p50 / floor ≤ {OVERHEAD_RATIO} from 2^{OVERHEAD_FROM_LOG} rows up",
                    verdict(med(worst["worker"]) / med(worst["floor"]) <= OVERHEAD_RATIO), ratios))
    else:
        out.append((f"worker p50 / floor ≤ {OVERHEAD_RATIO} from 2^{OVERHEAD_FROM_LOG} rows up", None,
                    "no size ≥ 2^14 in this run"))
    if sizes:
        small = min(sizes, key=lambda s: s["log"])
        extra = med(small["worker"]) - med(small["floor"])
        out.append((f"worker p50 − floor ≤ {SMALL_OVERHEAD_S * 1000:.0f} ms on the smallest circuit",
                    verdict(extra <= SMALL_OVERHEAD_S),
                    f"2^{small['log']}: {ms(med(small['worker']))} − {ms(med(small['floor']))} = {ms(extra)} ms"))
    rust = [s for s in sizes if s["log"] >= RUST_FROM_LOG]
    if rust:
        worst = min(rust, key=lambda s: med(s["rust"]) / med(s["worker"]))
        ratios = ", ".join(f"2^{s['log']}: {med(s['rust']) / med(s['worker']):.3f}x" for s in rust)
        out.append((f"worker ≥ {RUST_SPEEDUP}x faster than the Rust worker's call from 2^{RUST_FROM_LOG} rows up",
                    verdict(med(worst["rust"]) / med(worst["worker"]) >= RUST_SPEEDUP), ratios))
    else:
        out.append((f"worker ≥ {RUST_SPEEDUP}x faster than the Rust worker's call from 2^{RUST_FROM_LOG} rows up",
                    None, "no size ≥ 2^16 in this run"))
    for conc in results.get("concurrency") or []:
        by = {(r["limit"], r["clients"]): r for r in conc["runs"]}
        log, hi = conc["log"], max(r["clients"] for r in conc["runs"])
        old, new = by.get(("today", hi)), by.get(("scheduler", hi))
        if old and new and old["proofs_per_min"]:
            # Sustained load is what the target is about: the steady figure when the batches had one.
            key = "steady_per_min" if old.get("steady_per_min") and new.get("steady_per_min") else "proofs_per_min"
            gain = new[key] / old[key]
            want = SCHED_GAIN.get(log)
            batch = new["proofs_per_min"] / old["proofs_per_min"]
            out.append((f"2^{log}, {hi} clients: scheduler proofs/min ≥ {want}x the old policy's" if want else
                        f"2^{log}, {hi} clients: scheduler proofs/min vs the old policy's (no target)",
                        verdict(gain >= want) if want else "shown",
                        (f"steady {new[key]:.1f} vs {old[key]:.1f} proofs/min = {gain:.2f}x; whole batches "
                         f"{batch:.2f}x" if key == "steady_per_min" else
                         f"{new[key]:.1f} vs {old[key]:.1f} proofs/min = {gain:.2f}x (batches too short "
                         "for a steady figure)")))
        old, new = by.get(("today", 1)), by.get(("scheduler", 1))
        if old and new and old["latency"] and new["latency"]:
            ratio = new["latency"]["p50"] / old["latency"]["p50"]
            out.append((f"2^{log}, 1 client: scheduler p50 ≤ {LONE_P50}x the old policy's", verdict(ratio <= LONE_P50),
                        f"{new['latency']['p50']:.3f} vs {old['latency']['p50']:.3f} s = {ratio:.3f}"))
        sched = [r for r in conc["runs"] if r["limit"] == "scheduler"]
        peak = max(r["peak_rss_bytes"] for r in sched)
        out.append((f"2^{log}: scheduler's peak bb RSS ≤ its budget", verdict(peak <= conc["budget_bytes"]),
                    f"{peak / MiB:.0f} MiB in at most {max(r['peak_bb'] for r in sched)} bb at once; "
                    f"budget {conc['budget_bytes'] / MiB:.0f} MiB"))
        ok = sum(r["ok"] for r in conc["runs"])
        if conc["crs"] == "real":
            verified = sum(r["verified"] for r in conc["runs"])
            out.append((f"2^{log}: `bb verify` accepts every proof", verdict(verified == ok),
                        f"{verified} of {ok} proofs verified"))
        else:
            out.append((f"2^{log}: `bb verify` accepts every proof", None,
                        f"dev CRS: its {ok} proofs cannot verify (see the CRS check)"))
    return out


def _p(run, key):
    return f"{run['latency'][key]:.2f}" if run["latency"] else "n/a"


def failures(results):
    """Problems that make the run a failure (list of str): failed proof requests."""
    out = []
    for conc in results.get("concurrency") or []:
        for r in conc["runs"]:
            if r["failed"]:
                out.append(f"{sum(r['failed'].values())} of {r['requests']} requests failed at 2^{conc['log']}, "
                           f"{r['clients']} clients, {r['limit']}: {r['failed']}")
    return out


def _kept(s):
    return f"{s['repeats']}" + (f" (+{s['rounds_discarded']})" if s.get("rounds_discarded") else "")


def latency_table(results):
    """The per-size markdown table (str)."""
    head = ("| size | N | gates (rows) | dyadic | witness KiB | CRS | rounds | floor p50 ms | "
            "Rust call p50 ms | worker p50 ms | worker − floor ms | worker / floor | Rust call / worker | "
            "upload-only p50 ms | bb RSS MiB | other load p50 / max (cores) |\n"
            "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    rows = []
    for s in results.get("sizes", []):
        f, r, w = med(s["floor"]), med(s["rust"]), med(s["worker"])
        rows.append(f"| 2^{s['log']} | {s['n']} | {s['rows']} | 2^{s['dyadic_log']} = {1 << s['dyadic_log']} | "
                    f"{s['witness_bytes'] / 1024:.0f} | {s['crs']} | {_kept(s)} | {ms(f)} | {ms(r)} | {ms(w)} | "
                    f"{ms(w - f)} | {w / f:.3f} | {r / w:.3f} | {ms(med(s['upload']))} | "
                    f"{med(s['floor_rss']) / MiB:.0f} | {med(s['round_load']):.2f} / {max(s['round_load']):.2f} |")
    return head + "\n".join(rows) + "\n"


def spread_table(results):
    """Interquartile ranges per size (markdown str): how noisy each median is."""
    head = ("| size | floor IQR ms | Rust call IQR ms | worker IQR ms | paired worker / floor (median of rounds) |\n"
            "|---|---:|---:|---:|---:|\n")
    rows = []
    for s in results.get("sizes", []):
        paired = med([w / f for w, f in zip(s["worker"], s["floor"])])
        rows.append(f"| 2^{s['log']} | {iqr_ms(s['floor'])} | {iqr_ms(s['rust'])} | {iqr_ms(s['worker'])} | "
                    f"{paired:.3f} |")
    return head + "\n".join(rows) + "\n"


VERIFY_SMALL_S = 0.012  # verify on − verify off at 2^10
VERIFY_RATIO = 0.01     # (verify on − verify off) / floor, from 2^14 rows up


def verify_table(results):
    """Worker with and without `bb verify` per real-CRS size (markdown str), or "" when not measured."""
    sizes = [s for s in results.get("sizes", []) if s.get("no_verify")]
    if not sizes:
        return ""
    head = ("| size | floor p50 ms | verify on p50 ms | verify off p50 ms | difference ms | difference / floor | target |\n"
            "|---|---:|---:|---:|---:|---:|---|\n")
    rows = []
    for s in sizes:
        on, off, floor = med(s["worker"]), med(s["no_verify"]), med(s["floor"])
        paired = med([a - b for a, b in zip(s["worker"], s["no_verify"])])
        if s["log"] <= 10:
            target = f"≤ {VERIFY_SMALL_S * 1000:.0f} ms: {verdict(on - off <= VERIFY_SMALL_S)}"
        elif s["log"] >= 14:
            target = f"≤ {VERIFY_RATIO:.0%}: {verdict((on - off) / floor <= VERIFY_RATIO)}"
        else:
            target = "-"
        rows.append(f"| 2^{s['log']} | {ms(floor)} | {ms(on)} | {ms(off)} | {ms(on - off)} (paired {ms(paired)}) | "
                    f"{(on - off) / floor:.2%} | {target} |")
    return head + "\n".join(rows) + "\n"


def breakdown_table(results):
    """Where the worker's time goes, per size (markdown str), or "" when the worker did not say."""
    sizes = [s for s in results.get("sizes", []) if s.get("handler")]
    if not sizes:
        return ""
    head = ("| size | worker p50 ms | handler p50 ms | prove() p50 ms | floor p50 ms | "
            "HTTP + client ms | receive + slot + reply ms | prove() − floor ms | upload-only p50 ms |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    rows = []
    for s in sizes:
        http = med([w - h for w, h in zip(s["worker"], s["handler"])])
        app = med([h - b for h, b in zip(s["handler"], s["bb_in_worker"])])
        spawn = med([b - f for b, f in zip(s["bb_in_worker"], s["floor"])])
        rows.append(f"| 2^{s['log']} | {ms(med(s['worker']))} | {ms(med(s['handler']))} | "
                    f"{ms(med(s['bb_in_worker']))} | {ms(med(s['floor']))} | {ms(http)} | {ms(app)} | "
                    f"{ms(spawn)} | {ms(med(s['upload']))} |")
    return head + "\n".join(rows) + "\n"


def concurrency_table(conc):
    """The markdown table of one size's concurrency runs, the two policies side by side (str)."""
    head = ("| clients | policy | batches | proofs | proofs/min | scheduler / old | steady proofs/min | "
            "steady scheduler / old | p50 s | p95 s | "
            "peak bb RSS MiB | bb at once (max) | bb runs by threads | other load (cores) |\n"
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|\n")
    by = {(r["limit"], r["clients"]): r for r in conc["runs"]}
    rows = []
    for clients in sorted({r["clients"] for r in conc["runs"]}):
        for label in ("today", "scheduler"):
            r = by.get((label, clients))
            if r is None:
                continue
            old = by.get(("today", clients))
            rel = (f"{r['proofs_per_min'] / old['proofs_per_min']:.2f}x"
                   if label == "scheduler" and old and old["proofs_per_min"] else "")
            steady, old_steady = r.get("steady_per_min"), (old or {}).get("steady_per_min")
            steady_rel = f"{steady / old_steady:.2f}x" if label == "scheduler" and steady and old_steady else ""
            threads = ", ".join(f"{k}: {v}" for k, v in sorted(r["threads"].items()))
            rows.append(f"| {clients} | {label} | {r['batches']}"
                        + (f" (+{r['batches_discarded']})" if r.get("batches_discarded") else "")
                        + f" | {r['ok']} | {r['proofs_per_min']:.1f} | {rel} | "
                        + (f"{steady:.1f} ({len(r['steady_latencies'])})" if steady else "–")
                        + f" | {steady_rel} | {_p(r, 'p50')} | {_p(r, 'p95')} | "
                        f"{r['peak_rss_bytes'] / MiB:.0f} | {r['peak_bb']} | {threads} | {med(r['batch_load']):.2f} |")
    return head + "\n".join(rows) + "\n"


def throughput_breakdown(conc):
    """Where a proof's time goes under the most clients, per policy (markdown table, str)."""
    hi = max(r["clients"] for r in conc["runs"])
    rows = []
    for r in conc["runs"]:
        if r["clients"] != hi or not r["ok"]:
            continue
        n = r["ok"]
        wall = r["elapsed"] / n
        rows.append(f"| {r['limit']} | {ms(wall)} | {ms(r['bb_seconds'] / n)} | "
                    f"{ms(wall - r['bb_seconds'] / n / max(1, r['peak_bb']))} | "
                    f"{ms(r['worker_cpu'] / n)} | {ms(r['bench_cpu'] / n)} |")
    return ("| policy | wall time per proof ms | bb time per proof (in the worker) ms | "
            "wall − bb time / bb at once ms | worker CPU per proof ms | benchmark client CPU per proof ms |\n"
            "|---|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n")


def noise_policy(results):
    """One sentence (str) on how the run dealt with other processes' load."""
    p = results.get("patience", {"max_wait": 20.0, "reruns": True})
    text = (f"Each round starts once the machine is quiet (< 0.15 other cores over 0.5 s, waiting at most "
            f"{p['max_wait']:g} s)")
    if p["reruns"]:
        return (text + f"; a round during which other processes still used more than "
                f"{results.get('noisy_cores', 0.3)} cores is discarded and re-run (*rounds*: kept (+ discarded); "
                "at most twice the planned rounds in all, and all are kept if too few were quiet).")
    return text + "; noisy rounds are kept (quick mode)."


def markdown(results):
    """The whole RESULTS.md text (str)."""
    m = results.get("machine", {})
    parts = [
        "# bb-worker benchmark results\n",
        f"Generated by `{'make bench-quick' if results['mode'] == 'quick' else 'make bench'}` "
        f"({results['mode']} mode{', custom options' if results.get('custom') else ''}) on {m.get('date')}, "
        f"in {results.get('elapsed_seconds', 0) / 60:.1f} min. How to run it and what each column means: "
        "[README.md](README.md).\n",
        f"- Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory')}, {m.get('kernel')} "
        "(shared and noisy: compare numbers within this run only)",
        f"- bb {m.get('bb')}; Noir {results.get('noir')}; Python {m.get('python')}, gunicorn {m.get('gunicorn')}, "
        f"gevent {m.get('gevent')}; worker at commit {m.get('worker_commit')}",
        f"- Worker: 1 gunicorn gevent worker, MAX_CONCURRENT_PROOFS default = {results.get('default_limit')} "
        "(= the cores), "
        "other settings at their defaults; client: Python http.client on 127.0.0.1, a new connection per request",
        "- Every time is a median (p50) over interleaved rounds (the order rotates each round) after one "
        "warm-up of each; ratios compare medians of the same run.",
        f"- Background: other people's processes used {results.get('background', {}).get('other_cores', 0):.2f} "
        f"of the {m.get('cores')} cores on average during the run (hypervisor steal "
        f"{results.get('background', {}).get('steal', 0):.1%}); per size in the *other load* column.\n",
        "## Latency by circuit size (one client)\n",
        latency_table(results),
        "\n*floor*: bare `bb prove -k vk`. *Rust call*: `bb prove --write_vk` (no precomputed VK, as the "
        "Rust worker runs it; its HTTP handling is not counted, which favours it). *worker*: POST /api/prove "
        "end to end (connect, upload, prove, JSON and base64 decode). *upload-only*: the same POST with the "
        "witness's last byte cut, which the worker reads and inflates completely and answers 400 without bb. "
        "*bb RSS*: peak RSS (VmHWM) of one bare `bb prove` (sampled in the warm-up, not in timed runs). "
        "*other load*: cores kept busy by processes that are not this benchmark's, per kept round "
        f"(median / worst). {noise_policy(results)} Sizes on the *dev* CRS use the insecure "
        "development CRS (timing only; see README).\n",
        "Spread (interquartile ranges) and the median of per-round ratios:\n",
        spread_table(results),
    ]
    verification = verify_table(results)
    if verification:
        parts += ["\n## Cost of verifying every proof (issue 10)\n",
                  "*verify on*: the worker as shipped (`VERIFY_PROOFS=1`, the *worker* column above); *verify "
                  "off*: a second worker with `VERIFY_PROOFS=0`, in the same rounds. Targets: at most "
                  f"{VERIFY_SMALL_S * 1000:.0f} ms at 2^10, at most {VERIFY_RATIO:.0%} of the floor from 2^14 up. "
                  "Real-CRS sizes only: dev-CRS proofs cannot verify, so those sizes run with `VERIFY_PROOFS=0`.\n",
                  verification]
    breakdown = breakdown_table(results)
    if breakdown:
        parts += [
            "\n## Where the worker's overhead goes\n",
            "Per round, from the worker's own numbers: *handler* is the server-side time of the request "
            "(its access log, matched by X-Request-Id), *prove()* the time it spent in `Circuit.prove` (its "
            "`bb_worker_prove_duration_seconds` metric, read just before and after the request). "
            "*HTTP + client* = worker − handler (connect, sending the body, the response, JSON and base64 "
            "decoding in the client); *receive + slot + reply* = handler − prove() (streaming and "
            "inflating the witness to disk, taking a proof slot, building the JSON, removing temp files); "
            "*prove() − floor* = bb spawned and awaited under gevent, plus reading its output, against "
            "bare bb. Medians of the per-round differences, so they need not add up exactly.\n",
            breakdown,
        ]
    parts += ["\n## Targets\n"]
    for text, result, detail in targets(results):
        parts.append(f"- {text}: {result or 'not measured'} ({detail})")
    parts.append("")
    for conc in results.get("concurrency") or []:
        parts += [f"## Concurrency at 2^{conc['log']}: the scheduler against the old policy\n",
                  f"Closed loop: each client sends its next proof request as soon as the last one is answered; "
                  f"a batch is {conc['per_client']} requests per client (at least {conc['min_batch']}), "
                  f"{conc['passes']} pass(es) over all batches, the two servers running side by side and the "
                  "batches alternating between them (A B, B A, ...). *today*: `MAX_CONCURRENT_PROOFS=1` (one "
                  "proof at a time, every core); *scheduler*: the defaults (a lone proof gets every core, "
                  f"queued ones split them) with `PROOF_MEMORY_BUDGET_BYTES` = {conc['budget_bytes'] / MiB:.0f} MiB. "
                  + ("A batch during which other processes used more than 0.3 cores is re-run (twice at most; "
                     "*batches*: kept (+ discarded)); failed requests count whatever the batch. "
                     if results.get("patience", {}).get("reruns", True) else "") +
                  f"Other processes used {conc['background']['other_cores']:.2f} cores meanwhile. Peak bb RSS is "
                  "the largest sum of VmRSS over all bb processes, sampled every 20 ms; *bb runs by threads* "
                  "counts bb processes by the HARDWARE_CONCURRENCY in their environment (/proc/<pid>/environ). "
                  "*proofs/min* counts whole batches: each starts with one lone proof on every core and ends "
                  "with the last proofs running while cores idle, a cost only a finite batch pays. *steady "
                  "proofs/min* is the sustained rate: clients / mean latency (the response-time law of a closed "
                  "loop) over the requests sent after a batch's first answer and answered before its last "
                  "request was sent, when every client had a request in the server (their count in "
                  "parentheses); the targets use it. "
                  + ("Every proof was checked with `bb verify`." if conc["crs"] == "real" else
                     "Dev CRS: proofs are timed, not verified.") + "\n",
                  concurrency_table(conc),
                  f"\nWhere the time goes at {max(r['clients'] for r in conc['runs'])} clients (per proof; "
                  "*bb time* from the worker's prove-duration metric, *worker CPU* of the gunicorn processes "
                  "without bb, *client CPU* of this benchmark's process, its RSS sampler included):\n",
                  throughput_breakdown(conc)]
    if results.get("crs_check"):
        c = results["crs_check"]
        parts += [f"## CRS check at 2^{c['log']}\n",
                  f"Bare `bb prove -k vk` with the real CRS: {ms(med(c['real']))} ms (p50 of {len(c['real'])}); "
                  f"with the insecure dev CRS: {ms(med(c['dev']))} ms (p50 of {len(c['dev'])}); ratio "
                  f"{med(c['dev']) / med(c['real']):.3f}. "
                  f"A dev-CRS proof is {'rejected' if c['dev_proof_rejected'] else 'ACCEPTED (unexpected)'} "
                  "by `bb verify` with its own VK, as it must be.\n"]
    fails = failures(results)
    if fails:
        parts += ["## Failures\n"] + [f"- {f}" for f in fails] + [""]
    return "\n".join(parts)


def plot(results, path):
    """Write a PNG to `path`: p50 latency (with IQR) vs dyadic size, and the two ratios."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sizes = results.get("sizes", [])
    if not sizes:
        return
    xs = [1 << s["dyadic_log"] for s in sizes]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8))
    for key, label, style in (("floor", "floor: bare bb prove -k vk", "o-"),
                              ("rust", "Rust worker's call: bb prove --write_vk", "s--"),
                              ("worker", "our worker over HTTP (1 client)", "^-")):
        p50 = [med(s[key]) * 1000 for s in sizes]
        q = [[v * 1000 for v in (statistics.quantiles(s[key], n=4, method="inclusive")
                                  if len(s[key]) > 1 else [s[key][0]] * 3)] for s in sizes]
        err = [[m - qq[0] for m, qq in zip(p50, q)], [qq[2] - m for m, qq in zip(p50, q)]]
        ax.errorbar(xs, p50, yerr=err, fmt=style, capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
        lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    ax.set_xlabel("dyadic circuit size (rows)")
    ax.set_ylabel("latency p50 (ms, log scale), bars: p25–p75")
    ax.set_title("Proof latency vs circuit size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    bx.plot(xs, [med(s["worker"]) / med(s["floor"]) for s in sizes], "^-", label="worker / floor")
    bx.plot(xs, [med(s["rust"]) / med(s["worker"]) for s in sizes], "s--", label="Rust call / worker")
    bx.axhline(OVERHEAD_RATIO, color="grey", lw=0.8, ls=":", label=f"target worker/floor ≤ {OVERHEAD_RATIO} (≥ 2^14)")
    bx.axhline(RUST_SPEEDUP, color="grey", lw=0.8, ls="-.", label=f"target Rust/worker ≥ {RUST_SPEEDUP} (≥ 2^16)")
    bx.set_xscale("log", base=2)
    bx.set_xlabel("dyadic circuit size (rows)")
    bx.set_ylabel("ratio of p50s")
    bx.set_title("Ratios (same run)")
    bx.grid(True, which="both", alpha=0.3)
    bx.legend(fontsize=8)
    m = results.get("machine", {})
    fig.suptitle(f"bb-worker benchmark, {m.get('date')}, {m.get('cpu')} x{m.get('cores')}, bb {m.get('bb')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
