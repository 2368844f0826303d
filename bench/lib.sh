# Shared by bench/run.sh, bench/connect-pairs.sh and bench/cluster.sh:
# starting and stopping the servers under test, and the development
# certificates they all use.
# Source it after setting SB, REF, NATS (nats-server only) and OUT.
#
# start_server NAME [switchboard options]: NAME is switchboard, tokio, node
# or nats; the server runs on CPU 0; sets PID, WS and WSS. stop_server stops
# it by its PID (also at exit; a script with a trap of its own replaces
# it). stop_pid PID stops any process the script started. ensure_certs
# writes OUT/certs once.

PID=""
WS=""
WSS=""

# A free loopback port (nats-server takes no port 0 for WebSocket).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# start_server NAME [extra switchboard options]; sets PID, WS, WSS.
# nats-server has one WebSocket listener: plain, or TLS with NATS_TLS=1.
start_server() {
    local name=$1
    shift
    local log="$OUT/server-$name-$RANDOM.log"
    case $name in
    switchboard)
        local dir
        dir=$(mktemp -d "$OUT/sb-data.XXXXXX")
        taskset -c 0 "$SB" serve --listen 127.0.0.1:0 --plain-listen 127.0.0.1:0 \
            --admin-listen 127.0.0.1:0 --data-dir "$dir" \
            --tls-cert "$OUT/certs/server.pem" --tls-key "$OUT/certs/server.key" \
            --max-connections 20000 "$@" >"$log" 2>"$log.err" &
        ;;
    tokio)
        taskset -c 0 "$REF" --listen 127.0.0.1:0 --tls-listen 127.0.0.1:0 \
            --cert "$OUT/certs/server.pem" --key "$OUT/certs/server.key" >"$log" 2>"$log.err" &
        ;;
    node)
        taskset -c 0 node bench/node-ws/server.js --listen 127.0.0.1:0 --tls-listen 127.0.0.1:0 \
            --cert "$OUT/certs/server.pem" --key "$OUT/certs/server.key" >"$log" 2>"$log.err" &
        ;;
    nats)
        local conf="$log.conf" tls="no_tls: true"
        if [ "${NATS_TLS:-0}" = 1 ]; then
            tls="tls { cert_file: \"$OUT/certs/server.pem\", key_file: \"$OUT/certs/server.key\" }"
        fi
        printf 'listen: 127.0.0.1:%s\nmax_connections: 100000\nwebsocket {\n  listen: "127.0.0.1:%s"\n  %s\n}\n' \
            "$(free_port)" "$(free_port)" "$tls" >"$conf"
        taskset -c 0 "$NATS" -c "$conf" >"$log" 2>"$log.err" &
        ;;
    esac
    PID=$!
    # Ready once the URLs are logged (bounded).
    for _ in $(seq 1 200); do
        if urls_of "$name" "$log"; then
            return 0
        fi
        if ! kill -0 "$PID" 2>/dev/null; then break; fi
        sleep 0.05
    done
    echo "server $name did not start; see $log.err" >&2
    cat "$log.err" >&2
    exit 1
}

# urls_of NAME LOG: sets WS and WSS from what the server logged; fails
# until both are there. nats-server logs its one WebSocket listener (both
# URLs name it; the caller picks the one it asked for), the others a
# plain and a TLS URL each.
urls_of() {
    if [ "$1" = nats ]; then
        local u
        u=$(grep -ho 'websocket clients on wss\?://[0-9.:]*' "$2" "$2.err" | head -1 | sed 's/.* on //' || true)
        WS=${u:+$u/ws}
        WSS=$WS
    else
        WS=$(grep -o 'ws://[0-9.:]*/ws' "$2" | grep -v wss | head -1 || true)
        WSS=$(grep -o 'wss://[0-9.:]*/ws' "$2" | head -1 || true)
    fi
    [ -n "$WS" ] && [ -n "$WSS" ]
}

# stop_pid PID: SIGTERM, then SIGKILL after 10 s; waits for it.
stop_pid() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

stop_server() {
    if [ -n "$PID" ]; then
        stop_pid "$PID"
        PID=""
    fi
}
trap stop_server EXIT

# Development certificates for every server (Switchboard makes them).
ensure_certs() {
    [ -f "$OUT/certs/server.pem" ] && return 0
    mkdir -p "$OUT/certs"
    local dir p
    dir=$(mktemp -d "$OUT/sb-data.XXXXXX")
    "$SB" serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --data-dir "$dir" \
        --tls-cert "$OUT/certs/server.pem" --tls-key "$OUT/certs/server.key" >"$OUT/certs.log" 2>&1 &
    p=$!
    for _ in $(seq 1 100); do
        [ -f "$OUT/certs/ca.pem" ] && grep -q wss "$OUT/certs.log" && break
        sleep 0.05
    done
    kill -TERM $p
    wait $p || true
}
