#!/usr/bin/env python3
"""Prints bench/run.sh's results (the JSON reports in a results dir) as one
table: the median over repeated runs, and ratios to the tokio-tungstenite
reference where a target is defined against it."""

import json
import os
import re
import statistics
import sys

out = sys.argv[1] if len(sys.argv) > 1 else "."
runs = {}
for f in sorted(os.listdir(out)):
    m = re.match(r"(f\d+[abc]?)-(.+?)(?:-(\d+))?\.json$", f)
    if not m:
        continue
    with open(os.path.join(out, f)) as fh:
        try:
            r = json.load(fh)
        except ValueError:
            continue
    runs.setdefault((m.group(1), m.group(2)), []).append(r)


def med(key, fn):
    vals = [fn(r) for r in runs.get(key, [])]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def lat(r, name, q):
    p = r.get("latency_ms", {}).get(name)
    return p.get(q) if p else None


def dpc(r):
    s = r.get("server") or {}
    return s.get("deliveries_per_cpu_second")


def per_conn(r):
    s = r.get("server") or {}
    return s.get("bytes_per_connection")


def conn_rate(r):
    secs = r.get("measured_seconds") or 0
    return r["counts"]["connections_established"] / secs if secs else None


def fmt(v, unit=""):
    if v is None:
        return "-"
    if abs(v) >= 1e6:
        return f"{v / 1e6:.2f}M{unit}"
    if abs(v) >= 1e4:
        return f"{v / 1e3:.1f}k{unit}"
    return f"{v:.2f}{unit}"


rows = []


def row(fig, srv, what, key, fn, unit=""):
    n = len(runs.get(key, []))
    if n == 0:
        return
    lost = sum(r["counts"]["lost"] for r in runs[key])
    rows.append((fig, srv, what, fmt(med(key, fn), unit), n, lost))


SERVERS = ["switchboard", "tokio", "node", "nats"]
for srv in SERVERS:
    row("1 fan-out 1x1000 full speed", srv, "deliveries/s", ("f1", srv), lambda r: r["rates"]["delivered_per_s"])
    row("1 fan-out 1x1000 full speed", srv, "deliveries/server CPU-s", ("f1", srv), dpc)
for srv in SERVERS + ["switchboard-none"]:
    for q in ("p50", "p99", "p999"):
        row("2 fan-out 1x1000 @200/s", srv, f"{q} ms", ("f2", srv), lambda r, q=q: lat(r, "delivery", q))
for srv in SERVERS:
    for q in ("p50", "p99"):
        row("3a 1x10000 @20/s", srv, f"{q} ms", ("f3a", srv), lambda r, q=q: lat(r, "delivery", q))
for q in ("p50", "p99"):
    row("3b 100 rooms x100 @20/s", "switchboard", f"{q} ms", ("f3b", "switchboard"), lambda r, q=q: lat(r, "delivery", q))
for n in ("10000", "19000"):
    for srv in SERVERS:
        for tls in ("plain", "tls"):
            row(f"4 idle {n}", f"{srv} {tls}", "bytes/conn", ("f4", f"{srv}-{tls}-n{n}"), per_conn)
for srv in ["switchboard", "switchboard-url", "tokio", "node", "nats"]:
    for tls in ("plain", "tls"):
        row("5 connect", f"{srv} {tls}", "handshakes+joins/s", ("f5", f"{srv}-{tls}"), conn_rate)
for mode in ("group", "single", "group-w16", "group-w64"):
    row("6 durable sends x1000", mode, "acked/s", ("f6", mode), lambda r: r["rates"]["acked_per_s"])
    row("6 durable sends x1000", mode, "ack p99 ms", ("f6", mode), lambda r: lat(r, "ack", "p99"))
row("7 chat 10k users 60 s", "switchboard", "delivered/s", ("f7", "chat"), lambda r: r["rates"]["delivered_per_s"])
row("7 chat 10k users 60 s", "switchboard", "delivery p99 ms", ("f7", "chat"), lambda r: lat(r, "delivery", "p99"))
for rooms in ("own", "one"):
    row("8a big room idle", f"switchboard {rooms}", "bytes/conn", ("f8a", rooms), per_conn)
for srv in ["switchboard", "switchboard-url", "tokio", "node", "nats"]:
    row("8b 10k into one room", srv, "joins/s", ("f8b", srv), conn_rate)
    row("8b 10k into one room", srv, "join p99 ms", ("f8b", srv), lambda r: lat(r, "handshake", "p99"))
for srv in SERVERS:
    for q in ("p50", "p99"):
        row("8c big room @10/s", srv, f"{q} ms", ("f8c", srv), lambda r, q=q: lat(r, "delivery", q))

print(f"{'figure':<28} {'server':<18} {'metric':<24} {'median':>10} {'runs':>4} {'lost':>5}")
for fig, srv, what, v, n, lost in rows:
    print(f"{fig:<28} {srv:<18} {what:<24} {v:>10} {n:>4} {lost:>5}")


def ratio(num_key, den_key, fn):
    a, b = med(num_key, fn), med(den_key, fn)
    return a / b if a and b else None


print()
print("ratios to the tokio-tungstenite reference (same run):")
for name, nk, dk, fn in [
    ("fan-out efficiency (target >= 0.8)", ("f1", "switchboard"), ("f1", "tokio"), dpc),
    ("p99 @200k/s (target <= 1.5)", ("f2", "switchboard"), ("f2", "tokio"), lambda r: lat(r, "delivery", "p99")),
    ("  durability none (target <= 1.2)", ("f2", "switchboard-none"), ("f2", "tokio"), lambda r: lat(r, "delivery", "p99")),
    ("connect rate plain (target >= 0.9)", ("f5", "switchboard-plain"), ("f5", "tokio-plain"), conn_rate),
    ("connect rate TLS (target >= 0.9)", ("f5", "switchboard-tls"), ("f5", "tokio-tls"), conn_rate),
    ("  joined in the URL, plain", ("f5", "switchboard-url-plain"), ("f5", "tokio-plain"), conn_rate),
    ("  joined in the URL, TLS", ("f5", "switchboard-url-tls"), ("f5", "tokio-tls"), conn_rate),
    ("10k into one room, time (target <= 1.5)", ("f8b", "tokio"), ("f8b", "switchboard"), conn_rate),
    ("  joined in the URL", ("f8b", "tokio"), ("f8b", "switchboard-url"), conn_rate),
    ("big room fan-out p99 (target <= 1.5)", ("f8c", "switchboard"), ("f8c", "tokio"), lambda r: lat(r, "delivery", "p99")),
]:
    r = ratio(nk, dk, fn)
    print(f"  {name:<40} {'-' if r is None else f'{r:.2f}'}")

r = ratio(("f8a", "one"), ("f8a", "own"), per_conn)
print(f"  {'big room bytes, one room / own rooms (<= 1.25)':<40} {'-' if r is None else f'{r:.2f}'}")

print()
print("ratios to nats-server's WebSocket listener (same run):")
for name, nk, dk, fn in [
    ("fan-out deliveries/s", ("f1", "switchboard"), ("f1", "nats"), lambda r: r["rates"]["delivered_per_s"]),
    ("fan-out deliveries/server CPU-s", ("f1", "switchboard"), ("f1", "nats"), dpc),
    ("p99 @200k/s (lower is better)", ("f2", "switchboard"), ("f2", "nats"), lambda r: lat(r, "delivery", "p99")),
    ("connect rate plain", ("f5", "switchboard-plain"), ("f5", "nats-plain"), conn_rate),
    ("connect rate TLS", ("f5", "switchboard-tls"), ("f5", "nats-tls"), conn_rate),
]:
    r = ratio(nk, dk, fn)
    print(f"  {name:<40} {'-' if r is None else f'{r:.2f}'}")

# The generator's own CPU: a run whose generator used more than 90 % of its
# cores measured the generator, not the server.
busy = []
for (fig, srv), rs in sorted(runs.items()):
    for r in rs:
        cores = r.get("loadgen_cores") or 1
        secs = r.get("measured_seconds") or 0
        share = r.get("loadgen_cpu_seconds", 0) / (secs * cores) if secs else 0
        if share > 0.9:
            busy.append(f"{fig} {srv}: {100 * share:.0f}%")
if busy:
    print()
    print("WARNING: the load generator used more than 90% of its cores in:")
    for b in busy:
        print(f"  {b}")
