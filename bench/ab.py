#!/usr/bin/env python3
"""Prints bench/ab.sh's results: for each Switchboard figure, the before and
after builds' median, min and max over their runs, the change of the
medians, and the load average at the start of each run."""

import json
import os
import re
import statistics
import sys

out = sys.argv[1]
runs = {"before": {}, "after": {}}
loads = {"before": [], "after": []}
for d in sorted(os.listdir(out)):
    m = re.match(r"(before|after)-(\d+)$", d)
    if not m or not os.path.isdir(os.path.join(out, d)):
        continue
    build = m.group(1)
    for f in sorted(os.listdir(os.path.join(out, d))):
        path = os.path.join(out, d, f)
        if f.endswith(".env"):
            with open(path) as fh:
                for line in fh:
                    if line.startswith("load average before:"):
                        loads[build].append(float(line.split(":")[1].split()[0]))
        n = re.match(r"(f\d+)-(.+?)(?:-\d+)?\.json$", f)
        if not n:
            continue
        try:
            with open(path) as fh:
                r = json.load(fh)
        except ValueError:
            continue
        runs[build].setdefault((n.group(1), n.group(2)), []).append(r)


def lat(name, q):
    def f(r):
        p = r.get("latency_ms", {}).get(name)
        return p.get(q) if p else None
    return f


def server(key):
    return lambda r: (r.get("server") or {}).get(key)


def loadgen_share(r):
    secs = r.get("measured_seconds") or 0
    cores = r.get("loadgen_cores") or 1
    return 100 * r.get("loadgen_cpu_seconds", 0) / (secs * cores) if secs else None


METRICS = [
    ("1 fan-out 1x1000 full speed", ("f1", "switchboard"), "deliveries/s", lambda r: r["rates"]["delivered_per_s"], "higher"),
    ("1 fan-out 1x1000 full speed", ("f1", "switchboard"), "deliveries/server CPU-s", server("deliveries_per_cpu_second"), "higher"),
    ("1 fan-out 1x1000 full speed", ("f1", "switchboard"), "generator CPU %", loadgen_share, None),
    ("2 fan-out 1x1000 @200/s", ("f2", "switchboard"), "p50 ms", lat("delivery", "p50"), "lower"),
    ("2 fan-out 1x1000 @200/s", ("f2", "switchboard"), "p99 ms", lat("delivery", "p99"), "lower"),
    ("2 fan-out 1x1000 @200/s", ("f2", "switchboard"), "p99.9 ms", lat("delivery", "p999"), "lower"),
    ("2 the same, durability none", ("f2", "switchboard-none"), "p99 ms", lat("delivery", "p99"), "lower"),
]
for n in ("10000", "19000"):
    for tls in ("plain", "tls"):
        METRICS.append((f"4 idle {n} {tls}", ("f4", f"switchboard-{tls}-n{n}"), "bytes/conn", server("bytes_per_connection"), "lower"))
for mode in ("group", "single", "group-w16", "group-w64"):
    METRICS.append((f"6 durable x1000 {mode}", ("f6", mode), "acked/s", lambda r: r["rates"]["acked_per_s"], "higher"))
    METRICS.append((f"6 durable x1000 {mode}", ("f6", mode), "ack p99 ms", lat("ack", "p99"), "lower"))


def fmt(v):
    if v is None:
        return "-"
    if abs(v) >= 1e6:
        return f"{v / 1e6:.2f}M"
    if abs(v) >= 1e4:
        return f"{v / 1e3:.1f}k"
    return f"{v:.1f}"


def stats(build, key, fn):
    vals = [fn(r) for r in runs[build].get(key, [])]
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return statistics.median(vals), min(vals), max(vals), len(vals), sum(r["counts"]["lost"] for r in runs[build][key])


print(f"{'figure':<30} {'metric':<24} {'before: median (min-max) n':>30} {'after: median (min-max) n':>30} {'change':>8} lost b/a")
for fig, key, what, fn, better in METRICS:
    b, a = stats("before", key, fn), stats("after", key, fn)
    if not b and not a:
        continue

    def cell(s):
        return "-" if not s else f"{fmt(s[0])} ({fmt(s[1])}-{fmt(s[2])}) {s[3]}"

    change = f"{100 * (a[0] - b[0]) / b[0]:+.1f}%" if a and b and b[0] else "-"
    lost = f"{b[4] if b else '-'}/{a[4] if a else '-'}"
    print(f"{fig:<30} {what:<24} {cell(b):>30} {cell(a):>30} {change:>8} {lost}")
for build in ("before", "after"):
    if loads[build]:
        print(f"load average (1 min) at the start of the {build} runs: {min(loads[build]):.2f}-{max(loads[build]):.2f}")
